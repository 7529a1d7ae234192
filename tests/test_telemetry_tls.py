"""Security against a real broker started from configs/mosquitto/: TLS with server verification,
password file, client certificates and the per-device ACL.

A throw-away CA, server and device certificates are generated for the test; passwords are set
with the real ``mosquitto_passwd``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_fixtures import ROOT, received, require_mosquitto, stats, wait_for

from devices.telemetry.client import TelemetryClient
from devices.telemetry.collector import Collector
from devices.telemetry.config import TelemetryConfig
from devices.telemetry.mosquitto import Mosquitto, free_port, run_as_self
from devices.telemetry.records import RecordKind, Sample, batch_payload
from devices.telemetry.transport import parse_broker_url

CONF_DIR = ROOT / "configs" / "mosquitto"
SHIPPED = "/etc/mosquitto/edgeadapt"
USERS = {"dev-a": "pw-a", "dev-b": "pw-b", "collector": "pw-c", "operator": "pw-o"}


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The shipped config with its paths and ports moved to ``tmp_path``."""
    require_mosquitto()
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    passwd = pki / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run([_passwd_tool(), *create, "-b", str(passwd), user, password], check=True)
    shutil.copy(CONF_DIR / "acl", pki / "acl")
    port, cert_port = free_port(), free_port()
    text = (CONF_DIR / "mosquitto.conf").read_text()
    text = text.replace(SHIPPED, str(pki)).replace("/var/lib/mosquitto/", f"{tmp_path}/")
    text = text.replace("listener 8883\n", f"listener {port} 127.0.0.1\n")
    text = text.replace("listener 8884\n", f"listener {cert_port} 127.0.0.1\n")
    broker = Mosquitto(tmp_path / "broker", config=run_as_self() + text, port=port)
    broker.start()
    yield {"broker": broker, "pki": pki, "port": port, "cert_port": cert_port, "tmp": tmp_path}
    broker.kill()


def test_tls_password_acl_end_to_end(secure_broker: dict[str, Any]) -> None:
    pki, port, tmp = secure_broker["pki"], secure_broker["port"], secure_broker["tmp"]
    url = f"mqtts://127.0.0.1:{port}"
    opts = parse_broker_url(url, username="collector", password=USERS["collector"],
                            ca_file=str(pki / "ca.crt"))  # fmt: skip
    collector = Collector(opts, tmp / "collector.sqlite", share_group="g").start()
    try:
        assert collector.wait_subscribed(10)
        cfg = TelemetryConfig(broker=url, fleet="f", device="dev-a", username="dev-a",
                              password=USERS["dev-a"], ca_file=str(pki / "ca.crt"),
                              outbox=str(tmp / "a.sqlite"))  # fmt: skip
        client = TelemetryClient(cfg).start()
        try:
            for i in range(30):
                client.record(Sample(i, 0.0, [0.0], [0.0], [1.0], 0.0, i, 0.0, 1.0))
            assert client.wait_drained(10)
            assert client.stats().rejected_by_broker == 0
        finally:
            client.close()
        wait_for(lambda: received(collector.db_path, "dev-a") == 30, 10, "dev-a's records")
        assert stats(collector.db_path)["dev-a"]["gaps"] == 0

        # dev-a, properly authenticated, tries to publish as dev-b: the broker refuses it
        spoof = batch_payload("f", "dev-b", "b00t", RecordKind.TELEMETRY, False,
                              ['{"seq":1,"t":1.0,"step":0}'])  # fmt: skip
        with _client(port, pki, "dev-a", USERS["dev-a"]) as a:
            reasons = a.publish_reason("edgeadapt/v1/f/dev-b/tele", spoof)
            assert reasons == "Not authorized"
        time.sleep(0.5)
        assert "dev-b" not in stats(collector.db_path)
    finally:
        collector.stop()


def test_each_device_reads_only_its_own_commands(secure_broker: dict[str, Any]) -> None:
    pki, port = secure_broker["pki"], secure_broker["port"]
    with (
        _client(port, pki, "dev-a", USERS["dev-a"]) as a,
        _client(port, pki, "operator", USERS["operator"]) as op,
    ):
        # Mosquitto grants the subscriptions; the read ACL filters what is delivered
        a.subscribe("edgeadapt/v1/f/dev-b/cmd")
        a.subscribe("edgeadapt/v1/+/+/cmd")
        for device in ("dev-a", "dev-b"):
            op.publish_reason(f"edgeadapt/v1/f/{device}/cmd", b"{}")
        wait_for(lambda: len(a.messages) >= 1, 5, "dev-a's command")
        time.sleep(0.3)
        assert [m[0] for m in a.messages] == ["edgeadapt/v1/f/dev-a/cmd"]


@pytest.mark.parametrize(
    ("username", "password", "why"),
    [(None, None, "anonymous"), ("dev-a", "wrong", "bad password"), ("mallory", "x", "unknown")],
)
def test_clients_without_valid_credentials_are_refused(
    secure_broker: dict[str, Any], username: str | None, password: str | None, why: str
) -> None:
    result = _connect_result(secure_broker["port"], secure_broker["pki"], username, password)
    assert result in ("Not authorized", "Bad user name or password"), why


def test_the_server_certificate_is_verified(secure_broker: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    other.mkdir()
    make_pki(other)  # a CA that did not sign the broker's certificate
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(other / "ca.crt"), cert_reqs=ssl.CERT_REQUIRED)
    c.username_pw_set("dev-a", USERS["dev-a"])
    with pytest.raises(ssl.SSLCertVerificationError):
        c.connect("127.0.0.1", secure_broker["port"])


def test_client_certificate_listener_uses_the_cn_as_identity(
    secure_broker: dict[str, Any],
) -> None:
    pki, port = secure_broker["pki"], secure_broker["cert_port"]
    url = f"mqtts://127.0.0.1:{port}"
    cfg = TelemetryConfig(broker=url, fleet="f", device="dev-a", ca_file=str(pki / "ca.crt"),
                          cert_file=str(pki / "dev-a.crt"), key_file=str(pki / "dev-a.key"),
                          outbox=str(secure_broker["tmp"] / "a.sqlite"))  # fmt: skip
    client = TelemetryClient(cfg).start()
    try:
        client.record(Sample(0, 0.0, [0.0], [0.0], [1.0], 0.0, 0, 0.0, 1.0))
        assert client.wait_drained(10), "published with a client certificate, no password"
        assert client.stats().rejected_by_broker == 0
    finally:
        client.close()
    # the same certificate cannot write under another device's id
    with _client(port, pki, None, None, cert="dev-a") as a:
        assert a.publish_reason("edgeadapt/v1/f/dev-b/tele", b"{}") == "Not authorized"
    # without a certificate there is no MQTT session (the TLS handshake or the CONNACK fails)
    assert _connect_result(port, pki, None, None, cert="dev-a") == "Success"
    assert _connect_result(port, pki, None, None) != "Success"


# --- helpers ---------------------------------------------------------------------------------


class _Probe:
    """A raw paho client that reports PUBACK/SUBACK reason codes."""

    def __init__(self, client: mqtt.Client):
        self.client = client
        self.messages: list[tuple[str, bytes]] = []
        self._acks: dict[int, str] = {}
        self._subs: dict[int, bool] = {}
        self._event = threading.Condition()
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._event:
            self._acks[mid] = str(reason)
            self._event.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._event:
            self._subs[mid] = any(r.is_failure for r in reasons)
            self._event.notify_all()

    def publish_reason(self, topic_name: str, payload: bytes) -> str:
        mid = self.client.publish(topic_name, payload, qos=1).mid
        with self._event:
            assert self._event.wait_for(lambda: mid in self._acks, 5), "no PUBACK"
            return self._acks[mid]

    def subscribe(self, topic_name: str) -> bool:
        """Subscribe and wait for the SUBACK; True if it was refused."""
        _, mid = self.client.subscribe(topic_name, qos=1)
        with self._event:
            assert self._event.wait_for(lambda: mid in self._subs, 5), "no SUBACK"
            return self._subs[mid]


class _client:
    def __init__(self, port: int, pki: Path, user: str | None, pw: str | None, cert: str = ""):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        certfile = str(pki / f"{cert}.crt") if cert else None
        keyfile = str(pki / f"{cert}.key") if cert else None
        c.tls_set(ca_certs=str(pki / "ca.crt"), certfile=certfile, keyfile=keyfile,
                  cert_reqs=ssl.CERT_REQUIRED)  # fmt: skip
        if user:
            c.username_pw_set(user, pw)
        self.probe = _Probe(c)
        self.port = port

    def __enter__(self) -> _Probe:
        c = self.probe.client
        connected = threading.Event()
        c.on_connect = lambda *a: connected.set()
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        assert connected.wait(5), "no CONNACK"
        return self.probe

    def __exit__(self, *exc: object) -> None:
        self.probe.client.disconnect()
        self.probe.client.loop_stop()


def _connect_result(
    port: int, pki: Path, user: str | None, password: str | None, cert: str = ""
) -> str:
    """The CONNACK reason, "no answer", or the TLS error's class name."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    certfile = str(pki / f"{cert}.crt") if cert else None
    keyfile = str(pki / f"{cert}.key") if cert else None
    c.tls_set(ca_certs=str(pki / "ca.crt"), certfile=certfile, keyfile=keyfile,
              cert_reqs=ssl.CERT_REQUIRED)  # fmt: skip
    if user:
        c.username_pw_set(user, password)
    result: list[str] = []
    done = threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result.append(str(reason))
        done.set()

    c.on_connect = on_connect
    try:
        c.connect("127.0.0.1", port)
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__
    c.loop_start()
    done.wait(3)
    c.disconnect()
    c.loop_stop()
    return result[0] if result else "no answer"


def _passwd_tool() -> str:
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists():
        pytest.fail("mosquitto_passwd is missing (it ships with the mosquitto package)")
    return tool


def make_pki(out: Path) -> None:
    """ca.crt/key, server.crt/key (SAN 127.0.0.1, localhost), dev-a.crt/key (CN dev-a)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: Any, cert: x509.Certificate) -> None:
        (out / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))  # fmt: skip
        (out / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(cn: str, key: Any, ca_key: Any, ca_name: x509.Name, ca: bool,
              san: list[x509.GeneralName], usage: Any) -> x509.Certificate:  # fmt: skip
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1)))  # fmt: skip
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if ca:
            flags = dict.fromkeys(
                ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                 "encipher_only", "decipher_only"), False)  # fmt: skip
            usage_ca = x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, **flags
            )
            b = b.add_extension(usage_ca, critical=True)
        return b.sign(ca_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    write("ca", ca_key, issue("edgeadapt test CA", ca_key, ca_key, name("edgeadapt test CA"),
                              True, [], None))  # fmt: skip
    ca_name = name("edgeadapt test CA")
    server_san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    key = ec.generate_private_key(ec.SECP256R1())
    write("server", key, issue("localhost", key, ca_key, ca_name, False, server_san,
                               ExtendedKeyUsageOID.SERVER_AUTH))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    write("dev-a", key, issue("dev-a", key, ca_key, ca_name, False, [],
                              ExtendedKeyUsageOID.CLIENT_AUTH))  # fmt: skip
