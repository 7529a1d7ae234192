"""Shared pytest fixtures. Area-specific fixtures live in their own modules, imported here."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


from dashboard_fixtures import browser  # noqa: E402,F401  (dashboard: headless Chromium)
from mqtt_fixtures import broker, collector  # noqa: E402,F401  (telemetry: real Mosquitto)
from pg_fixtures import pg_server, pg_url  # noqa: E402,F401  (collector: real PostgreSQL)
from ray_fixtures import ray_two_nodes  # noqa: E402,F401  (scale-out: two-node Ray cluster)
