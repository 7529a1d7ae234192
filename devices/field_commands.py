"""CLI: ``edgeadapt run`` — the field runner on a device root (torch-free)."""

from __future__ import annotations

import argparse
import json

from runtime.plugins import add_plugin_arg


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the flashed bundle in the field (simulated plant)")
    add_plugin_arg(p)
    p.add_argument("--device-root", required=True, help="device root (see `edgeadapt flash`)")
    p.add_argument("--sim", help="task family to simulate (default: the bundle's)")
    p.add_argument("--split", default="test", choices=["train", "test", "ood"])
    p.add_argument("--tasks", type=int, default=1, help="tasks, one after the other")
    p.add_argument("--episodes", type=int, default=3, help="episodes per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", help="explicit task vector, comma-separated")
    p.add_argument("--change-at", type=int, help="global step at which the task changes")
    p.add_argument("--change-task", help="task vector after the change, comma-separated")
    p.add_argument("--rate", type=float, help="control rate in Hz (default: the profile's)")
    p.add_argument("--fast", action="store_true", help="do not sleep to the control period")
    p.add_argument("--safe", default="prior", choices=["prior", "hold", "zeros"])
    p.add_argument("--forget", type=float, help="belief forgetting factor in (0, 1]")
    p.add_argument("--changepoint", default="off", choices=["off", "reset"])
    p.add_argument("--broker", help="mqtt:// or mqtts:// URL; telemetry goes through the outbox")
    p.add_argument("--fleet", default="default")
    p.add_argument("--device-id", help="device id (default: the device root's name)")
    p.add_argument("--command-key", action="append", default=[], help="fleet public key (PEM)")
    p.add_argument("--trace", help="write the per-step trace to this .npz")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from devices.runner import FieldRunner, RunnerOptions

    root = Path(args.device_root)
    telemetry = None
    if args.broker:
        from devices.telemetry.config import TelemetryConfig

        telemetry = TelemetryConfig(
            broker=args.broker,
            fleet=args.fleet,
            device=args.device_id or root.resolve().name,
            outbox=str(root / "telemetry-outbox.sqlite"),
            command_keys=args.command_key,
        )
    opts = RunnerOptions(
        device_root=root,
        sim=args.sim,
        split=args.split,
        tasks=args.tasks,
        episodes=args.episodes,
        seed=args.seed,
        task=_vector(args.task),
        change_at=args.change_at,
        change_task=_vector(args.change_task),
        rate_hz=args.rate,
        realtime=not args.fast,
        safe=args.safe,
        forget=args.forget,
        changepoint=args.changepoint,
        telemetry=telemetry,
    )
    trace = FieldRunner(opts).run()
    if args.trace:
        np.savez(args.trace, **trace.arrays())
    summary = trace.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>18}: {value}")
    return 0


def _vector(text: str | None):
    if text is None:
        return None
    import numpy as np

    from runtime.errors import ConfigError

    try:
        return np.array([float(x) for x in text.split(",")])
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None
