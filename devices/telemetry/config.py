"""Typed configuration of a device's telemetry client (the ``telemetry:`` section of a device
config, or built directly). Unknown keys and wrong types fail at load time."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from devices.telemetry.topics import ID_PATTERN


class TelemetryConfig(BaseModel):
    """How a device publishes telemetry and accepts commands."""

    model_config = ConfigDict(extra="forbid")

    broker: str = Field(description="mqtt://host[:port] or mqtts://host[:port]")
    fleet: str = Field("default", description="fleet id, second level of every topic")
    device: str = Field(description="device id; also the MQTT client id and the ACL username")
    outbox: str = Field("telemetry-outbox.sqlite", description="path of the SQLite outbox")
    username: str | None = Field(None, description="broker username (default: none)")
    password: str | None = Field(None, description="password; else $EDGEADAPT_MQTT_PASSWORD")
    ca_file: str | None = Field(None, description="CA bundle to verify the broker (mqtts)")
    cert_file: str | None = Field(None, description="client certificate (PEM), optional")
    key_file: str | None = Field(None, description="client private key (PEM), optional")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    keepalive_s: int = Field(10, ge=2, le=3600, description="MQTT keepalive (s)")
    batch_size: int = Field(100, ge=1, le=10_000, description="records per message, at most")
    batch_period_s: float = Field(
        0.02, gt=0, le=60, description="longest wait (s) before a partial telemetry batch is sent"
    )
    max_inflight: int = Field(16, ge=1, le=1000, description="messages awaiting PUBACK, at most")
    max_records: int = Field(
        100_000,
        ge=1,
        description="outbox bound in telemetry rows; beyond it the oldest telemetry is dropped "
        "(events and acks are not counted and never dropped by the bound)",
    )
    max_queued_records: int = Field(
        20_000,
        ge=100,
        description="records held in RAM while they cannot be stored (disk full); beyond it "
        "the oldest telemetry (then the oldest of any kind) is dropped, counted and reported as "
        "an outbox_dropped event with reason 'ram'",
    )
    min_free_mb: float = Field(
        8.0,
        ge=0,
        description="no new outbox rows while the outbox's filesystem has less free space (MB); "
        "the headroom lets acknowledged rows be deleted on a full disk (0: no check)",
    )
    store_retry_s: float = Field(
        1.0, gt=0, le=60, description="wait (s) before storing again after the disk was full"
    )
    telemetry_ttl_s: float = Field(86_400, gt=0, description="telemetry older than this is dropped")
    event_ttl_s: float = Field(
        7 * 86_400, gt=0, description="events and acks older than this are dropped"
    )
    decimate: int = Field(1, ge=1, description="keep every n-th control step's telemetry")
    sync: Literal["normal", "full"] = Field(
        "normal", description="SQLite synchronous mode: normal survives kill -9, full power loss"
    )
    command_keys: list[str] = Field(
        default_factory=list, description="fleet public keys (PEM files) that may sign commands"
    )
    command_max_ttl_s: float = Field(
        3600, gt=0, description="commands valid for longer than this are rejected"
    )
    clock_skew_s: float = Field(30, ge=0, description="tolerated clock difference (s)")
    reconnect_min_s: float = Field(0.2, gt=0, description="first reconnect delay (s)")
    reconnect_max_s: float = Field(10, gt=0, description="longest reconnect delay (s)")

    @field_validator("fleet", "device")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_PATTERN.match(v):
            raise ValueError("expected 1-64 characters from [A-Za-z0-9_.-]")
        return v

    @model_validator(mode="after")
    def _delays(self) -> TelemetryConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self
