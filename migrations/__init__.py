"""Alembic migrations: one set for PostgreSQL/TimescaleDB and SQLite."""

# The newest revision, known without importing Alembic (a second of start-up on a small
# edge host): `ingestd run` compares the database against it. A test checks it against
# Alembic's own view of the scripts, so a new migration cannot forget to move it.
HEAD = "0004"
