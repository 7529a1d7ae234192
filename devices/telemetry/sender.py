"""Backend side of commands: sign with the fleet key, publish, wait for the device's ack.

Commands are published at QoS 1 without retain. A device that is offline does not get the
command later (devices use clean sessions, and commands expire anyway): the sender reports a
timeout and the operator decides.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from devices.telemetry.commands_proto import sign_command
from devices.telemetry.records import MalformedPayload, decode_batch
from devices.telemetry.topics import Channel, topic
from devices.telemetry.transport import BrokerOptions, connect_kwargs, guarded, make_client
from runtime.errors import EdgeadaptError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class BrokerUnreachable(EdgeadaptError):
    """The broker refused or did not answer the connection."""


def send_command(
    broker: BrokerOptions,
    fleet: str,
    device: str,
    name: str,
    args: dict[str, str],
    key: Ed25519PrivateKey,
    *,
    ttl_s: float = 60.0,
    timeout_s: float = 10.0,
    wait_ack: bool = True,
) -> dict[str, Any]:
    """Publish a signed command; return ``{"status": ..., "nonce": ..., "detail": ...}``.

    ``status`` is the device's ack status (``ok``, ``rejected``, ``failed``, ``unsupported``),
    ``sent`` when ``wait_ack`` is False, or ``timeout`` when no ack came within ``timeout_s``.
    """
    payload, cmd = sign_command(key, fleet, device, name, args, now=time.time(), ttl_s=ttl_s)
    acks: dict[str, dict[str, Any]] = {}
    got = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        try:
            batch = decode_batch(msg.payload)
        except MalformedPayload:
            return
        for rec in batch.records:
            if rec.get("nonce") == cmd.nonce:
                acks[cmd.nonce] = rec
                got.set()

    subscribed = threading.Event()
    client = _connect(broker, on_message)
    client.on_subscribe = guarded(lambda *a: subscribed.set(), "subscribe")
    try:
        if wait_ack:
            rc, _ = client.subscribe(topic(fleet, device, Channel.ACK), qos=1)
            if rc != 0 or not subscribed.wait(timeout_s):
                raise BrokerUnreachable(f"could not subscribe to the ack topic (rc={rc})")
        client.publish(topic(fleet, device, Channel.COMMAND), payload, qos=1).wait_for_publish(
            timeout_s
        )
        result: dict[str, Any] = {"device": device, "cmd": name, "nonce": cmd.nonce}
        if not wait_ack:
            return {**result, "status": "sent"}
        if not got.wait(timeout_s):
            return {**result, "status": "timeout"}
        ack = acks[cmd.nonce]
        return {**result, "status": ack.get("status"), "detail": ack.get("detail", {})}
    finally:
        client.disconnect()
        client.loop_stop()


def _connect(broker: BrokerOptions, on_message: Any) -> Any:
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        connected.set()

    client = make_client(broker, f"edgeadapt-operator-{secrets.token_hex(4)}")
    client.on_connect = guarded(on_connect, "connect")
    client.on_message = guarded(on_message, "message")
    try:
        client.connect(**connect_kwargs(broker))
    except OSError as exc:
        raise BrokerUnreachable(f"cannot reach {broker.url}: {exc}") from None
    client.loop_start()
    if not connected.wait(10) or refused:
        client.loop_stop()
        why = refused[0] if refused else "no CONNACK in 10 s"
        raise BrokerUnreachable(f"{broker.url} refused the connection: {why}")
    return client
