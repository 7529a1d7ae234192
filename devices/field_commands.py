"""CLI: ``edgeadapt run`` — the field runner on a device root (torch-free) — and
``edgeadapt fleet-sim``, a simulated fleet of such devices for backend load tests (Ray optional,
imported only by its handler)."""

from __future__ import annotations

import argparse
import json

from runtime.plugins import add_plugin_arg

#: ``devices.runner.SafeBehaviour`` (not imported here: the runner loads only in the handler;
#: a test checks they agree).
SAFE_CHOICES = ("last_calm", "prior", "hold", "zeros", "adaptive")


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
    p.add_argument(
        "--safe",
        default="last_calm",
        choices=SAFE_CHOICES,
        help="actions in safe mode: the policy at the last calm state (default), at the initial "
        "state (prior), the last action (hold), physical zero, or the adaptive action (adaptive: "
        "monitor only, alarms and mode changes are still reported)",
    )
    p.add_argument("--forget", type=float, help="belief forgetting factor in (0, 1]")
    p.add_argument("--changepoint", default="off", choices=["off", "reset"])
    p.add_argument("--broker", help="mqtt:// or mqtts:// URL; telemetry goes through the outbox")
    p.add_argument("--fleet", default="default")
    p.add_argument("--device-id", help="device id (default: the device root's name)")
    p.add_argument("--command-key", action="append", default=[], help="fleet public key (PEM)")
    p.add_argument("--trace", help="write the per-step trace to this .npz")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("fleet-sim", help="simulate N field devices against a broker (load test)")
    p.add_argument("--devices", type=int, required=True, help="number of simulated devices")
    p.add_argument("--bundle", action="append", required=True,
                   help="bundle directory (repeat: device k runs bundle k mod count)")  # fmt: skip
    p.add_argument("--pubkey", help="public key the bundles are signed with")
    p.add_argument("--rate", type=float, default=10.0, help="control rate per device (Hz)")
    p.add_argument("--duration", type=float, default=10.0, help="run time (s)")
    p.add_argument("--broker", help="HOST:PORT or mqtt://HOST:PORT (default: a private Mosquitto "
                   "and collector)")  # fmt: skip
    p.add_argument("--db", help="collector database to count lost/duplicated records in "
                   "(SQLite path or postgresql:// URL; with no --broker: where the private "
                   "collector writes)")  # fmt: skip
    p.add_argument("--ray", nargs="?", const="local", metavar="auto|ADDRESS",
                   help="hosts are Ray actors (the ray extra): alone, Ray started on this "
                   "machine; 'auto': the running cluster; or a cluster address (default: local "
                   "processes)")  # fmt: skip
    p.add_argument("--per-host", type=int, default=100, help="devices per host actor/process")
    p.add_argument("--fleet", default="sim", help="fleet id of the devices")
    p.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001, ...")
    p.add_argument("--batch-period", type=float, default=0.2, help="telemetry batch period (s)")
    p.add_argument("--wait", type=float, default=60.0, help="wait for the collector (s)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.set_defaults(handler=cmd_fleet_sim)


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


def cmd_fleet_sim(args: argparse.Namespace) -> int:
    """Run the simulated fleet; with a collector database, count what was lost or duplicated."""
    import sys
    import tempfile
    from dataclasses import asdict, replace
    from pathlib import Path

    from devices import fleet_sim

    opts = fleet_sim.FleetOptions(
        devices=args.devices, bundles=tuple(args.bundle), broker="", rate_hz=args.rate,
        duration_s=args.duration, pubkey=args.pubkey, fleet=args.fleet, prefix=args.prefix,
        per_host=args.per_host, batch_period_s=args.batch_period, ray=args.ray,
    )  # fmt: skip
    fleet_sim.check_options(opts)
    broker = fleet_sim.broker_url(args.broker) if args.broker else None
    with tempfile.TemporaryDirectory(prefix="edgeadapt-fleet-sim-") as tmp:
        backend, db = None, args.db
        if broker is None:
            db = db or str(Path(tmp) / "collector.sqlite")
            backend = fleet_sim.PrivateBackend(Path(tmp), db)
            broker = backend.url
        try:
            if not args.json:
                print(f"fleet-sim: {args.devices} devices at {args.rate} Hz for {args.duration} s "
                      f"via {broker}", file=sys.stderr)  # fmt: skip
            out = asdict(fleet_sim.run_fleet(replace(opts, broker=broker)))
            last_seq = out.pop("last_seq")
            if db:
                out["collector"] = fleet_sim.collector_check(db, last_seq, args.wait)
        finally:
            if backend is not None:
                backend.close()
    print(json.dumps(out, indent=None if args.json else 2))
    ok = not out["failed"] and out["all_drained"]
    return 0 if ok and out.get("collector", {}).get("lost", 0) == 0 else 1


def _vector(text: str | None):
    if text is None:
        return None
    import numpy as np

    from runtime.errors import ConfigError

    try:
        return np.array([float(x) for x in text.split(",")])
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None
