"""Remote update: fetch a bundle named by a (signed) backend command, check it, flash it.

Transport format
    A bundle travels as a **gzip-compressed tar archive of the bundle directory's contents**:
    members are the bundle's files at relative paths (``manifest.json``, ``manifest.sig``,
    ``step.onnx``, ...) with no leading directory. Only regular files and directories are
    accepted; absolute paths, ``..``, links and device files are refused. The command's
    ``sha256`` is the hex digest of the archive bytes (``edgeadapt device pack`` prints it).

    A source that is a local *directory* is accepted too (tests, a bundle copied by hand onto
    the device); its ``sha256`` is then the digest of its ``manifest.json``, which pins every
    file through the manifest's own hashes.

Sources: ``http://`` or ``https://`` URLs (downloaded with urllib, size-capped), ``file://``
URLs, or local paths. The archive is downloaded and unpacked under ``DIR/incoming/`` (the
device's own storage) and removed afterwards. The signature is still checked by the flash with
the device's key: the sha256 only ties the download to the command.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from devices.flash import FlashResult, flash_with_lock_held, manifest_sha256, recover, refusal
from devices.slots import device_lock, read_device_info
from runtime.bundle import sha256_file

log = logging.getLogger(__name__)

INCOMING_DIR = "incoming"
#: Largest archive (bytes) a device downloads or unpacks.
MAX_BYTES = 512 * 1024 * 1024
_CHUNK = 1 << 20
sha256_of = sha256_file  # the bundle's own file hashing, under this module's name


class FetchError(Exception):
    """Internal: fetching or unpacking failed; the message is the reason reported."""


def remote_update(
    device_root: str | Path,
    source: str,
    sha256: str,
    pubkey: str | Path | None = None,
    *,
    timeout_s: float = 60.0,
    health_timeout_s: float | None = None,
) -> FlashResult:
    """Fetch ``source``, check its ``sha256``, flash it; the result is what the device reports.

    ``timeout_s`` bounds each network operation (s). Never raises for a bad download or a
    refused bundle (the result says why and the device's ``last_failure`` records it); raises
    ``DeviceError`` only when the device root is unusable or busy.
    """
    start = time.perf_counter()
    root = Path(device_root)
    read_device_info(root)
    with device_lock(root):
        recover(root)
        incoming = root / INCOMING_DIR
        shutil.rmtree(incoming, ignore_errors=True)  # leftovers of a killed update
        incoming.mkdir()
        try:
            bundle = fetch_bundle(source, _normalize_digest(sha256), incoming, timeout_s)
            return flash_with_lock_held(
                bundle, root, pubkey, health_timeout_s, source=source, start=start
            )
        except FetchError as exc:
            return refusal(root, "fetch", str(exc), source, start)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)


def fetch_bundle(source: str, sha256: str, workdir: Path, timeout_s: float = 60.0) -> Path:
    """A local bundle directory for ``source`` whose digest equals ``sha256``.

    Raises :class:`FetchError` naming what went wrong (unreachable, too large, digest mismatch,
    not a safe archive).
    """
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        archive = _download(source, workdir / "bundle.tar.gz", timeout_s)
    elif parsed.scheme == "file":
        archive = Path(urllib.request.url2pathname(parsed.path))
    elif parsed.scheme in ("", "localhost") or len(parsed.scheme) == 1:  # "C:" on Windows
        archive = Path(source)
    else:
        raise FetchError(f"unsupported source {parsed.scheme!r}: use http(s)://, file:// or a path")
    if archive.is_dir():
        return _checked_directory(archive, sha256, workdir)
    if not archive.is_file():
        raise FetchError(f"{source}: not found")
    digest = sha256_of(archive)
    if digest != sha256:
        raise FetchError(f"sha256 mismatch: expected {sha256}, got {digest}")
    return unpack_bundle(archive, workdir / "bundle")


def pack_bundle(bundle_dir: str | Path, out: str | Path) -> str:
    """Write ``bundle_dir`` as a transport archive at ``out``; returns its sha256 hex digest."""
    bundle_dir, out = Path(bundle_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
            tar.add(path, arcname=path.relative_to(bundle_dir).as_posix(), recursive=False)
    return sha256_of(out)


def unpack_bundle(archive: Path, dest: Path, max_bytes: int = MAX_BYTES) -> Path:
    """Safely unpack a transport archive into ``dest`` (created); returns ``dest``."""
    dest.mkdir(parents=True)
    total = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                target = dest / _safe_name(member)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                total += member.size
                if total > max_bytes:
                    raise FetchError(f"archive unpacks to more than {max_bytes} bytes")
                _extract_file(tar, member, target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise FetchError(f"not a readable bundle archive ({type(exc).__name__}: {exc})") from None
    return dest


def _download(url: str, out: Path, timeout_s: float, max_bytes: int = MAX_BYTES) -> Path:
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, out.open("wb") as f:
            while chunk := resp.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"{url}: larger than {max_bytes} bytes")
                f.write(chunk)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"{url}: download failed ({reason})") from None
    log.info("downloaded %s (%d bytes)", url, size)
    return out


def _checked_directory(bundle_dir: Path, sha256: str, workdir: Path) -> Path:
    """Copy a bundle directory into ``workdir`` and check the copy's manifest digest.

    Checking the copy means the flash reads exactly the bytes that were checked, even if the
    source changes meanwhile.
    """
    copy = workdir / "bundle"
    try:
        shutil.copytree(bundle_dir, copy, symlinks=True)
        digest = manifest_sha256(copy)
    except OSError as exc:
        raise FetchError(f"{bundle_dir}: cannot read the bundle ({exc})") from None
    if digest != sha256:
        raise FetchError(f"sha256 mismatch: manifest.json is {digest}, expected {sha256}")
    return copy


def _safe_name(member: tarfile.TarInfo) -> Path:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise FetchError(f"archive member {member.name!r} escapes the bundle directory")
    if not (member.isfile() or member.isdir()):
        raise FetchError(f"archive member {member.name!r} is not a regular file or directory")
    return Path(*name.parts)


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise FetchError(f"archive member {member.name!r} has no data")
    target.parent.mkdir(parents=True, exist_ok=True)
    with source, target.open("wb") as f:
        shutil.copyfileobj(source, f, _CHUNK)


def _normalize_digest(sha256: str) -> str:
    digest = sha256.strip().lower().removeprefix("sha256:")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise FetchError(f"not a sha256 hex digest: {sha256!r}")
    return digest
