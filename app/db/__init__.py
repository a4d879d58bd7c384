"""PostgreSQL: the pool (psycopg in threads), schema migrations, and the queries."""

from app.db.pool import (
    Connection,
    Database,
    DatabaseError,
    DatabaseUnavailable,
    mapped_errors,
    open_database,
)

__all__ = [
    "Connection",
    "Database",
    "DatabaseError",
    "DatabaseUnavailable",
    "mapped_errors",
    "open_database",
]
