"""Crash-safe A/B flashing and rollback of a device root (see ``devices.slots`` for the layout).

:func:`flash` runs, under the device lock:

1. ``verify``  - hashes of every file and the signature (required when the device has a key);
2. ``compat``  - the bundle's profile and architecture match the device's, its opset is one the
   device runs, the runtime is new enough;
3. ``stage``   - the inactive slot is marked ``staging``, wiped, written file by file with fsync,
   then re-verified and marked ``staged``;
4. ``health``  - the health gate runs in a child process (``devices.health``) with a timeout;
5. ``switch``  - the slot is marked ``good``, the pointer is switched in one atomic rename, and the
   activation is recorded.

Any failure leaves the pointer where it was and records the stage and reason as the device's
``last_failure``; refusals are returned as a :class:`FlashResult`, not raised, so a remote update
can report them. A flash killed at any instant leaves the pointer on a verified bundle: the old
one, or the new one once the switch happened. The next flash or rollback cleans up (marks the
interrupted slot failed, removes temporary files).

Crash injection for tests: when the environment variable ``EDGEADAPT_FLASH_CRASH_AT`` names one
of :data:`CRASH_POINTS` the process SIGKILLs itself at that point.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

from devices.health import StartMethod, run_health_gate
from devices.profiles import DeviceProfile, load_profile
from devices.slots import (
    SLOTS,
    DeviceError,
    Event,
    EventKind,
    Failure,
    HealthSummary,
    SlotName,
    SlotRecord,
    device_lock,
    device_profile_path,
    fsync_dir,
    now_iso,
    other_slot,
    pubkey_path,
    read_active,
    read_device_info,
    read_state,
    remove_stale_tmp,
    slot_dir,
    verify_slot,
    write_active,
    write_state,
)
from runtime import RUNTIME_VERSION
from runtime.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Manifest,
    check_compatible,
    load_public_key,
    verify_bundle,
)
from runtime.errors import EdgeadaptError
from runtime.graphio import graph_io_problems

log = logging.getLogger(__name__)

FlashStage = Literal[
    "verify", "compat", "fetch", "stage", "health", "switch", "rollback", "done", "unchanged"
]
CRASH_ENV = "EDGEADAPT_FLASH_CRASH_AT"
#: Device-built artefacts (TensorRT engines), under the device root.
CACHE_DIR = "cache"
#: Named points where a test may ask the flashing process to SIGKILL itself. ``copy-N`` (the
#: N-th file written, from 1) is accepted as well.
CRASH_POINTS = (
    "verified",
    "marked-staging",
    "wiped",
    "copied",
    "staged",
    "health-running",
    "health-passed",
    "switched",
    "committed",
)


@dataclass(frozen=True)
class FlashResult:
    """Outcome of a flash, rollback or remote update; ``to_event()`` is what a device reports."""

    ok: bool
    stage: FlashStage
    reason: str | None
    source: str
    slot: SlotName | None = None
    active_slot: SlotName | None = None
    previous_slot: SlotName | None = None
    bundle_id: str | None = None
    version: str | None = None
    health: HealthSummary | None = None
    duration_s: float = 0.0

    def to_event(self) -> dict[str, object]:
        """A JSON-able dict for a telemetry event (``type`` is ``update_ok``/``update_failed``)."""
        out = asdict(self)
        out["health"] = self.health.model_dump() if self.health else None
        out["type"] = "update_ok" if self.ok else "update_failed"
        return out


class _GateOptions(NamedTuple):
    timeout_s: float | None
    start_method: StartMethod


class _Refused(Exception):
    """Internal: a flash step failed for ``reason``; unwinds to :func:`flash`."""

    def __init__(self, stage: FlashStage, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


# -- public API ------------------------------------------------------------------------------
def flash(
    bundle_dir: str | Path,
    device_root: str | Path,
    pubkey: str | Path | None = None,
    *,
    health_timeout_s: float | None = None,
    health_start: StartMethod = "spawn",
) -> FlashResult:
    """Flash ``bundle_dir`` into the inactive slot of ``device_root`` and activate it.

    ``pubkey`` may name the key to check the signature with when the device has none
    configured (the signature is then required); when the device has a key, ``pubkey`` must be
    that same key. ``health_timeout_s`` overrides the profile's gate timeout (s);
    ``health_start`` is how the gate child starts (see ``devices.health.run_health_gate``). Raises
    :class:`DeviceError` only when the device root itself is unusable or busy.
    """
    root = Path(device_root)
    read_device_info(root)
    with device_lock(root):
        recover(root)
        return flash_with_lock_held(
            Path(bundle_dir), root, pubkey, health_timeout_s, health_start=health_start
        )


def flash_with_lock_held(
    src: Path,
    root: Path,
    pubkey: str | Path | None = None,
    health_timeout_s: float | None = None,
    *,
    source: str | None = None,
    start: float | None = None,
    health_start: StartMethod = "spawn",
) -> FlashResult:
    """:func:`flash` for a caller that already holds the device lock (e.g. a remote update).

    ``source`` is what the result and the failure record name (default: ``src``); ``start`` is
    the ``time.perf_counter()`` the duration counts from.
    """
    start = time.perf_counter() if start is None else start
    source = str(src) if source is None else source
    try:
        gate = _GateOptions(health_timeout_s, health_start)
        result = _flash_steps(src, root, pubkey, gate, start)
    except _Refused as refused:
        return refusal(root, refused.stage, refused.reason, source, start)
    return replace(result, source=source)


def refusal(root: Path, stage: FlashStage, reason: str, source: str, start: float) -> FlashResult:
    """Record a failed update as the device's last failure and describe it as a result."""
    _record_failure(root, stage, reason, source)
    active = read_active(root)
    return FlashResult(
        ok=False,
        stage=stage,
        reason=reason,
        source=source,
        active_slot=active,
        previous_slot=active,
        duration_s=time.perf_counter() - start,
    )


def rollback(device_root: str | Path) -> FlashResult:
    """Switch the pointer back to the other slot if it holds a good bundle that still verifies."""
    start = time.perf_counter()
    root = Path(device_root)
    read_device_info(root)
    with device_lock(root):
        recover(root)
        active = read_active(root)
        target = other_slot(active)
        record = read_state(root).slots[target]
        reason = _rollback_refusal(root, active, target, record)
        if reason is not None:
            _record_failure(root, "rollback", reason, str(root))
            raise DeviceError(f"rollback refused: {reason}")
        write_active(root, target)
        _commit(root, target, f"rollback from {active} to {target}", "rollback")
    log.info("rolled back %s: slot %s -> %s", root, active, target)
    return FlashResult(
        ok=True,
        stage="done",
        reason=None,
        source=str(root),
        slot=target,
        active_slot=target,
        previous_slot=active,
        bundle_id=record.bundle_id,
        version=record.version,
        health=record.health,
        duration_s=time.perf_counter() - start,
    )


def check_compatibility(
    manifest: Manifest, profile: DeviceProfile, runtime_version: str = RUNTIME_VERSION
) -> list[str]:
    """Why ``manifest`` cannot run on a device with ``profile``; empty when it can."""
    reasons: list[str] = []
    if manifest.profile is not None and manifest.profile != profile.name:
        reasons.append(_profile_mismatch(manifest.profile, profile))
    if manifest.opset > profile.max_opset:
        reasons.append(
            f"bundle uses ONNX opset {manifest.opset}, {profile.name} runs opset <= "
            f"{profile.max_opset}"
        )
    runtime_reason = check_compatible(manifest, runtime_version)
    if runtime_reason:
        reasons.append(runtime_reason)
    return reasons


def recover(root: Path) -> None:
    """Finish or undo what a killed flash left behind: call with the device lock held.

    Removes temporary files. An active slot still ``staged`` (killed between the pointer switch
    and the commit; its health gate passed) is committed as good. A non-active slot left
    ``staging`` or ``staged`` is marked failed and the interruption recorded as the last failure.
    """
    remove_stale_tmp(root)
    active = read_active(root)
    state = read_state(root)
    if active is not None and _awaiting_commit(state.slots[active]):
        _commit(root, active, f"completed the interrupted flash into slot {active}", "recover")
        state = read_state(root)
    for slot in SLOTS:
        record = state.slots[slot]
        if slot == active or record.status not in ("staging", "staged"):
            continue
        reason = f"flash of {record.bundle_id or 'a bundle'} into slot {slot} was interrupted"
        update = {"status": "failed", "reason": reason, "updated": now_iso()}
        failure = Failure(time=now_iso(), stage="interrupted", reason=reason)
        state = state.with_slot(slot, record.model_copy(update=update)).with_failure(failure, slot)
        log.warning("%s: %s", root, reason)
    if state != read_state(root):
        write_state(root, state)


def boot(device_root: str | Path) -> Path:
    """What a field runner calls at start: the verified bundle to run, after recovery.

    Takes the device lock, finishes an interrupted flash (:func:`recover`), and returns the
    active slot's directory if it verifies. If it no longer does (storage corruption) and the
    other slot holds a good bundle that verifies, the pointer is switched back to it and the
    failure recorded. Raises :class:`DeviceError` when no slot can run.
    """
    root = Path(device_root)
    read_device_info(root)
    with device_lock(root):
        recover(root)
        active = read_active(root)
        if active is None:
            raise DeviceError(f"{root}: no active bundle (nothing flashed yet)")
        problems = verify_slot(root, active)
        if not problems:
            return slot_dir(root, active)
        return _fall_back(root, active, f"active slot {active} fails verification: {problems[0]}")


def manifest_sha256(bundle_dir: Path) -> str:
    """sha256 of a bundle's ``manifest.json``: it pins every file of the bundle."""
    return hashlib.sha256((bundle_dir / MANIFEST_FILE).read_bytes()).hexdigest()


# -- the flash steps -------------------------------------------------------------------------
def _flash_steps(
    src: Path, root: Path, pubkey: str | Path | None, gate: _GateOptions, start: float
) -> FlashResult:
    key = _effective_key(root, pubkey)
    manifest = _verify_source(src, key)
    profile = load_profile(device_profile_path(root))
    reasons = check_compatibility(manifest, profile)
    if reasons:
        raise _Refused("compat", "incompatible bundle: " + "; ".join(reasons))
    _crash_point("verified")
    active = read_active(root)
    digest = manifest_sha256(src)
    if _already_active(root, active, digest):
        return _result_unchanged(src, active, manifest, start)
    target = other_slot(active)
    _stage(src, root, target, manifest, digest)
    health = _health(root, target, profile, gate)
    _activate(root, target, manifest, health)
    log.info("flashed %s %s into slot %s of %s", manifest.bundle_id, manifest.version, target, root)
    return FlashResult(
        ok=True,
        stage="done",
        reason=None,
        source=str(src),
        slot=target,
        active_slot=target,
        previous_slot=active,
        bundle_id=manifest.bundle_id,
        version=manifest.version,
        health=health,
        duration_s=time.perf_counter() - start,
    )


def _effective_key(root: Path, pubkey: str | Path | None) -> Path | None:
    """The key bundles must be signed with: the device's; or ``pubkey`` when it has none."""
    device_key = pubkey_path(root)
    if pubkey is None or device_key is None:
        return device_key if device_key is not None else (Path(pubkey) if pubkey else None)
    if _raw_key(Path(pubkey)) != _raw_key(device_key):
        raise _Refused(
            "verify", f"--pubkey {pubkey} is not the key the device was provisioned with"
        )
    return device_key


def _verify_source(src: Path, key: Path | None) -> Manifest:
    if not src.is_dir():
        raise _Refused("verify", f"{src}: not a bundle directory")
    try:
        report = verify_bundle(src, pubkey=key, require_signature=key is not None)
    except EdgeadaptError as exc:
        raise _Refused("verify", f"bundle refused: {exc}") from None
    # A runtime that is too old is a compatibility matter, reported by the compat stage.
    too_new = check_compatible(report.manifest) if report.manifest is not None else None
    reasons = [r for r in report.reasons if r != too_new]
    if reasons or report.manifest is None:
        raise _Refused("verify", "bundle refused: " + "; ".join(reasons))
    io_problems = graph_io_problems(src, report.manifest)
    if io_problems:
        raise _Refused("verify", "bundle refused: " + "; ".join(io_problems))
    return report.manifest


def _stage(src: Path, root: Path, slot: SlotName, manifest: Manifest, digest: str) -> None:
    """Write the bundle into ``slot`` durably, re-verify it there and mark it ``staged``."""
    ident = {"bundle_id": manifest.bundle_id, "version": manifest.version}
    _set_slot(root, slot, SlotRecord(status="staging", manifest_sha256=digest, **ident))
    _crash_point("marked-staging")
    dest = slot_dir(root, slot)
    _wipe(dest)
    _crash_point("wiped")
    try:
        _copy_bundle(src, dest, manifest)
    except OSError as exc:
        _set_slot(root, slot, SlotRecord(status="failed", reason=str(exc), **ident))
        raise _Refused("stage", f"writing slot {slot} failed: {exc}") from None
    _crash_point("copied")
    problems = verify_slot(root, slot)
    if problems or manifest_sha256(dest) != digest:
        reason = f"slot {slot} does not verify after writing: {(problems or ['manifest'])[0]}"
        _set_slot(root, slot, SlotRecord(status="failed", reason=reason, **ident))
        raise _Refused("stage", reason)
    _set_slot(root, slot, SlotRecord(status="staged", manifest_sha256=digest, **ident))
    _crash_point("staged")


def _health(
    root: Path, slot: SlotName, profile: DeviceProfile, gate: _GateOptions
) -> HealthSummary:
    health = run_health_gate(
        slot_dir(root, slot),
        device_profile_path(root),
        pubkey_path(root),
        gate.timeout_s if gate.timeout_s is not None else profile.health_timeout_s,
        cache_dir=root / CACHE_DIR,
        on_started=lambda: _crash_point("health-running"),
        start_method=gate.start_method,
    )
    if not health.passed:
        reason = "health gate failed: " + "; ".join(health.reasons or ["no reason given"])
        record = read_state(root).slots[slot]
        _set_slot(
            root,
            slot,
            record.model_copy(update={"status": "failed", "reason": reason, "health": health}),
        )
        raise _Refused("health", reason)
    return health


def _activate(root: Path, slot: SlotName, manifest: Manifest, health: HealthSummary) -> None:
    """Record the passed gate, switch the pointer to ``slot``, then mark it good (commit).

    Killed between the switch and the commit, the pointer names a ``staged`` slot whose health
    gate passed: :func:`recover` completes the commit.
    """
    record = read_state(root).slots[slot]
    _set_slot(root, slot, record.model_copy(update={"health": health}))
    _crash_point("health-passed")
    try:
        write_active(root, slot)
    except OSError as exc:
        raise _Refused("switch", f"switching the pointer failed: {exc}") from None
    _crash_point("switched")
    _commit(root, slot, f"flashed {manifest.bundle_id} {manifest.version}", "flash")
    _crash_point("committed")


# -- helpers ---------------------------------------------------------------------------------
def _copy_bundle(src: Path, dest: Path, manifest: Manifest) -> None:
    """Copy only what the manifest covers (plus manifest and signature), fsyncing each file."""
    names = sorted(manifest.files)
    names += [MANIFEST_FILE] + ([SIGNATURE_FILE] if (src / SIGNATURE_FILE).is_file() else [])
    dirs = {dest}
    for i, rel in enumerate(names, start=1):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        dirs.add(target.parent)
        _copy_file_durably(src / rel, target)
        _crash_point(f"copy-{i}")
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


def _copy_file_durably(src: Path, dest: Path) -> None:
    with src.open("rb") as fin, dest.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _wipe(dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    fsync_dir(dest.parent)


def _set_slot(root: Path, slot: SlotName, record: SlotRecord) -> None:
    record = record.model_copy(update={"updated": now_iso()})
    write_state(root, read_state(root).with_slot(slot, record))


def _fall_back(root: Path, active: SlotName, reason: str) -> Path:
    """Switch from a broken active slot to the other one if it is good and verifies."""
    fallback = other_slot(active)
    refused = _rollback_refusal(root, active, fallback, read_state(root).slots[fallback])
    if refused is not None:
        _record_failure(root, "boot", f"{reason}; no fallback: {refused}", str(root))
        raise DeviceError(f"{root}: {reason}; no fallback ({refused})")
    _mark_failed(root, active, reason)
    write_active(root, fallback)
    _commit(root, fallback, f"{reason}; fell back to slot {fallback}", "rollback")
    _record_failure(root, "boot", f"{reason}; fell back to slot {fallback}", str(root))
    return slot_dir(root, fallback)


def _commit(root: Path, slot: SlotName, detail: str, kind: EventKind) -> None:
    """Mark the (now active) ``slot`` good and record the activation in the history."""
    state = read_state(root)
    update = {"status": "good", "activated": now_iso(), "reason": None}
    record = state.slots[slot].model_copy(update=update)
    event = Event(time=now_iso(), kind=kind, slot=slot, detail=detail)
    write_state(root, state.with_slot(slot, record).with_event(event))


def _awaiting_commit(record: SlotRecord) -> bool:
    return record.status == "staged" and record.health is not None and record.health.passed


def _mark_failed(root: Path, slot: SlotName, reason: str) -> None:
    update = {"status": "failed", "reason": reason}
    _set_slot(root, slot, read_state(root).slots[slot].model_copy(update=update))


def _record_failure(root: Path, stage: str, reason: str, source: str) -> None:
    failure = Failure(time=now_iso(), stage=stage, reason=reason, source=source)
    write_state(root, read_state(root).with_failure(failure))
    log.warning("%s: %s failed: %s", root, stage, reason)


def _rollback_refusal(
    root: Path, active: SlotName | None, target: SlotName, record: SlotRecord
) -> str | None:
    if active is None:
        return "nothing was ever activated on this device"
    if record.status != "good":
        return f"slot {target} holds no good bundle (status {record.status})"
    problems = verify_slot(root, target)
    return f"slot {target} no longer verifies: {problems[0]}" if problems else None


def _profile_mismatch(bundle_profile: str, profile: DeviceProfile) -> str:
    try:
        target = load_profile(bundle_profile)
    except EdgeadaptError:
        target = None
    if target is not None and target.architecture != profile.architecture:
        return (
            f"bundle built for {bundle_profile} ({target.architecture}), device {profile.name} "
            f"is {profile.architecture}"
        )
    return (
        f"bundle built for profile {bundle_profile}, device is {profile.name} "
        f"(re-export with --profile {profile.name})"
    )


def _already_active(root: Path, active: SlotName | None, digest: str) -> bool:
    if active is None or read_state(root).slots[active].manifest_sha256 != digest:
        return False
    return not verify_slot(root, active)


def _result_unchanged(src: Path, active: SlotName, manifest: Manifest, start: float) -> FlashResult:
    return FlashResult(
        ok=True,
        stage="unchanged",
        reason=f"bundle already active in slot {active}",
        source=str(src),
        slot=active,
        active_slot=active,
        previous_slot=active,
        bundle_id=manifest.bundle_id,
        version=manifest.version,
        duration_s=time.perf_counter() - start,
    )


def _raw_key(path: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    try:
        key = load_public_key(path)
    except EdgeadaptError as exc:
        raise _Refused("verify", f"{path}: {exc}") from None
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _crash_point(name: str) -> None:
    """SIGKILL this process when the crash-injection variable names ``name`` (tests only)."""
    if os.environ.get(CRASH_ENV) == name:
        log.debug("crash injection at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)
