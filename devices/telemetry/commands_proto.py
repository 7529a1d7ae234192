"""Signed command envelopes (backend -> device): Ed25519, expiry, nonce, replay protection.

Wire format (channel ``cmd``)::

    {"v": 1, "kid": "<key id>", "body": "<canonical JSON text>", "sig": "<base64 Ed25519>"}

The signature covers the exact UTF-8 bytes of ``body``, so nothing is re-serialized before
verification. ``body`` holds ``fleet``, ``device``, ``cmd``, ``args``, ``nonce`` (hex),
``issued`` and ``expires`` (unix s). A device accepts a command only if the signature verifies
under one of its fleet public keys, it is addressed to this fleet and device, it is within its
validity window (with a tolerated clock skew), its lifetime is at most ``max_ttl_s``, the
command and its arguments are known, and its nonce was never accepted before.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.errors import ConfigError
from runtime.untrusted import UntrustedInputError, loads_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

ENVELOPE_VERSION = 1
NONCE_PATTERN = re.compile(r"^[0-9a-f]{16,64}$")

#: A bundle source for ``update-bundle``: an http(s) URL or an absolute path, no whitespace.
SOURCE_PATTERN = re.compile(r"^(https?://|/)[^\s]{1,1000}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")

#: Known commands and the allowed values of each argument (a tuple of values or a pattern).
COMMANDS: dict[str, dict[str, tuple[str, ...] | re.Pattern[str]]] = {
    "reset-state": {},  # adaptation state back to its initial value (any family)
    "reset-belief": {},  # the name reset-state had when PEARL was the only family
    "set-mode": {"mode": ("safe", "adaptive")},
    "rebirth": {},
    "update-bundle": {"source": SOURCE_PATTERN, "sha256": SHA256_PATTERN},
}


def arg_allowed(allowed: tuple[str, ...] | re.Pattern[str], value: object) -> bool:
    """Whether ``value`` is an allowed value of a command argument."""
    if isinstance(allowed, re.Pattern):
        return isinstance(value, str) and allowed.fullmatch(value) is not None
    return value in allowed


class Reason:
    """Why a command was rejected (the ``reason`` of the rejection event and ack)."""

    MALFORMED = "malformed"
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_TARGET = "wrong_target"
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGS = "bad_args"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    TTL_TOO_LONG = "ttl_too_long"
    REPLAYED = "replayed"


@dataclass(frozen=True)
class Command:
    """A verified command."""

    name: str
    args: dict[str, str]
    fleet: str
    device: str
    nonce: str
    issued: float
    expires: float
    key_id: str


class CommandRejected(Exception):
    """A command failed verification; ``nonce``/``name`` are set when they could be read."""

    def __init__(
        self, reason: str, detail: str = "", nonce: str | None = None, name: str | None = None
    ):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.nonce = nonce
        self.name = name


def generate_keypair() -> tuple[bytes, bytes]:
    """A new fleet key pair as (private PEM, public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The fleet signing key from a PEM file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(_read(path), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def load_public_keys(paths: list[str] | list[Path]) -> dict[str, Ed25519PublicKey]:
    """Fleet public keys by key id, from PEM files."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys = {}
    for path in paths:
        key = load_pem_public_key(_read(path))
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{path}: not an Ed25519 public key")
        keys[key_id(key)] = key
    return keys


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short id of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_command(
    private_key: Ed25519PrivateKey,
    fleet: str,
    device: str,
    name: str,
    args: dict[str, str],
    *,
    now: float,
    ttl_s: float,
    nonce: str | None = None,
) -> tuple[bytes, Command]:
    """The wire payload of a signed command and the command it carries."""
    body = {
        "fleet": fleet,
        "device": device,
        "cmd": name,
        "args": args,
        "nonce": nonce or secrets.token_hex(16),
        "issued": now,
        "expires": now + ttl_s,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    kid = key_id(private_key.public_key())
    sig = base64.b64encode(private_key.sign(text.encode())).decode()
    envelope = {"v": ENVELOPE_VERSION, "kid": kid, "body": text, "sig": sig}
    return json.dumps(envelope, separators=(",", ":")).encode(), _command(body, kid)


def verify_command(
    payload: bytes,
    keys: dict[str, Ed25519PublicKey],
    fleet: str,
    device: str,
    *,
    now: float,
    max_ttl_s: float,
    skew_s: float,
    seen: Callable[[str], bool],
) -> Command:
    """The verified command, or raise :class:`CommandRejected` with the first failed check."""
    kid, body_text, sig = _envelope(payload)
    try:
        _check_signature(keys, kid, body_text, sig)
    except CommandRejected as exc:
        exc.nonce, exc.name = _peek(body_text)  # unverified, only echoed back in the ack
        raise
    body = _body(body_text)
    cmd = _command(body, kid)
    if cmd.fleet != fleet or cmd.device != device:
        raise _reject(Reason.WRONG_TARGET, f"for {cmd.fleet}/{cmd.device}", cmd)
    _check_args(cmd)
    _check_time(cmd, now, max_ttl_s, skew_s)
    if seen(cmd.nonce):
        raise _reject(Reason.REPLAYED, "nonce already used", cmd)
    return cmd


def _envelope(payload: bytes) -> tuple[str, str, str]:
    try:
        env = loads_json(payload)
    except UntrustedInputError as exc:
        raise CommandRejected(Reason.MALFORMED, f"envelope: {exc}") from None
    if not isinstance(env, dict) or env.get("v") != ENVELOPE_VERSION:
        raise CommandRejected(Reason.MALFORMED, "not a version-1 envelope")
    kid, body, sig = env.get("kid"), env.get("body"), env.get("sig")
    if not isinstance(body, str):
        raise CommandRejected(Reason.MALFORMED, "body is not a string")
    if not sig or not isinstance(sig, str) or not isinstance(kid, str):
        raise CommandRejected(Reason.UNSIGNED, "no signature")
    return kid, body, sig


def _check_signature(keys: dict[str, Ed25519PublicKey], kid: str, body: str, sig: str) -> None:
    from cryptography.exceptions import InvalidSignature

    key = keys.get(kid)
    if key is None:
        raise CommandRejected(Reason.UNKNOWN_KEY, f"key id {kid[:32]!r} is not a fleet key")
    try:
        key.verify(base64.b64decode(sig, validate=True), body.encode())
    except (InvalidSignature, ValueError):
        raise CommandRejected(Reason.BAD_SIGNATURE) from None


def _peek(text: str) -> tuple[str | None, str | None]:
    """Nonce and command name of an unverified body, when they look valid."""
    try:
        body = loads_json(text)
        nonce, name = body.get("nonce"), body.get("cmd")
    except (UntrustedInputError, AttributeError):
        return None, None
    ok = isinstance(nonce, str) and NONCE_PATTERN.match(nonce) and isinstance(name, str)
    return (nonce, name[:64]) if ok else (None, None)


def _body(text: str) -> dict[str, Any]:
    try:
        body = loads_json(text)
    except UntrustedInputError as exc:
        raise CommandRejected(Reason.MALFORMED, f"body: {exc}") from None
    types = {"fleet": str, "device": str, "cmd": str, "args": dict, "nonce": str}
    if not isinstance(body, dict) or any(not isinstance(body.get(k), t) for k, t in types.items()):
        raise CommandRejected(Reason.MALFORMED, "body fields missing or mistyped")
    if not all(_is_time(body.get(k)) for k in ("issued", "expires")):
        raise CommandRejected(Reason.MALFORMED, "issued/expires are not finite numbers")
    if not NONCE_PATTERN.match(body["nonce"]):
        raise CommandRejected(Reason.MALFORMED, "nonce is not 16-64 lowercase hex digits")
    return body


def _is_time(value: object) -> bool:
    """A finite unix time (s): an int or float that converts to a finite float."""
    if type(value) not in (int, float):
        return False
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except OverflowError:  # an int of hundreds of digits
        return False


def _command(body: dict[str, Any], kid: str) -> Command:
    return Command(
        name=body["cmd"],
        args=dict(body["args"]),
        fleet=body["fleet"],
        device=body["device"],
        nonce=body["nonce"],
        issued=float(body["issued"]),
        expires=float(body["expires"]),
        key_id=kid,
    )


def _check_args(cmd: Command) -> None:
    spec = COMMANDS.get(cmd.name)
    if spec is None:
        raise _reject(Reason.UNKNOWN_COMMAND, cmd.name[:64], cmd)
    if set(cmd.args) != set(spec) or not all(arg_allowed(spec[k], cmd.args[k]) for k in spec):
        raise _reject(Reason.BAD_ARGS, f"expected {spec}", cmd)


def _check_time(cmd: Command, now: float, max_ttl_s: float, skew_s: float) -> None:
    if now - skew_s > cmd.expires:
        raise _reject(Reason.EXPIRED, f"expired {now - cmd.expires:.1f}s ago", cmd)
    if cmd.issued > now + skew_s:
        raise _reject(Reason.NOT_YET_VALID, f"issued {cmd.issued - now:.1f}s in the future", cmd)
    if cmd.expires - cmd.issued > max_ttl_s:
        raise _reject(Reason.TTL_TOO_LONG, f"lifetime above {max_ttl_s:.0f}s", cmd)


def _reject(reason: str, detail: str, cmd: Command) -> CommandRejected:
    return CommandRejected(reason, detail, nonce=cmd.nonce, name=cmd.name)


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
