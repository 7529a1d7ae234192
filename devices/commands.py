"""CLI of the device side: ``flash`` and ``device {init,status,rollback,update,pack,profiles}``.

Only argparse and the stdlib are imported at top level; handlers import what they need.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add ``flash`` and ``device`` to the ``edgeadapt`` command line."""
    del bench  # no device benchmarks: `bench runtime --profile` lives with the runtime
    _add_flash(sub)
    device = sub.add_parser("device", help="provision, inspect and roll back a device root")
    dsub = device.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    _add_init(dsub)
    _add_status(dsub)
    _add_rollback(dsub)
    _add_update(dsub)
    _add_pack(dsub)
    _add_profiles(dsub)


# -- parsers ---------------------------------------------------------------------------------
def _add_flash(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flash",
        help="verify a bundle, stage it in the inactive slot, health-gate it, switch to it",
        description="Flash BUNDLE into the inactive A/B slot of a device root. A root that is "
        "not provisioned yet is provisioned first with --profile (default: the bundle's "
        "profile) and --pubkey.",
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--device-root", type=Path, required=True, metavar="DIR")
    p.add_argument("--pubkey", type=Path, default=None, help="Ed25519 public key (PEM)")
    p.add_argument("--profile", default=None, help="profile when provisioning a new root")
    p.add_argument("--health-timeout", type=float, default=None, metavar="S")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_flash)


def _add_init(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser("init", help="provision a device root (profile, trusted public key)")
    p.add_argument("root", type=Path, metavar="DIR")
    p.add_argument("--profile", required=True, help="profile name or YAML path")
    p.add_argument("--pubkey", type=Path, default=None, help="refuse bundles not signed by it")
    p.add_argument("--force", action="store_true", help="re-provision (slots are kept)")
    p.set_defaults(handler=_cmd_init)


def _add_status(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser("status", help="both slots, versions, health and the last failure")
    p.add_argument("root", type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the slots")
    p.set_defaults(handler=_cmd_status)


def _add_rollback(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser("rollback", help="switch back to the other slot if it is good")
    p.add_argument("root", type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_rollback)


def _add_update(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser(
        "update", help="remote update by hand: fetch SOURCE (URL or path), check sha256, flash"
    )
    p.add_argument("root", type=Path, metavar="DIR")
    p.add_argument("source", metavar="SOURCE", help="http(s):// or file:// URL, or a path")
    p.add_argument("--sha256", required=True, help="digest of the archive (see `device pack`)")
    p.add_argument("--pubkey", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=60.0, metavar="S")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_update)


def _add_pack(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser("pack", help="write a bundle as a transport archive; prints its sha256")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.tar.gz")
    p.set_defaults(handler=_cmd_pack)


def _add_profiles(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser("profiles", help="list the built-in device profiles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_profiles)


# -- handlers --------------------------------------------------------------------------------
def _cmd_flash(args: argparse.Namespace) -> int:
    from devices.flash import flash
    from devices.slots import init_device, is_provisioned

    if not is_provisioned(args.device_root):
        profile = args.profile or _bundle_profile(args.bundle)
        init_device(args.device_root, profile, args.pubkey)
        print(f"provisioned {args.device_root} (profile {profile})", file=sys.stderr)
    result = flash(args.bundle, args.device_root, args.pubkey, health_timeout_s=args.health_timeout)
    return _report(result, args.json, "flash")


def _cmd_init(args: argparse.Namespace) -> int:
    from devices.slots import init_device

    info = init_device(args.root, args.profile, args.pubkey, force=args.force)
    key = "with a public key (signed bundles only)" if info.has_pubkey else "without a key"
    print(f"provisioned {args.root}: profile {info.profile}, {key}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from devices.slots import device_status

    status = device_status(args.root, verify=not args.no_verify)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(_format_status(status))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from devices.flash import rollback

    return _report(rollback(args.root), args.json, "rollback")


def _cmd_update(args: argparse.Namespace) -> int:
    from devices.remote import remote_update

    result = remote_update(args.root, args.source, args.sha256, args.pubkey, timeout_s=args.timeout)
    return _report(result, args.json, "update")


def _cmd_pack(args: argparse.Namespace) -> int:
    from devices.remote import pack_bundle

    digest = pack_bundle(args.bundle, args.out)
    print(f"{digest}  {args.out}")
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    from devices.profiles import available_profiles, load_profile

    profiles = [load_profile(name) for name in available_profiles()]
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in profiles], indent=2))
        return 0
    print(f"{'profile':<22} {'arch':<8} {'precision':<9} {'Hz':>5} {'budget µs':>9} {'MB':>6}")
    for p in profiles:
        print(
            f"{p.name:<22} {p.architecture:<8} {p.precision:<9} {p.control_rate_hz:>5g} "
            f"{p.step_budget_us:>9g} {p.memory_budget_mb:>6g}"
        )
    return 0


# -- helpers ---------------------------------------------------------------------------------
def _report(result: Any, as_json: bool, what: str) -> int:
    from devices.slots import DeviceError

    if as_json:
        print(json.dumps(result.to_event(), indent=2))
        return 0 if result.ok else 1
    if not result.ok:
        raise DeviceError(f"{what} refused at stage '{result.stage}': {result.reason}")
    if result.stage == "unchanged":
        print(f"{what}: {result.reason}")
        return 0
    step = f", step {result.health.step_us_median:.1f} µs" if result.health else ""
    print(
        f"{what}: slot {result.slot} active: {result.bundle_id} {result.version} "
        f"(previous {result.previous_slot or '-'}{step}, {result.duration_s:.2f} s)"
    )
    return 0


def _bundle_profile(bundle: Path) -> str:
    from devices.slots import DeviceError
    from runtime.bundle import read_manifest

    profile = read_manifest(bundle).profile
    if profile is None:
        raise DeviceError("the bundle names no profile: pass --profile to provision the device")
    return profile


def _format_status(status: dict[str, Any]) -> str:
    lines = [
        f"device {status['device_root']}  profile {status['profile']}  "
        f"signed-only {'yes' if status['pubkey'] else 'no'}  active {status['active_slot'] or '-'}"
    ]
    for name, slot in status["slots"].items():
        mark = "*" if slot["active"] else " "
        verified = {True: "verified", False: "NOT verified", None: ""}[slot.get("verified")]
        health = slot.get("health") or {}
        step = health.get("step_us_median")
        lines.append(
            f" {mark} {name}: {slot['status']:<8} {slot.get('bundle_id') or '-'} "
            f"{slot.get('version') or ''} {verified}"
            + (f"  step {step:.1f} µs" if step is not None else "")
            + (f"  ({slot['reason']})" if slot.get("reason") else "")
        )
    failure = status.get("last_failure")
    if failure:
        lines.append(f"last failure ({failure['time']}, {failure['stage']}): {failure['reason']}")
    return "\n".join(lines)
