"""CLI subcommands of the training side: ``train`` and ``evaluate`` (torch imported lazily)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runtime.plugins import add_plugin_arg


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
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("evaluate", help="meta-test a run directory or a bundle on held-out tasks")
    add_plugin_arg(p)
    p.add_argument("path", help="run directory (torch) or bundle directory (onnxruntime)")
    _protocol_args(p)
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
    cfg = load_train_config(args.config, overrides)
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

        report = evaluate_run(path, args.split, args.episodes, args.tasks, args.seed, args.oracle)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report.to_dict()))
    return 0


def _evaluate_bundle(path: Path, args: argparse.Namespace):
    from runtime.agent import evaluate_bundle

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
    return evaluate_bundle(path, args.split, args.tasks, args.episodes, args.seed, oracle_return)


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
            row("return (non-adaptive)", r["nonadaptive_return_by_episode"]),
            row("normalized (non-adaptive)", r["nonadaptive_normalized_by_episode"]),
            f"  random return {r['random_return']:.3f}   oracle return {oracle}",
        ]
    )


def cmd_bench_training(args: argparse.Namespace) -> int:
    """Train the oracle and the PEARL policy, evaluate both splits, print one JSON object."""
    import shutil
    import time

    from training.config import load_train_config
    from training.evaluate import evaluate_run
    from training.registry import entry_of

    config = Path(args.config)
    main_cfg = load_train_config(config, list(args.set))
    if args.oracle_config:
        oracle_config = Path(args.oracle_config)
    elif main_cfg.eval.oracle_config:  # relative to the config file that names it
        oracle_config = config.parent / main_cfg.eval.oracle_config
    else:
        oracle_config = config.with_name(config.stem + "-oracle.yaml")
    out = Path(args.out)
    algo = main_cfg.algo
    result: dict = {"config": str(config), "algo": algo}
    for role, path in (("oracle", oracle_config), (algo, config)):
        run_dir = out / f"{config.stem}-{role}"
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = list(args.set)
        if role != "oracle":
            overrides.append(f"eval.oracle_run={out / (config.stem + '-oracle')}")
        cfg = load_train_config(path, overrides)
        start = time.perf_counter()
        state = entry_of(cfg).impl().train(cfg, run_dir, progress=not args.json)
        result[f"{role}_train_wall_s"] = round(time.perf_counter() - start, 1)
        result[f"{role}_env_steps"] = state.env_steps
        result[f"{role}_updates"] = getattr(state, "updates", None)
    result["env"] = main_cfg.env.name
    for split in args.splits.split(","):
        report = evaluate_run(out / f"{config.stem}-{algo}", split)
        result[split] = report.to_dict()
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


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
