"""Hostile command payloads and a failing outbox transaction (issue #17, part 1).

Each payload is either a valid command or a ``malformed`` (or other) rejection; nothing a payload
contains reaches the worker loop, and a cycle that fails (the outbox locked by another process)
never loses the broker's acknowledgements. Real Mosquitto, real collector, real SQLite files.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_fixtures import stats, stored, wait_for

from devices.telemetry.client import TelemetryClient
from devices.telemetry.collector import Collector
from devices.telemetry.commands_proto import (
    CommandRejected,
    Reason,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_keys,
    verify_command,
)
from devices.telemetry.config import TelemetryConfig
from devices.telemetry.mosquitto import Mosquitto
from devices.telemetry.records import RecordKind, Sample
from devices.telemetry.sender import send_command
from devices.telemetry.transport import parse_broker_url

DEEP = b"[" * 15_000  # well under the 16 KiB payload limit


@pytest.fixture
def fleet_key(tmp_path: Path) -> tuple[Path, Path]:
    """The fleet's private and public key files."""
    private, public = generate_keypair()
    (tmp_path / "fleet.key").write_bytes(private)
    (tmp_path / "fleet.pub").write_bytes(public)
    return tmp_path / "fleet.key", tmp_path / "fleet.pub"


def _signed_body(private: Path, body_text: str) -> bytes:
    """An envelope whose (arbitrary) body text is genuinely signed by the fleet key."""
    key = load_private_key(private)
    sig = base64.b64encode(key.sign(body_text.encode())).decode()
    env = {"v": 1, "kid": key_id(key.public_key()), "body": body_text, "sig": sig}
    return json.dumps(env).encode()


def _body(**changes: object) -> str:
    now = time.time()
    body = {"fleet": "f", "device": "d1", "cmd": "set-mode", "args": {"mode": "safe"},
            "nonce": "ab" * 16, "issued": now, "expires": now + 60}  # fmt: skip
    body.update(changes)
    return json.dumps(body)


def hostile_payloads(private: Path) -> list[bytes]:
    """Payloads that once raised out of the command parser, or are close relatives."""
    unknown_key = {"v": 1, "kid": "0" * 16, "sig": base64.b64encode(bytes(64)).decode()}
    return [
        DEEP,  # RecursionError in json.loads of the envelope
        b'{"v": 1, "x": ' + b"[" * 15_000,
        json.dumps({**unknown_key, "body": "[" * 15_000}).encode(),  # the unverified peek
        b'{"v": 1e999, "kid": "a", "body": "{}", "sig": "x"}',
        b'{"v": NaN}',
        b'{"v": 1, "kid": "a", "body": "{}", "sig": "x", "n": ' + b"9" * 5000 + b"}",
        _signed_body(private, '{"a":' * 2000 + "1" + "}" * 2000),  # signed, deeply nested
        _signed_body(private, _body(issued=10**400)),  # signed, float() overflows
        _signed_body(private, _body(expires=float("nan"))),
        _signed_body(private, _body(args=["mode", "safe"])),
        _signed_body(private, _body(args={"mode": ["safe"]})),
        json.dumps([1, 2, 3]).encode(),
        b"\xff\xfe\x00",
    ]


def test_every_hostile_payload_is_a_rejection_not_an_exception(
    fleet_key: tuple[Path, Path],
) -> None:
    keys = load_public_keys([fleet_key[1]])
    for payload in hostile_payloads(fleet_key[0]):
        with pytest.raises(CommandRejected) as exc:
            verify_command(payload, keys, "f", "d1", now=time.time(), max_ttl_s=3600, skew_s=30,
                           seen=lambda nonce: False)  # fmt: skip
        assert exc.value.reason in (Reason.MALFORMED, Reason.UNKNOWN_KEY, Reason.BAD_ARGS), payload


def test_hostile_payloads_on_a_live_device_keep_telemetry_and_commands_flowing(
    broker: Mosquitto, collector: Collector, tmp_path: Path, fleet_key: tuple[Path, Path]
) -> None:
    cfg = _config(broker, tmp_path, fleet_key[1])
    client = TelemetryClient(cfg, command_handler=lambda c: {"mode": c.args["mode"]}).start()
    hostile = hostile_payloads(fleet_key[0])
    try:
        wait_for(lambda: client.connected, 10, "the device connected")
        time.sleep(0.2)  # its command subscription is made by the worker on connect
        stop = threading.Event()
        producer = threading.Thread(target=_produce, args=(client, stop), daemon=True)
        producer.start()
        try:
            for _ in range(20):  # a few hundred hostile payloads while telemetry flows
                _publish_all(broker, hostile)
            wait_for(lambda: client.stats().commands_rejected == 20 * len(hostile), 20,
                     f"every hostile payload rejected ({client.stats()})")  # fmt: skip
            ack = send_command(parse_broker_url(broker.url), "f", "d1", "set-mode",
                               {"mode": "adaptive"}, load_private_key(fleet_key[0]))  # fmt: skip
        finally:
            stop.set()
            producer.join()
        assert ack["status"] == "ok" and ack["detail"] == {"mode": "adaptive"}
        assert client.wait_drained(20), client.stats()
        s = client.stats()
        assert s.worker_errors == 0 and s.inflight_messages == 0 and s.stored == 0
    finally:
        client.close()
    last = s.last_seq
    wait_for(lambda: stats(collector.db_path)["d1"]["max_seq"] == last, 20, "every record")
    assert stats(collector.db_path)["d1"]["gaps"] == 0
    events = [b for *_, b in stored(collector.db_path, "d1", RecordKind.EVENT)]
    rejected = [e for e in events if e["type"] == "command_rejected"]
    assert len(rejected) == 20 * len(hostile)
    assert {e["data"]["reason"] for e in rejected} <= {"malformed", "unknown_key", "bad_args"}


def test_a_failed_cycle_keeps_the_acknowledgements_it_drained(
    broker: Mosquitto, collector: Collector, tmp_path: Path, fleet_key: tuple[Path, Path]
) -> None:
    """While another process holds the outbox's write lock every worker cycle fails (busy
    timeout); the PUBACKs that arrive meanwhile still delete their rows once the lock is gone."""
    cfg = _config(broker, tmp_path, fleet_key[1])
    client = TelemetryClient(cfg).start()
    try:
        wait_for(lambda: client.connected, 10, "the device connected")
        broker.kill()
        wait_for(lambda: not client.connected, 10, "the client to notice the outage")
        seqs = [client.record(_sample(i)) for i in range(600)]
        assert client.flush(10) and client.stats().stored == 600
        lock = sqlite3.connect(cfg.outbox, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the device's write transactions now time out (5 s)
        try:
            broker.restart()
            wait_for(lambda: client.stats().published_records == 600, 20, "everything published")
            wait_for(lambda: client.stats().worker_errors >= 1, 15, "a failed worker cycle")
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert client.wait_drained(20), client.stats()
        assert client.stats().acked_records == 600
    finally:
        client.close()
    wait_for(lambda: stats(collector.db_path)["d1"]["max_seq"] == seqs[-1], 20, "every record")
    assert stats(collector.db_path)["d1"]["gaps"] == 0
    with sqlite3.connect(cfg.outbox) as conn:
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0


def _produce(client: TelemetryClient, stop: threading.Event) -> None:
    step = 0
    while not stop.is_set():
        client.record(_sample(step))
        step += 1
        time.sleep(0.002)


def _sample(step: int) -> Sample:
    return Sample(step, -0.5, [0.1, 0.2], [0.0] * 5, [1.0] * 5, 1.0, step, 0.2, 50.0)


def _config(broker: Mosquitto, tmp_path: Path, public: Path) -> TelemetryConfig:
    return TelemetryConfig(broker=broker.url, fleet="f", device="d1",
                           outbox=str(tmp_path / "ob.sqlite"), command_keys=[str(public)],
                           min_free_mb=0)  # fmt: skip


def _publish_all(broker: Mosquitto, payloads: list[bytes]) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        infos = [c.publish("edgeadapt/v1/f/d1/cmd", p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()
