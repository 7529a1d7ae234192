"""CLI subcommands of the export side: ``export``, ``keygen`` and ``verify``.

Top-level imports are argparse/stdlib only; torch and onnx are imported when a handler runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.tasks.commands import add_param_arg

if TYPE_CHECKING:
    from export.verify import VerifyResult


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained run to a signed bundle (ONNX + manifest)")
    p.add_argument("run_dir", help="run directory (config.yaml + checkpoints/latest.pt)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--profile", help="target device profile (configs/devices), e.g. x86-cpu")
    p.add_argument("--key", help="Ed25519 private key (PEM) to sign the manifest with")
    p.add_argument("--int8", action="store_true", help="also write the INT8 step graph")
    p.add_argument(
        "--trt", action="store_true", help="prefer TensorRT -> CUDA -> CPU on the device (FP16)"
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument(
        "--calibration-tasks",
        type=int,
        default=64,
        help="train tasks rolled out to calibrate the OOD thresholds (at most; fewer when the "
        "recording would exceed its memory budget)",
    )
    add_param_arg(
        p,
        "the bundle's default of a declared adaptation param (PEARL: forget=0.9 for a device "
        "whose task changes in flight); the device uses it unless told otherwise",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("keygen", help="write an Ed25519 signing key pair (PREFIX, PREFIX.pub)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="private key path")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    p.set_defaults(handler=cmd_keygen)

    p = sub.add_parser("verify", help="check a bundle: hashes, signature, graphs, parity")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--pubkey", help="Ed25519 public key (PEM); a signature is then required")
    p.add_argument("--run", help="run directory: torch vs onnxruntime parity check")
    p.add_argument("--random", type=int, default=10_000, help="random parity inputs (>= 10k)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_verify)


def cmd_export(args: argparse.Namespace) -> int:
    from runtime.errors import ConfigError

    if args.calibration_tasks < 1:
        raise ConfigError(f"--calibration-tasks {args.calibration_tasks}: need at least 1")
    if args.opset < 17:
        raise ConfigError(f"--opset {args.opset}: bundles need opset >= 17")
    from export.bundle_writer import ExportOptions, export_bundle

    opts = ExportOptions(
        profile=args.profile,
        key=Path(args.key) if args.key else None,
        int8=args.int8,
        trt=args.trt,
        opset=args.opset,
        calibration_tasks=args.calibration_tasks,
        force=args.force,
        params=dict(args.param),
    )
    res = export_bundle(args.run_dir, args.out, opts)
    m = res.manifest
    summary = {
        "bundle": str(res.bundle_dir),
        "bundle_id": m.bundle_id,
        "env": m.env,
        "profile": m.profile,
        "graphs": {k: g.file for k, g in m.graphs.items()},
        "signed": res.signed,
        "ood": {"warn": m.ood.warn, "alarm": m.ood.alarm},
        "int8": res.int8,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        signed = "signed" if res.signed else "UNSIGNED (pass --key to sign)"
        print(f"bundle {m.bundle_id} ({m.env}) written to {res.bundle_dir}, {signed}")
        print(f"graphs: {', '.join(sorted(m.graphs))}; OOD warn {m.ood.warn:.3g}")
        if res.int8:
            i8 = res.int8
            print(
                f"int8: parity {i8['parity_max_abs_err']:.3g}, return {i8['return_int8']:.3f} "
                f"vs fp32 {i8['return_fp32']:.3f} ({i8['return_change_pct']:+.2f}%)"
            )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from export.signing import generate_keypair

    private, public = generate_keypair(args.out, force=args.force)
    print(f"private key: {private} (mode 0600, keep it secret)\npublic key:  {public}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from runtime.errors import ConfigError

    if args.random < 10_000 and args.run:
        raise ConfigError(f"--random {args.random}: the parity check needs >= 10000 inputs")
    from export.verify import verify

    res = verify(args.bundle, args.pubkey, args.run, args.random)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        _print_human(res)
    return 0 if res.ok else 1


def _print_human(res: VerifyResult) -> None:
    print(f"bundle:       {res.bundle}")
    print(f"signature:    {res.signature}")
    print(f"hashes:       {res.hashes}")
    print(f"onnx checker: {res.onnx_checker}")
    for graph, err in res.test_vectors.items():
        print(f"test vectors: {graph} max error {err:.3g}")
    if res.parity_max_abs_err is not None:
        print(f"parity:       max error {res.parity_max_abs_err:.3g} (target 1e-05)")
    for reason in res.reasons:
        print(f"FAIL: {reason}", file=sys.stderr)
    print("OK" if res.ok else "FAILED")
