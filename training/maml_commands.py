"""Research command line for MAML runs (``edgeadapt train``/``evaluate`` run MAML like any
family; this keeps the knobs the docs/maml.md tables were measured with: ``--adaptations``,
``--episodes-per-step``).

    python -m training.maml_commands train configs/maml/nav2d.yaml [--out runs/maml-nav2d]
        [--set key=value ...] [--resume]
    python -m training.maml_commands evaluate RUN [--split test] [--tasks 20]
        [--adaptations 1] [--episodes-per-step E] [--seed 0] [--oracle-run DIR]

``evaluate`` prints JSON: the mean return per phase (0 = before adaptation, k = after k inner
updates) and the same normalized to random = 0, oracle = 1 (nav2d: the closed-form oracle;
other families: the PEARL oracle run).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from runtime.errors import ConfigError, EdgeadaptError
from runtime.evaluation import held_out_tasks
from runtime.tasks import make_family
from training.maml import load_maml_run, make_eval_policy, train
from training.maml_config import load_maml_config
from training.maml_policy import evaluate_policy


def cmd_train(args: argparse.Namespace) -> dict:
    cfg = load_maml_config(args.config, args.set)
    out = Path(args.out or f"runs/maml-{cfg.env.name}")
    if out.exists() and not args.resume and any(out.iterdir()):
        raise ConfigError(f"{out}: run directory exists (use --resume or another --out)")
    start = time.perf_counter()
    state = train(cfg, out, resume=args.resume, progress=not args.quiet)
    return {"run": str(out), "iterations": state.iteration, "wall_s": time.perf_counter() - start}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    state = load_maml_run(args.run)
    cfg = state.cfg
    if args.episodes_per_step:
        maml = cfg.maml.model_copy(update={"episodes_per_step": args.episodes_per_step})
        state.cfg = cfg = cfg.model_copy(update={"maml": maml})
    oracle = None
    oracle_run = args.oracle_run or cfg.eval.oracle_run
    if oracle_run and cfg.env.name != "nav2d":
        from training.evaluate import oracle_return_on

        tasks = held_out_tasks(make_family(cfg.env.name, 1), args.split, args.tasks, args.seed)
        oracle = oracle_return_on(oracle_run, cfg.env.name, tasks, args.seed)
    policy = make_eval_policy(state, args.adaptations, seed=args.seed + 1)
    report = evaluate_policy(policy, cfg.env.name, args.split, args.tasks, args.seed, oracle)
    out = asdict(report)
    out["run"] = str(args.run)
    out["adapt_ok_fraction"] = float(
        np.mean([np.mean(step["ok"]) for step in policy.adapt_log]) if policy.adapt_log else 1.0
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.maml_commands")
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="meta-train MAML from a config")
    tr.add_argument("config")
    tr.add_argument("--out", default=None)
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--quiet", action="store_true")
    ev = sub.add_parser("evaluate", help="meta-test a MAML run")
    ev.add_argument("run")
    ev.add_argument("--split", default="test")
    ev.add_argument("--tasks", type=int, default=20)
    ev.add_argument("--adaptations", type=int, default=1)
    ev.add_argument("--episodes-per-step", type=int, default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--oracle-run", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        out = cmd_train(args) if args.cmd == "train" else cmd_evaluate(args)
    except (EdgeadaptError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
