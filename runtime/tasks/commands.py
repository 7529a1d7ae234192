"""``edgeadapt envs`` (list the task families), ``edgeadapt bench envs`` (their throughput) and
``edgeadapt bench tracking`` (drone-track(-residual) tracking error of classical and learned
controllers).

Top-level imports are argparse/stdlib only; numpy and the families load inside the handlers.
"""

from __future__ import annotations

import argparse
import json

from runtime.plugins import add_plugin_arg


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add ``envs`` and ``bench envs``."""
    envs = sub.add_parser("envs", help="list the task families (dims, splits)")
    add_plugin_arg(envs)
    envs.add_argument("--json", action="store_true", help="print one JSON object")
    envs.set_defaults(handler=_envs)

    b = bench.add_parser("envs", help="vectorized env-steps/s of every task family")
    add_plugin_arg(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument(
        "--batch",
        type=_positive,
        default=None,
        help="environments per batch (default 256; MuJoCo families 64, Meta-World 10)",
    )
    b.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help="batched steps per repeat (default 500; MuJoCo families 200, Meta-World 100)",
    )
    b.add_argument(
        "--repeats",
        type=_positive,
        default=None,
        help="timed repeats, median (default 5; MuJoCo and Meta-World 3)",
    )
    b.add_argument(
        "--split", choices=("train", "test", "ood"), default="train", help="task split to run"
    )
    b.add_argument("--family", action="append", default=None, help="only this family (repeatable)")
    b.set_defaults(handler=_bench_envs)

    t = bench.add_parser(
        "tracking",
        help="drone-track figure-8 tracking error (cm) per wind: PID, DOB, privileged, oracle "
        "runs, bundles",
    )
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.add_argument("--markdown", action="store_true", help="print a Markdown table")
    t.add_argument(
        "--bundle", action="append", default=[], metavar="PATH",
        help="a drone-track or drone-track-residual bundle (repeatable; PEARL, RL², MAML "
        "alike): flown adaptive and with its state held at the initial value",
    )  # fmt: skip
    t.add_argument(
        "--oracle", action="append", default=[], metavar="RUN",
        help="a drone-track(-residual) privileged oracle run directory (torch, train extra): "
        "flown as the row 'oracle', a candidate reference of the targets (repeatable)",
    )  # fmt: skip
    add_param_arg(
        t, "set a declared adaptation param of the bundles that declare it (PEARL: forget=0.9 "
        "forgets old evidence, for changing wind); a name given twice flies one row per value "
        "(--param forget=1 --param forget=0.9)",
    )  # fmt: skip
    t.add_argument("--tasks", type=_positive, default=16, help="tasks per wind condition")
    t.add_argument("--episodes", type=_positive, default=2, help="episodes per task (10 s each)")
    t.add_argument("--skip", type=float, default=2.0, help="seconds of each episode not scored")
    t.add_argument("--seed", type=int, default=0, help="tasks, start and sensor-noise seed")
    t.add_argument(
        "--tune", action="store_true",
        help="instead: rerun the PID / DOB gain grid search on train tasks",
    )  # fmt: skip
    t.set_defaults(handler=_bench_tracking)


def _envs(args: argparse.Namespace) -> int:
    from runtime.tasks.registry import available_families, make_family

    rows = [_describe(make_family(name, 1).spec) for name in available_families()]
    if args.json:
        print(json.dumps({"families": rows}, indent=2))
        return 0
    for row in rows:
        dt = f", dt {row['dt']} s" if row["dt"] else ""
        print(f"{row['name']}: {row['description']}")
        print(
            f"  obs {row['obs_dim']}, act {row['act_dim']}, task {row['task_dim']} "
            f"({', '.join(row['task_names'])}), horizon {row['horizon']}{dt}"
        )
        for split, text in row["splits"].items():
            print(f"  {split}: {text}")
    return 0


def _bench_envs(args: argparse.Namespace) -> int:
    from runtime.errors import UnknownNameError
    from runtime.tasks.benchmark import bench_family
    from runtime.tasks.registry import OPTIONAL_FAMILIES, available_families

    names = args.family or available_families()
    unknown = [n for n in names if n not in available_families() and n not in OPTIONAL_FAMILIES]
    if unknown:
        raise UnknownNameError(
            f"unknown env {unknown[0]!r}; available: {', '.join(available_families())}"
        )
    results = [bench_family(n, args.batch, args.steps, args.repeats, args.split) for n in names]
    if args.json:
        print(json.dumps({"families": {r.env: r.to_dict() for r in results}}, indent=2))
        return 0
    for r in results:
        print(f"{r.env:20s} {r.env_steps_per_s:12,.0f} env-steps/s (batch {r.batch}, median)")
        for variant, rate in r.variants.items():
            print(f"{'':20s} {rate:12,.0f} env-steps/s with {variant}")
    return 0


def _bench_tracking(args: argparse.Namespace) -> int:
    from runtime.errors import EdgeadaptError
    from runtime.tasks import tracking

    if not 0.0 <= args.skip < 10.0:
        raise EdgeadaptError(f"--skip must be in [0, 10) s, got {args.skip}")
    if args.tune:
        print(json.dumps(tracking.tune_report(), indent=2))
        return 0
    report = tracking.run_benchmark(
        args.bundle,
        args.tasks,
        args.episodes,
        args.skip,
        args.seed,
        tracking.param_sets(args.param),
        oracles=args.oracle,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    if args.markdown or not args.json:
        print(tracking.markdown(report))
    return 0


def _describe(spec) -> dict:
    return {
        "name": spec.name,
        "description": spec.description,
        "obs_dim": spec.obs_dim,
        "act_dim": spec.act_dim,
        "task_dim": spec.task_dim,
        "task_names": list(spec.task_names),
        "horizon": spec.horizon,
        "dt": spec.dt,
        "obs_low": [float(x) for x in spec.obs_low],
        "obs_high": [float(x) for x in spec.obs_high],
        "act_low": [float(x) for x in spec.act_low],
        "act_high": [float(x) for x in spec.act_high],
        "task_low": [float(x) for x in spec.task_low],
        "task_high": [float(x) for x in spec.task_high],
        "splits": dict(spec.splits),
    }


def add_param_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable ``--param NAME=VALUE`` option (adaptation params; a list of pairs)."""
    p.add_argument(
        "--param", action="append", default=[], type=_param, metavar="NAME=VALUE",
        help=f"{help_text}; repeatable",
    )  # fmt: skip


def _param(text: str) -> tuple[str, float]:
    """``--param NAME=VALUE`` (an adaptation param and its value), as an argparse type."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value
