"""Broker URLs and paho-mqtt client construction (TLS, credentials, protocol version).

``mqtt://[user[:password]@]host[:port]`` (default port 1883) and ``mqtts://...`` (TLS, default
port 8883, the server certificate is always verified: against ``ca_file`` or the system store).
Client certificates are optional. All clients use paho-mqtt's ``CallbackAPIVersion.VERSION2``.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlsplit

from runtime.errors import ConfigError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

Protocol = Literal["5", "3.1.1"]
PASSWORD_ENV = "EDGEADAPT_MQTT_PASSWORD"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerOptions:
    """Everything needed to reach a broker."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    protocol: Protocol = "5"
    keepalive_s: int = 10

    @property
    def url(self) -> str:
        """The URL without the password (for logs)."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str, **overrides: object) -> BrokerOptions:
    """Parse ``url``; keyword ``overrides`` (e.g. ``ca_file``) replace fields when not None.

    The password comes from the URL, an override, or the ``EDGEADAPT_MQTT_PASSWORD`` variable.
    """
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ConfigError(f"broker URL {url!r}: bad port") from None
    opts = BrokerOptions(
        host=parts.hostname,
        port=port,
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else os.environ.get(PASSWORD_ENV),
    )
    opts = replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    if opts.protocol not in ("5", "3.1.1"):
        raise ConfigError(f"MQTT protocol {opts.protocol!r}: expected '5' or '3.1.1'")
    if (opts.cert_file is None) != (opts.key_file is None):
        raise ConfigError("a client certificate needs both cert_file and key_file")
    return opts


def make_client(
    opts: BrokerOptions, client_id: str, *, persistent: bool = False, manual_ack: bool = False
) -> mqtt.Client:
    """A configured, unconnected paho client.

    ``persistent`` asks for a broker-side session that outlives the connection (3.1.1
    ``clean_session=False``; for MQTT 5 pass :func:`connect_kwargs` to ``connect_async``).
    Exceptions raised in callbacks are logged by paho and never stop its network loop.
    """
    import paho.mqtt.client as mqtt

    v5 = opts.protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=manual_ack,
    )
    client.suppress_exceptions = True  # second line of defence behind our own guards
    if opts.username is not None:
        client.username_pw_set(opts.username, opts.password)
    if opts.tls:
        client.tls_set(
            ca_certs=opts.ca_file,
            certfile=opts.cert_file,
            keyfile=opts.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    return client


def connect_kwargs(opts: BrokerOptions, *, session_expiry_s: int = 0) -> dict[str, object]:
    """Keyword arguments of ``connect_async`` (MQTT 5: clean start + session expiry)."""
    kwargs: dict[str, object] = {
        "host": opts.host,
        "port": opts.port,
        "keepalive": opts.keepalive_s,
    }
    if opts.protocol == "5":
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        kwargs["clean_start"] = session_expiry_s == 0
        kwargs["properties"] = props
    return kwargs


def guarded(fn: Callable[..., None], what: str) -> Callable[..., None]:
    """Wrap a paho callback so that an exception is logged and never reaches paho.

    An exception escaping a callback stops paho's network thread unless ``suppress_exceptions``
    is set (a known paho pitfall); we do both.
    """

    def callback(*args: object, **kwargs: object) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("exception in MQTT %s callback (the network loop continues)", what)

    return callback
