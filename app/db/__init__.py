"""PostgreSQL: the pool (psycopg in threads), schema migrations, and the queries."""

from app.db.pool import Database, DatabaseError, DatabaseUnavailable, open_database

__all__ = ["Database", "DatabaseError", "DatabaseUnavailable", "open_database"]
