"""A real PostgreSQL server for the collector tests (Debian package ``postgresql``), started
once per session on a free loopback port in a temporary directory; each test gets a fresh
database. Skips, with the reason, only when PostgreSQL or psycopg is not installed."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from devices.telemetry.pgserver import PostgresMissing, PostgresServer

_names = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install 'edgeadapt[postgres]'")
    try:
        server = PostgresServer()
    except PostgresMissing as exc:
        pytest.skip(str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """URL of a fresh, empty database on the session's server."""
    return pg_server.create_database(f"edgeadapt_test_{next(_names)}")
