"""The ``edgeadapt`` command line.

Each package contributes its subcommands through a light ``commands`` module that imports only
argparse at top level; handlers import their heavy dependencies (torch, onnx) when they run.
So ``edgeadapt run`` on a device never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from runtime.errors import EdgeadaptError

#: Modules with ``register(subparsers, bench_subparsers)``; missing ones are skipped.
COMMAND_MODULES = (
    "runtime.commands",
    "runtime.tasks.commands",
    "training.commands",
    "export.commands",
    "devices.commands",
    "devices.telemetry.commands",
    "devices.field_commands",
    "training.demo",
)


OWN_LOGGERS = ("runtime", "training", "export", "devices")

#: Top-level modules of the optional extras (pyproject.toml) -> the extra that installs them.
EXTRA_OF_MODULE = {
    "torch": "train",
    "gymnasium": "train",
    "matplotlib": "train",
    "tqdm": "train",
    "onnx": "export",
    "onnxscript": "export",
    "tensorrt": "trt",
    "mujoco": "bench",
    "metaworld": "bench",
    "ray": "ray",
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every installed package's subcommands."""
    parser = argparse.ArgumentParser(
        prog="edgeadapt",
        description="Meta-train, export, flash and run adaptive policies on edge devices.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser("bench", help="benchmarks (JSON out)").add_subparsers(
        dest="bench_command", metavar="WHAT", required=True
    )
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module
                raise
            continue
        module.register(sub, bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgeadapt`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Third-party libraries (onnxruntime's quantizer) log chatter on the root logger: keep it at
    # WARNING and show our own packages' INFO lines.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for package in OWN_LOGGERS:
        logging.getLogger(package).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if getattr(args, "plugin", None):
            from runtime.plugins import import_plugins

            import_plugins(args.plugin, source="--plugin")
        return int(args.handler(args) or 0)
    except EdgeadaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: {_command_name(args)} needs the {extra} extra (module {exc.name!r} is "
              f"missing): pip install 'edgeadapt[{extra}]'", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _command_name(args: argparse.Namespace) -> str:
    """``edgeadapt bench runtime``-style name of the command that ran, in backquotes."""
    words = [args.command]
    for attr in ("bench_command", "device_command", "telemetry_command"):
        if getattr(args, attr, None):
            words.append(getattr(args, attr))
    return "`edgeadapt " + " ".join(words) + "`"


if __name__ == "__main__":
    sys.exit(main())
