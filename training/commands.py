"""CLI subcommands of the training side: ``train`` and ``evaluate`` (torch imported lazily)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runtime.plugins import add_plugin_arg
from runtime.tasks.commands import add_param_arg


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="meta-train a policy of any family (pearl, rl2, ...; or the oracle)"
    )
    p.add_argument(
        "config",
        help="YAML config, e.g. configs/pearl/point-nav.yaml or configs/rl2/point-nav.yaml",
    )
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _ray_args(p, "collect rollouts on Ray actors")
    p.add_argument(
        "--workers", type=int, metavar="N", help="Ray rollout workers (sets ray.workers)"
    )
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser(
        "sweep",
        help="train and meta-test one config under several seeds (each with its own oracle), "
        "in parallel on Ray with --ray; one table of mean/std/min/max",
    )
    p.add_argument("config", help="config of any family, e.g. configs/pearl/point-nav.yaml")
    p.add_argument("--seeds", default="0-5", help="e.g. 0-5 or 0,2,7 (default 0-5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="sweep folder (default runs/sweep/<config name>)")
    p.add_argument("--splits", default="test,ood", help="comma-separated splits to evaluate")
    p.add_argument(
        "--oracle-config",
        help="oracle config (default: the config's eval.oracle_config, else <config>-oracle.yaml "
        "if it exists; none: no normalized scores)",
    )
    _ray_args(p, "run the seeds in parallel as Ray tasks")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress)")
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("evaluate", help="meta-test a run directory or a bundle on held-out tasks")
    add_plugin_arg(p)
    p.add_argument("path", help="run directory (torch) or bundle directory (onnxruntime)")
    _protocol_args(p)
    add_param_arg(
        p, "set an adaptation param of the adaptive agent (PEARL: forget=0.99 discounts old "
        "evidence)",
    )  # fmt: skip
    p.set_defaults(handler=cmd_evaluate)

    p = bench.add_parser(
        "training",
        help="train the oracle and a policy from a config, then meta-test (quality + wall time)",
    )
    p.add_argument("config", help="config of any family, e.g. configs/rl2/point-nav.yaml")
    p.add_argument(
        "--oracle-config",
        help="oracle config (default: the config's eval.oracle_config, else <config>-oracle.yaml)",
    )
    p.add_argument("--out", default="runs/bench", help="parent directory of the two runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--splits", default="test,ood", help="comma-separated splits to evaluate")
    p.add_argument("--json", action="store_true", help="JSON only (no progress bars)")
    p.set_defaults(handler=cmd_bench_training)

    p = bench.add_parser(
        "rollouts",
        help="env-steps/s of rollout collection in-process and on 1, 2, ... Ray workers",
    )
    p.add_argument(
        "config", nargs="?", default="configs/pearl/point-nav.yaml",
        help="PEARL config whose networks fly (default configs/pearl/point-nav.yaml)",
    )  # fmt: skip
    p.add_argument("--family", default="cheetah-vel", help="task family (default cheetah-vel)")
    p.add_argument(
        "--workers", default="0,1,2", help="comma-separated worker counts; 0 = in-process"
    )
    p.add_argument("--tasks", type=int, default=16, help="tasks per collection call")
    p.add_argument("--episodes", type=int, default=1, help="episodes per task per call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per setting")
    p.add_argument("--ray", default="local", metavar="ADDRESS", help="Ray address (default local)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(handler=cmd_bench_rollouts)

    p = bench.add_parser(
        "sweep",
        help="wall time of a seed sweep run sequentially and on Ray, same seeds, one go",
    )
    p.add_argument("config")
    p.add_argument("--seeds", default="0-5")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/bench-sweep", help="parent of sequential/ and ray/")
    p.add_argument("--splits", default="test")
    p.add_argument("--oracle-config")
    p.add_argument("--ray", default="local", metavar="ADDRESS", help="Ray address (default local)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(handler=cmd_bench_sweep)

    p = bench.add_parser(
        "maml",
        help="MAML vs a pretrained policy fine-tuned alike vs random: return after 0..3 steps",
    )
    p.add_argument("run", help="MAML run directory")
    p.add_argument("--pretrained", help="run trained with maml.pretrain=true (same family)")
    p.add_argument("--split", default="test", choices=["train", "test", "ood"])
    p.add_argument("--tasks", type=int, default=20, help="number of held-out tasks")
    p.add_argument("--seed", type=int, default=0, help="seed of task selection and noise")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3], help="inner steps")
    p.add_argument("--oracle", help="oracle run directory (default: the run's eval.oracle_run)")
    p.add_argument(
        "--pretrained-lr", type=float, nargs="+", default=[0.01, 0.1, 1.0],
        help="step sizes the pretrained policy is fine-tuned with (each reported)",
    )  # fmt: skip
    p.set_defaults(handler=cmd_bench_maml)

    p = bench.add_parser(
        "latent-probe",
        help="split a run's gap to the oracle into actor and inference (best fixed latent)",
    )
    p.add_argument("run", help="PEARL run directory")
    _protocol_args(p)
    p.add_argument("--population", type=int, default=64, help="search candidates per task")
    p.add_argument("--iterations", type=int, default=12, help="cross-entropy search rounds")
    p.set_defaults(handler=cmd_bench_latent_probe)


def _ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help=f"{what} (the ray extra): alone, start Ray on this machine; 'auto': join the "
        "running cluster; or a cluster address (host:port, ray://host:10001)",
    )


def _protocol_args(p: argparse.ArgumentParser) -> None:
    """The meta-test protocol's options, shared by ``evaluate`` and ``bench latent-probe``."""
    p.add_argument("--split", default="test", choices=["train", "test", "ood"])
    p.add_argument("--episodes", type=int, help="episodes per task (belief carries over)")
    p.add_argument("--tasks", type=int, help="number of held-out tasks")
    p.add_argument("--seed", type=int, default=0, help="seed of task selection and resets")
    p.add_argument("--oracle", help="oracle run directory for normalized scores")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_bench_maml(args: argparse.Namespace) -> int:
    from training.maml_compare import compare

    res = compare(
        args.run, args.pretrained, args.split, args.tasks, args.seed, tuple(args.steps),
        args.oracle, tuple(args.pretrained_lr),
    )  # fmt: skip
    print(json.dumps(res, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from runtime.errors import ConfigError
    from training.config import load_train_config

    overrides = list(args.set) + ([f"seed={args.seed}"] if args.seed is not None else [])
    if args.ray is not None:
        overrides.append(f"ray.address={json.dumps(args.ray)}")
    if args.workers is not None:
        overrides.append(f"ray.workers={args.workers}")
    cfg = load_train_config(args.config, overrides)
    if args.workers is not None and cfg.ray.address is None:
        raise ConfigError("--workers sets Ray rollout workers: add --ray (or set ray.address)")
    run_dir = Path(args.out or Path("runs") / Path(args.config).stem)
    if args.resume and not (run_dir / "checkpoints" / "latest.pt").is_file():
        raise ConfigError(f"{run_dir}: nothing to resume (no checkpoints/latest.pt)")
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        if not args.force:
            raise ConfigError(
                f"{run_dir}: run directory exists; pass --resume to continue or --force to "
                "overwrite"
            )
        import shutil

        shutil.rmtree(run_dir)
    return _train(cfg, run_dir, args)


def _train(cfg, run_dir: Path, args: argparse.Namespace) -> int:
    import time

    from runtime.plugins import import_plugins
    from runtime.tasks import make_family
    from training.plots import plot_learning_curve
    from training.registry import entry_of

    import_plugins(cfg.env.plugins)
    make_family(cfg.env.name)  # unknown env fails before any work
    entry = entry_of(cfg)
    start = time.perf_counter()
    state = entry.impl().train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    png = run_dir / "learning_curve.png"
    if not png.is_file():  # RL² and MAML draw their own (their metrics differ from SAC's)
        png = plot_learning_curve(run_dir, f"{cfg.env.name} ({entry.label})")
    last = state.history[-1] if state.history else {}
    evals = {k: v for k, v in last.items() if k.startswith("eval_") and isinstance(v, float)}
    updates = getattr(state, "updates", None)
    print(
        f"trained {entry.label} on {cfg.env.name}: {state.iteration} iterations, "
        f"{state.env_steps} env steps, {'' if updates is None else f'{updates} updates, '}"
        f"{time.perf_counter() - start:.0f} s; "
        + (", ".join(f"{k} {v:.2f}" for k, v in evals.items()) or "no evaluation yet")
    )
    print(f"run directory: {run_dir}  (learning curve: {png})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if (path / "manifest.json").is_file():
        report = _evaluate_bundle(path, args)
    else:
        from training.evaluate import evaluate_run

        report = evaluate_run(
            path, args.split, args.episodes, args.tasks, args.seed, args.oracle, dict(args.param)
        )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report.to_dict()))
    return 0


def _evaluate_bundle(path: Path, args: argparse.Namespace):
    from runtime.agent import AgentConfig, evaluate_bundle

    oracle_return = None
    if args.oracle:
        from runtime.bundle import read_manifest
        from runtime.evaluation import held_out_tasks
        from runtime.tasks import make_family
        from training.evaluate import oracle_return_on

        manifest = read_manifest(path)
        env = manifest.env
        recorded = manifest.provenance.get("eval")
        n = args.tasks or int(recorded.get("tasks", 20) if isinstance(recorded, dict) else 20)
        tasks = held_out_tasks(make_family(env), args.split, n, args.seed)
        oracle_return = oracle_return_on(args.oracle, env, tasks, args.seed)
    # tasks and episodes default to the run's eval settings recorded in the manifest
    config = AgentConfig(params=dict(args.param))
    return evaluate_bundle(
        path, args.split, args.tasks, args.episodes, args.seed, oracle_return, config=config
    )


def format_report(r: dict) -> str:
    """Human-readable table of an evaluation report."""

    def row(name: str, values: list[float] | None) -> str:
        cells = "  ".join(f"{v:8.3f}" for v in values) if values else "   n/a"
        return f"  {name:<24}{cells}"

    eps = "  ".join(f"{'ep ' + str(i + 1):>8}" for i in range(r["episodes"]))
    oracle = "n/a" if r["oracle_return"] is None else f"{r['oracle_return']:.3f}"
    success = r.get("success_by_episode")
    return "\n".join(
        [
            f"{r['env']} / {r['split']}: {r['tasks']} tasks x {r['episodes']} episodes",
            f"  {'':<24}{eps}",
            row("return (adaptive)", r["return_by_episode"]),
            row("normalized (adaptive)", r["normalized_by_episode"]),
            *([row("success rate (adaptive)", success)] if success is not None else []),
            *(
                [row("  ...at the last step", r["final_success_by_episode"])]
                if r.get("final_success_by_episode") is not None
                else []
            ),
            row("return (non-adaptive)", r["nonadaptive_return_by_episode"]),
            row("normalized (non-adaptive)", r["nonadaptive_normalized_by_episode"]),
            *(
                [row("success rate (non-adapt.)", r.get("nonadaptive_success_by_episode"))]
                if success is not None
                else []
            ),
            f"  random return {r['random_return']:.3f}   oracle return {oracle}"
            + (f"   random success {r['random_success']:.2f}" if success is not None else ""),
        ]
    )


def cmd_bench_training(args: argparse.Namespace) -> int:
    """Train the oracle and the policy, evaluate the splits, print one JSON object."""
    from training.sweep import plan_run, train_and_evaluate

    config = Path(args.config)
    plan = plan_run(config, list(args.set), Path(args.out), args.oracle_config)
    result = {"config": str(config)}
    result.update(train_and_evaluate(plan, args.splits.split(","), progress=not args.json))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train and meta-test one config under each seed; print and write the summary table."""
    import time

    from training import sweep

    config = Path(args.config)
    out = Path(args.out or Path("runs") / "sweep" / config.stem)
    splits = args.splits.split(",")
    plans = sweep.plan_sweep(
        config, sweep.parse_seeds(args.seeds), list(args.set), out, args.oracle_config
    )
    start = time.perf_counter()
    if args.ray is None:
        results = sweep.run_sequential(plans, splits, progress=not args.json)
    else:
        display = None if args.json else SweepDisplay(plans)
        try:
            results = sweep.run_on_ray(plans, splits, args.ray, display)
        finally:
            if display is not None:
                display.close()
    summary = {
        "config": str(config),
        "overrides": list(args.set),
        "seeds": [p.seed for p in plans],
        "mode": "sequential" if args.ray is None else f"ray ({args.ray})",
        "wall_s": round(time.perf_counter() - start, 1),
        "table": sweep.summarize(results, splits),
        "runs": results,
    }
    js, md = sweep.write_summary(out, summary, f"{config} over seeds {args.seeds}")
    if args.json:
        print(json.dumps(summary))
    else:
        print(md.read_text(), end="")
        print(f"written: {js} and {md}")
    return 0


def cmd_bench_rollouts(args: argparse.Namespace) -> int:
    """Collection env-steps/s per worker count; print one JSON object (or a short table)."""
    from runtime.errors import ConfigError
    from training.rollout_bench import bench_rollouts

    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise ConfigError(f"--workers {args.workers!r}: expected e.g. 0,1,2") from None
    if not workers or min(workers) < 0:
        raise ConfigError(f"--workers {args.workers!r}: expected counts >= 0, e.g. 0,1,2")
    r = bench_rollouts(
        Path(args.config), args.family, workers, args.tasks, args.episodes, args.repeats,
        args.ray, list(args.set),
    )  # fmt: skip
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['family']}: {r['env_steps_per_call']} env-steps per call, median of "
          f"{r['repeats']}")  # fmt: skip
    for row in r["rows"]:
        print(f"  {row['where']:<10} workers {row['workers']:>3}  {row['env_steps_per_s']:>10.0f}"
              f" env-steps/s  ({row['call_s_median']:.3f} s per call)")  # fmt: skip
    if "ray_overhead_1_worker_pct" in r:
        print(f"  Ray overhead at 1 worker: {r['ray_overhead_1_worker_s']:.4f} s per call "
              f"({r['ray_overhead_1_worker_pct']:+.1f} %)")  # fmt: skip
    return 0


def cmd_bench_sweep(args: argparse.Namespace) -> int:
    """The same seeds sequentially, then as Ray tasks; wall times and whether tables agree."""
    import time

    from training import sweep

    config, out = Path(args.config), Path(args.out)
    splits = args.splits.split(",")
    seeds = sweep.parse_seeds(args.seeds)
    result: dict = {"config": str(config), "seeds": seeds, "overrides": list(args.set)}
    tables = {}
    for mode in ("sequential", "ray"):
        plans = sweep.plan_sweep(config, seeds, list(args.set), out / mode, args.oracle_config)
        start = time.perf_counter()
        if mode == "sequential":
            runs = sweep.run_sequential(plans, splits, progress=False)
        else:
            runs = sweep.run_on_ray(plans, splits, args.ray)
        result[f"{mode}_wall_s"] = round(time.perf_counter() - start, 1)
        tables[mode] = sweep.summarize(runs, splits)
        result[f"{mode}_table"] = {s: tables[mode][s] for s in splits}
    result["speedup"] = round(result["sequential_wall_s"] / result["ray_wall_s"], 2)
    result["same_numbers"] = all(tables["sequential"][s] == tables["ray"][s] for s in splits)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


class SweepDisplay:
    """One progress bar per seed (oracle + family iterations), fed by the Ray progress board."""

    def __init__(self, plans: list) -> None:
        from tqdm.auto import tqdm

        self.offsets = {p.seed: _role_offsets(p) for p in plans}
        self.bars = {
            p.seed: tqdm(total=sum(p.iterations), desc=f"seed {p.seed}", unit="it", position=i,
                         dynamic_ncols=True)
            for i, p in enumerate(plans)
        }  # fmt: skip

    def __call__(self, snapshot: dict[int, tuple[str, int, int]]) -> None:
        for seed, (role, done, _) in snapshot.items():
            bar = self.bars[seed]
            bar.set_description(f"seed {seed} {role}", refresh=False)
            bar.update(self.offsets[seed].get(role, 0) + done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _role_offsets(plan) -> dict[str, int]:
    """Iterations done before each role of a seed's plan starts."""
    offsets, total = {}, 0
    for (role, _, _), n in zip(plan.roles, plan.iterations, strict=True):
        offsets[role] = total
        total += n
    return offsets


def cmd_bench_latent_probe(args: argparse.Namespace) -> int:
    """Probe each task's best fixed latent; print the actor / inference split of the gap."""
    from training.probe import latent_probe

    r = latent_probe(
        args.run,
        args.split,
        args.episodes,
        args.tasks,
        args.seed,
        args.oracle,
        args.population,
        args.iterations,
    ).to_dict()
    if args.json:
        print(json.dumps(r))
        return 0
    eps = ", ".join(f"{v:.3f}" for v in r["adaptive_return_by_episode"])
    gaps = ", ".join(f"{v:.3f}" for v in r["inference_gap_by_episode"])
    oracle = "n/a" if r["oracle_return"] is None else f"{r['oracle_return']:.3f}"
    actor_gap = "n/a (no oracle)" if r["actor_gap"] is None else f"{r['actor_gap']:.3f}"
    print(f"{r['env']} / {r['split']}: {r['tasks']} tasks, {r['episodes']} adaptive episodes")
    print(f"  adaptive return by episode   {eps}")
    print(f"  best fixed latent (probe)    {r['probe_return']:.3f}   oracle {oracle}")
    print(f"  actor gap (oracle - probe)   {actor_gap}")
    print(f"  inference gap by episode     {gaps}   (probe - adaptive)")
    return 0
