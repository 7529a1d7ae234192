"""MQTT telemetry: persisted outbox, device publisher, backend collector and signed commands.

Importing this package is free: every module pulls its dependencies (paho-mqtt, sqlite3,
cryptography, matplotlib) only when imported itself. See ``docs/telemetry.md``.
"""

from __future__ import annotations
