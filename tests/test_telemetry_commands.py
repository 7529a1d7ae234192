"""Signed commands: every rejection reason, and a live device that executes, acks, rejects
(reporting an event) and keeps running; replay protection survives a restart."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from mqtt_fixtures import received, stats, stored, wait_for

from devices.telemetry.client import ClientStats, TelemetryClient
from devices.telemetry.collector import Collector
from devices.telemetry.commands_proto import (
    Command,
    CommandRejected,
    Reason,
    generate_keypair,
    sign_command,
    verify_command,
)
from devices.telemetry.config import TelemetryConfig
from devices.telemetry.mosquitto import Mosquitto
from devices.telemetry.records import RecordKind, Sample
from devices.telemetry.sender import send_command
from devices.telemetry.transport import parse_broker_url
from runtime.cli import main as cli_main

NOW = 1_700_000_000.0


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A fleet key pair and a foreign one, as PEM files."""
    out = {}
    for name in ("fleet", "other"):
        private, public = generate_keypair()
        (tmp_path / f"{name}.key").write_bytes(private)
        (tmp_path / f"{name}.pub").write_bytes(public)
        out[name], out[f"{name}_pub"] = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
    return out


def _verify(payload: bytes, keys: dict[str, Path], now: float = NOW, seen: bool = False) -> Command:
    from devices.telemetry.commands_proto import load_public_keys

    return verify_command(
        payload, load_public_keys([keys["fleet_pub"]]), "f", "d1", now=now, max_ttl_s=3600,
        skew_s=30, seen=lambda nonce: seen,
    )  # fmt: skip


def _signed(
    keys: dict[str, Path],
    name: str = "set-mode",
    args: dict | None = None,
    key: str = "fleet",
    device: str = "d1",
    now: float = NOW,
    ttl: float = 60,
) -> bytes:
    from devices.telemetry.commands_proto import load_private_key

    args = {"mode": "safe"} if args is None else args
    payload, _ = sign_command(load_private_key(keys[key]), "f", device, name, args, now=now,
                              ttl_s=ttl)  # fmt: skip
    return payload


def _forged_body(keys: dict[str, Path]) -> bytes:
    """A genuinely signed command whose body was edited afterwards (safe -> adaptive)."""
    payload = _signed(keys)
    return _tamper(payload, body=json.loads(payload)["body"].replace("safe", "adaptive"))


def _zero_sig() -> str:
    return base64.b64encode(bytes(64)).decode()


def _tamper(payload: bytes, **changes: object) -> bytes:
    env = json.loads(payload)
    env.update(changes)
    return json.dumps(env).encode()


def test_a_valid_command_verifies(keys: dict[str, Path]) -> None:
    cmd = _verify(_signed(keys), keys)
    assert (cmd.name, cmd.args, cmd.device) == ("set-mode", {"mode": "safe"}, "d1")
    assert cmd.expires == NOW + 60 and len(cmd.nonce) == 32


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda k: b"\x00garbage", Reason.MALFORMED),
        (lambda k: b'{"v": 2}', Reason.MALFORMED),
        (lambda k: _tamper(_signed(k), sig=""), Reason.UNSIGNED),
        (lambda k: _tamper(_signed(k), sig=None, kid=None), Reason.UNSIGNED),
        (lambda k: _signed(k, key="other"), Reason.UNKNOWN_KEY),
        (lambda k: _forged_body(k), Reason.BAD_SIGNATURE),
        (lambda k: _tamper(_signed(k), sig=_zero_sig()), Reason.BAD_SIGNATURE),
        (lambda k: _signed(k, device="d2"), Reason.WRONG_TARGET),
        (lambda k: _signed(k, name="format-disk", args={}), Reason.UNKNOWN_COMMAND),
        (lambda k: _signed(k, args={"mode": "turbo"}), Reason.BAD_ARGS),
        (lambda k: _signed(k, name="reset-belief", args={"x": "1"}), Reason.BAD_ARGS),
        (lambda k: _signed(k, now=NOW - 200, ttl=60), Reason.EXPIRED),
        (lambda k: _signed(k, now=NOW + 200), Reason.NOT_YET_VALID),
        (lambda k: _signed(k, ttl=7200), Reason.TTL_TOO_LONG),
    ],
)  # fmt: skip
def test_bad_commands_are_rejected_with_their_reason(make, reason: str, keys: dict) -> None:
    with pytest.raises(CommandRejected) as exc:
        _verify(make(keys), keys)
    assert exc.value.reason == reason


def test_a_seen_nonce_is_a_replay(keys: dict[str, Path]) -> None:
    with pytest.raises(CommandRejected) as exc:
        _verify(_signed(keys), keys, seen=True)
    assert exc.value.reason == Reason.REPLAYED and exc.value.nonce


def test_clock_skew_within_tolerance_is_accepted(keys: dict[str, Path]) -> None:
    _verify(_signed(keys, now=NOW + 20), keys)  # issued 20 s "in the future", skew 30 s
    _verify(_signed(keys, now=NOW - 80, ttl=60), keys)  # expired 20 s ago, within skew


# --- live: a device behind a real broker ----------------------------------------------------


def test_device_executes_acks_rejects_and_keeps_running(
    broker: Mosquitto, collector: Collector, tmp_path: Path, keys: dict[str, Path]
) -> None:
    from devices.telemetry.commands_proto import load_private_key

    calls: list[Command] = []

    def handler(cmd: Command) -> dict:
        calls.append(cmd)
        if cmd.name == "reset-belief":
            raise RuntimeError("posterior is busy")
        return {"mode": cmd.args["mode"]}

    cfg = _config(broker, tmp_path, keys)
    opts, key = parse_broker_url(broker.url), load_private_key(keys["fleet"])
    client = TelemetryClient(cfg, command_handler=handler).start()
    try:
        wait_for(lambda: client.connected, 10, "the device connected")
        time.sleep(0.2)  # its command subscription is made by the worker on connect
        ok = send_command(opts, "f", "d1", "set-mode", {"mode": "safe"}, key)
        assert ok["status"] == "ok" and ok["detail"] == {"mode": "safe"}
        assert [c.args for c in calls] == [{"mode": "safe"}]

        failed = send_command(opts, "f", "d1", "reset-belief", {}, key)
        assert failed["status"] == "failed" and "posterior is busy" in failed["detail"]["error"]

        reborn = send_command(opts, "f", "d1", "rebirth", {}, key)
        assert reborn["status"] == "ok"

        # a replay of an accepted command, an expired one, and garbage
        replay = _signed(keys, now=time.time())
        _publish(broker, replay)
        _publish(broker, replay)
        _publish(broker, _signed(keys, now=time.time() - 600))
        _publish(broker, b"not a command")
        wait_for(lambda: client.stats().commands_rejected == 3, 10, "three rejections")
        assert client.stats().commands_accepted == 4

        steps = [client.record(_sample(i)) for i in range(20)]  # still publishing afterwards
        assert client.wait_drained(10)
    finally:
        client.close()
    wait_for(
        lambda: steps[-1] in {s for _, s, _, _ in stored(collector.db_path, "d1")}, 10, "records"
    )
    events = [b for *_, b in stored(collector.db_path, "d1", RecordKind.EVENT)]
    reasons = [e["data"]["reason"] for e in events if e["type"] == "command_rejected"]
    assert sorted(reasons) == ["expired", "malformed", "replayed"]
    assert [e["type"] for e in events].count("command_failed") == 1
    acks = [b for *_, b in stored(collector.db_path, "d1", RecordKind.ACK)]
    assert [a["status"] for a in acks] == ["ok", "failed", "ok", "ok", "rejected", "rejected"]
    assert stats(collector.db_path)["d1"]["gaps"] == 0


def test_replay_protection_survives_a_restart(
    broker: Mosquitto, tmp_path: Path, keys: dict[str, Path]
) -> None:
    cfg = _config(broker, tmp_path, keys)
    payload = _signed(keys, now=time.time())
    for accepted, rejected in ((1, 0), (0, 1)):  # first boot, then after a restart
        s = _handle_once(TelemetryClient(cfg, command_handler=lambda c: {}), broker, payload)
        assert (s.commands_accepted, s.commands_rejected) == (accepted, rejected)


def _handle_once(client: TelemetryClient, broker: Mosquitto, payload: bytes) -> ClientStats:
    client.start()
    try:
        wait_for(lambda: client.connected, 10, "connected")
        time.sleep(0.2)
        _publish(broker, payload)
        wait_for(
            lambda: client.stats().commands_accepted + client.stats().commands_rejected == 1,
            10,
            "the command handled",
        )
        return client.stats()
    finally:
        client.close()


def test_cli_command_prints_the_ack(
    broker: Mosquitto, collector: Collector, tmp_path: Path, keys: dict[str, Path], capsys
) -> None:
    cfg = _config(broker, tmp_path, keys)
    client = TelemetryClient(cfg, command_handler=lambda c: {"mode": c.args["mode"]}).start()
    try:
        wait_for(lambda: client.connected, 10, "connected")
        time.sleep(0.2)
        base = [
            "command",
            "d1",
            "--broker",
            broker.url,
            "--fleet",
            "f",
            "--key",
            str(keys["fleet"]),
        ]
        assert cli_main([*base[:2], "set-mode", "adaptive", *base[2:]]) == 0
        assert json.loads(capsys.readouterr().out)["detail"] == {"mode": "adaptive"}
        assert cli_main([*base[:2], "set-mode", "fast", *base[2:]]) == 2  # user error, no traceback
        assert "set-mode needs one of" in capsys.readouterr().err
        wrong = [*base[:2], "rebirth", *base[2:-1], str(keys["other"]), "--timeout", "2"]
        assert cli_main(wrong) == 1  # signed with a foreign key: the device rejects it
        assert json.loads(capsys.readouterr().out)["status"] == "rejected"
    finally:
        client.close()
    assert received(collector.db_path, "d1") >= 2


def _config(broker: Mosquitto, tmp_path: Path, keys: dict[str, Path]) -> TelemetryConfig:
    return TelemetryConfig(
        broker=broker.url,
        fleet="f",
        device="d1",
        outbox=str(tmp_path / "ob.sqlite"),
        command_keys=[str(keys["fleet_pub"])],
    )


def _publish(broker: Mosquitto, payload: bytes) -> None:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.publish("edgeadapt/v1/f/d1/cmd", payload, qos=1).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def _sample(step: int) -> Sample:
    return Sample(step, 0.0, [0.0], [0.0], [1.0], 0.0, step, 0.0, 1.0)
