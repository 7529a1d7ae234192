"""The device root: a directory standing in for a device's storage, with A/B bundle slots.

Layout::

    DIR/
      device.json     provisioning record: profile name, whether a public key is configured
      profile.yaml    copy of the device profile (the device does not need the repository)
      device.pub      optional Ed25519 public key; when present, unsigned bundles are refused
      slots/A/        a bundle (only the manifest's files, manifest.json and manifest.sig)
      slots/B/
      active.json     the pointer: {"slot": "A"}; replaced atomically, the only truth about
                      which slot is active
      state.json      per-slot status, health results, last failure and recent history
      .lock           flock() held by a flash or rollback in progress

Every write of a metadata file goes to a temporary file, is fsynced, renamed over the target and
the directory is fsynced (:func:`atomic_write_bytes`), so a power loss or SIGKILL leaves either
the old or the new file, never a torn one. Invariants kept by ``devices.flash``:

- the pointer only ever names a slot whose state is ``good`` (verified and passed the health
  gate on this device);
- a slot is marked ``staging`` (durably) before its contents are touched, so state never claims
  a bundle that is half written.

:func:`active_bundle` is what a runner calls at start: it follows the pointer and re-verifies the
slot (hashes, and the signature when the device has a key) before returning its path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from devices.profiles import load_profile
from runtime.bundle import MANIFEST_FILE, load_public_key, parse_manifest, verify_bundle
from runtime.errors import BundleError, EdgeadaptError

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)

SlotName = Literal["A", "B"]
SLOTS: tuple[SlotName, SlotName] = ("A", "B")
#: empty: never written; staging: being written (contents untrusted); staged: written and
#: verified, health gate pending; good: verified and passed the health gate; failed: see reason.
SlotStatus = Literal["empty", "staging", "staged", "good", "failed"]
EventKind = Literal["provision", "flash", "rollback", "failure", "recover"]

DEVICE_FILE = "device.json"
PROFILE_FILE = "profile.yaml"
PUBKEY_FILE = "device.pub"
POINTER_FILE = "active.json"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
SLOTS_DIR = "slots"
TMP_SUFFIX = ".tmp"
SCHEMA_VERSION = 1
HISTORY_LEN = 20
#: How long (s) to wait for the device lock before reporting the device busy.
LOCK_WAIT_S = 10.0
#: Lock descriptors this process holds (closed in forked children, see close_inherited_locks).
_HELD_LOCKS: set[int] = set()


class DeviceError(EdgeadaptError):
    """A device root is missing, not provisioned, busy, or has no usable bundle."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceInfo(_Record):
    """``device.json``: written once at provisioning."""

    schema_version: int = SCHEMA_VERSION
    profile: str = Field(description="name of the device profile (copied to profile.yaml)")
    has_pubkey: bool = Field(description="device.pub is present: unsigned bundles are refused")
    created: str = Field(description="ISO 8601 UTC time of provisioning")


class HealthSummary(_Record):
    """What the health gate measured for a slot (see ``devices.health``)."""

    passed: bool
    max_abs_err: float | None = None
    step_us_median: float | None = Field(None, description="median step latency (µs)")
    rss_mb: float | None = Field(None, description="peak resident memory of the gate (MB)")
    duration_s: float | None = None
    reasons: list[str] = Field(default_factory=list)


class SlotRecord(_Record):
    """The state of one slot."""

    status: SlotStatus = "empty"
    bundle_id: str | None = None
    version: str | None = None
    manifest_sha256: str | None = Field(None, description="sha256 of the slot's manifest.json")
    updated: str | None = None
    activated: str | None = Field(None, description="last time the pointer switched to it")
    health: HealthSummary | None = None
    reason: str | None = Field(None, description="why the slot is failed")


class Failure(_Record):
    """The last thing that went wrong on this device."""

    time: str
    stage: str = Field(description="verify, compat, fetch, stage, health, switch, rollback, ...")
    reason: str
    source: str | None = Field(None, description="the bundle path or URL involved")


class Event(_Record):
    """One line of the device's recent history."""

    time: str
    kind: EventKind
    slot: SlotName | None = None
    detail: str = ""


class DeviceState(_Record):
    """``state.json``: per-slot status, the last failure and the recent history."""

    schema_version: int = SCHEMA_VERSION
    slots: dict[SlotName, SlotRecord] = Field(
        default_factory=lambda: {s: SlotRecord() for s in SLOTS}
    )
    last_failure: Failure | None = None
    history: list[Event] = Field(default_factory=list)

    def with_slot(self, slot: SlotName, record: SlotRecord) -> DeviceState:
        """A copy with one slot's record replaced."""
        return self.model_copy(update={"slots": {**self.slots, slot: record}})

    def with_event(self, event: Event) -> DeviceState:
        """A copy with ``event`` appended (history keeps the last HISTORY_LEN events)."""
        return self.model_copy(update={"history": [*self.history, event][-HISTORY_LEN:]})

    def with_failure(self, failure: Failure, slot: SlotName | None = None) -> DeviceState:
        """A copy recording ``failure`` as the last one and in the history."""
        event = Event(time=failure.time, kind="failure", slot=slot, detail=failure.reason)
        return self.model_copy(update={"last_failure": failure}).with_event(event)


# -- public API ------------------------------------------------------------------------------
def now_iso() -> str:
    """The current UTC time, ISO 8601 with seconds."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def other_slot(slot: SlotName | None) -> SlotName:
    """The slot a flash writes to: the one that is not active (A when none is)."""
    return "B" if slot == "A" else "A"


def slot_dir(root: Path, slot: SlotName) -> Path:
    """Directory of one slot."""
    return root / SLOTS_DIR / slot


def is_provisioned(root: Path) -> bool:
    """True when ``root`` has a device record."""
    return (root / DEVICE_FILE).is_file()


def read_device_info(root: Path) -> DeviceInfo:
    """The provisioning record, with a clear error when ``root`` is not a device root."""
    path = root / DEVICE_FILE
    if not path.is_file():
        raise DeviceError(
            f"{root}: not a device root (no {DEVICE_FILE}); "
            f"provision it with `edgeadapt device init {root} --profile NAME`"
        )
    return _parse(path, DeviceInfo)


def pubkey_path(root: Path) -> Path | None:
    """The device's public key file, or None when the device accepts unsigned bundles."""
    path = root / PUBKEY_FILE
    return path if path.is_file() else None


def read_state(root: Path) -> DeviceState:
    """The device state (all slots empty when no state was written yet)."""
    path = root / STATE_FILE
    return _parse(path, DeviceState) if path.is_file() else DeviceState()


def write_state(root: Path, state: DeviceState) -> None:
    """Durably replace ``state.json``."""
    atomic_write_bytes(root / STATE_FILE, _dump(state))


def read_active(root: Path) -> SlotName | None:
    """The slot the pointer names, or None when nothing was ever activated."""
    path = root / POINTER_FILE
    if not path.is_file():
        return None
    try:
        slot = json.loads(path.read_bytes())["slot"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DeviceError(f"{path}: corrupt active-slot pointer ({exc})") from None
    if slot not in SLOTS:
        raise DeviceError(f"{path}: pointer names unknown slot {slot!r}")
    return slot


def write_active(root: Path, slot: SlotName) -> None:
    """Switch the pointer to ``slot`` in one atomic rename."""
    payload = {"slot": slot, "switched": now_iso()}
    atomic_write_bytes(root / POINTER_FILE, json.dumps(payload).encode() + b"\n")


def active_bundle(root: str | Path, *, verify: bool = True) -> Path:
    """The directory of the active, verified bundle: what a field runner loads.

    Follows the pointer and, with ``verify``, re-checks every file hash, the runtime version and
    the signature (required when the device has a public key). Raises :class:`DeviceError`
    naming the reason when there is no usable bundle.
    """
    root = Path(root)
    read_device_info(root)
    slot = read_active(root)
    if slot is None:
        raise DeviceError(f"{root}: no active bundle (nothing flashed yet)")
    path = slot_dir(root, slot)
    if verify:
        reasons = verify_slot(root, slot)
        if reasons:
            raise DeviceError(f"{root}: active slot {slot} fails verification: {reasons[0]}")
    return path


def verify_slot(root: Path, slot: SlotName) -> list[str]:
    """Why the bundle in ``slot`` does not verify under the device's key; empty when it does."""
    key = pubkey_path(root)
    report = verify_bundle(slot_dir(root, slot), pubkey=key, require_signature=key is not None)
    return list(report.reasons)


@contextlib.contextmanager
def device_lock(root: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the device's exclusive lock (released by the kernel if the holder dies).

    Waits up to ``wait_s`` (s) for another holder (e.g. the health-gate child of a flash that
    was just killed, until it dies too) before raising :class:`DeviceError` "busy".
    """
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _acquire(fd, root, wait_s)
        _HELD_LOCKS.add(fd)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)


def close_inherited_locks() -> None:
    """In a forked child: drop the copies of the parent's lock descriptors.

    A flock belongs to the open file, which a fork shares; without this a forked helper would
    keep the device locked after its parent was killed.
    """
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content.

    Write a temporary file in the same directory, fsync it, rename it over ``path`` and fsync
    the directory so the rename itself is durable.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that entries created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_tmp(root: Path) -> None:
    """Delete temporary files a killed writer left in the device root."""
    for tmp in root.glob(f"*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def init_device(
    root: str | Path,
    profile: str | Path,
    pubkey: str | Path | None = None,
    *,
    force: bool = False,
) -> DeviceInfo:
    """Provision a device root: record the profile and, optionally, the trusted public key.

    With a key, every later flash refuses bundles that are unsigned or signed by another key.
    Re-provisioning an existing root needs ``force``; slots and state are kept.
    """
    root = Path(root)
    if is_provisioned(root) and not force:
        raise DeviceError(f"{root}: already provisioned (use --force to re-provision)")
    prof = load_profile(profile)
    key_bytes = Path(pubkey).read_bytes() if pubkey is not None else None
    if key_bytes is not None:
        load_public_key(key_bytes)  # refuse a file that is not an Ed25519 public key
    for slot in SLOTS:
        slot_dir(root, slot).mkdir(parents=True, exist_ok=True)
    with device_lock(root):
        profile_yaml = yaml.safe_dump(prof.model_dump(mode="json"), sort_keys=False)
        atomic_write_bytes(root / PROFILE_FILE, profile_yaml.encode())
        if key_bytes is not None:
            atomic_write_bytes(root / PUBKEY_FILE, key_bytes)
        elif (root / PUBKEY_FILE).exists():
            (root / PUBKEY_FILE).unlink()
            fsync_dir(root)
        info = DeviceInfo(profile=prof.name, has_pubkey=key_bytes is not None, created=now_iso())
        atomic_write_bytes(root / DEVICE_FILE, _dump(info))
        state = read_state(root).with_event(
            Event(time=info.created, kind="provision", detail=f"profile {prof.name}")
        )
        write_state(root, state)
    log.info("provisioned %s with profile %s", root, prof.name)
    return info


def device_profile_path(root: Path) -> Path:
    """The device's own copy of its profile."""
    return root / PROFILE_FILE


def device_status(root: str | Path, *, verify: bool = True) -> dict[str, object]:
    """What is on the device, for ``edgeadapt device status --json`` and telemetry.

    ``active_slot`` comes from the pointer (the one source of truth). Each slot lists its
    recorded state plus, with ``verify``, whether its files verify now (``verified``) and the
    bundle id and version read from the slot's own manifest (``on_disk``).
    """
    root = Path(root)
    info = read_device_info(root)
    state = read_state(root)
    active = read_active(root)
    slots = {
        slot: _slot_status(root, slot, state.slots[slot], slot == active, verify) for slot in SLOTS
    }
    return {
        "device_root": str(root),
        "profile": info.profile,
        "pubkey": info.has_pubkey,
        "active_slot": active,
        "slots": slots,
        "last_failure": state.last_failure.model_dump() if state.last_failure else None,
        "history": [e.model_dump() for e in state.history],
    }


def write_json_durably(path: Path, record: BaseModel) -> None:
    """Atomically write a pydantic record as indented JSON."""
    atomic_write_bytes(path, _dump(record))


# -- helpers ---------------------------------------------------------------------------------
def _acquire(fd: int, root: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise DeviceError(f"{root}: busy (another flash or rollback is running)")
        time.sleep(0.02)


def _slot_status(
    root: Path, slot: SlotName, record: SlotRecord, active: bool, verify: bool
) -> dict[str, object]:
    out: dict[str, object] = {"active": active, **record.model_dump()}
    if not verify:
        return out
    reasons = verify_slot(root, slot) if record.status != "empty" else ["empty"]
    out["verified"] = not reasons
    out["verify_reason"] = reasons[0] if reasons else None
    out["on_disk"] = _manifest_identity(slot_dir(root, slot))
    return out


def _manifest_identity(path: Path) -> dict[str, str] | None:
    """Bundle id, version and manifest sha256 read from a slot's own files (None if unreadable)."""
    try:
        raw = (path / MANIFEST_FILE).read_bytes()
        manifest = parse_manifest(raw)
    except (OSError, BundleError):
        return None
    return {
        "bundle_id": manifest.bundle_id,
        "version": manifest.version,
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
    }


def _dump(record: BaseModel) -> bytes:
    return record.model_dump_json(indent=2).encode() + b"\n"


def _parse(path: Path, model: type[R]) -> R:
    try:
        return model.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first.get("loc", ())) or "<root>"
        raise DeviceError(f"{path}: corrupt ({key}: {first.get('msg')})") from None
