"""Alembic migrations of the state store (run by ``SqlStore`` on open, or by ``bridge migrate``)."""
