"""Ed25519 keys for bundle signatures (``edgeadapt keygen``), via the ``cryptography`` package.

The private key is written as unencrypted PKCS#8 PEM with mode 0600 (created with that mode, so
it is never readable by others, even briefly); the public key as SubjectPublicKeyInfo PEM next
to it (``PREFIX.pub``). Verification lives in :mod:`runtime.bundle` (device side).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runtime.bundle import sign_bytes
from runtime.errors import BundleError

PUBLIC_SUFFIX = ".pub"


def generate_keypair(prefix: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``PREFIX`` (private, 0600) and ``PREFIX.pub``."""
    private_path = Path(prefix)
    public_path = Path(f"{prefix}{PUBLIC_SUFFIX}")
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise BundleError(f"{path} exists; pass --force to overwrite the key")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_private(private_path, private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def sign_file(data_path: Path, key_path: str | Path, sig_path: Path) -> None:
    """Write the detached base64 Ed25519 signature of ``data_path`` to ``sig_path``."""
    key_path = Path(key_path)
    if not key_path.is_file():
        raise BundleError(f"{key_path}: signing key not found")
    try:
        signature = sign_bytes(data_path.read_bytes(), key_path.read_bytes())
    except ValueError as exc:
        raise BundleError(f"{key_path}: not a PEM private key ({exc})") from None
    sig_path.write_bytes(signature)


def _write_private(path: Path, data: bytes) -> None:
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # the umask cannot widen it, but make the mode explicit
