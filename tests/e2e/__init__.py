"""End-to-end tests: the real `agentd serve` tree (real processes, embedded PostgreSQL and
Redis) against the scripted LLM. Fixtures and client helpers are in conftest.py."""
