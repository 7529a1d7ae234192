"""Latency of MAML's device graphs in onnxruntime (one thread), printed as JSON.

    python -m export.maml_bench [--run RUN_DIR] [--episodes 4 20] [--runs 300]

Exports the adapt graph (one row, ``episodes`` x horizon transitions) and the policy graph for
the run's family and sizes (nav2d 64 x 64 without ``--run``), feeds a buffer flown in the family
by the run's weights, and reports the median and p99 wall time per call in µs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.maml_graphs import (
    ADAPT_INPUTS,
    POLICY_INPUTS,
    AdaptShape,
    export_adapt_graph,
    export_policy_graph,
)
from runtime.tasks import make_family
from training.maml import MAMLState, collect, init_state, load_maml_run
from training.maml_config import MAMLTrainConfig


def timed(sess: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median and p99 µs of ``runs`` calls after 20 warm-up calls."""
    for _ in range(20):
        sess.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter_ns()
        sess.run(None, feed)
        times[i] = (time.perf_counter_ns() - start) / 1e3
    return {"median_us": float(np.median(times)), "p99_us": float(np.percentile(times, 99))}


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench_adapt(state: MAMLState, episodes: int, runs: int, workdir: Path) -> dict[str, float]:
    """Adapt-graph latency for one row of ``episodes`` flown episodes."""
    shape = AdaptShape(episodes, state.spec.horizon)
    path = export_adapt_graph(state.settings, shape, workdir / f"adapt_{episodes}.onnx")
    env = make_family(state.cfg.env.name, episodes)
    tasks = env.sample_tasks("test", 1, state.rng)
    w = state.theta.detach()[None]
    b = collect(_with_episodes(state, episodes), tasks, w).batch
    lr = torch.full((1, 1), state.inner_lr)
    values = (w, b.obs_BNO, b.action_BNA, b.reward_BN, b.mask_BN, lr)
    feed = {n: x.numpy() for n, x in zip(ADAPT_INPUTS, values, strict=True)}
    return {
        "transitions": shape.capacity,
        "bytes": path.stat().st_size,
        **timed(session(path), feed, runs),
    }


def bench_policy(state: MAMLState, runs: int, workdir: Path) -> dict[str, float]:
    """Policy-graph latency for one observation."""
    path = export_policy_graph(state.layout, state.spec, workdir / "policy.onnx")
    feed = dict(
        zip(
            POLICY_INPUTS,
            (
                np.zeros((1, state.spec.obs_dim), np.float32),
                state.theta.detach()[None].numpy(),
                np.zeros((1, state.spec.act_dim), np.float32),
            ),
            strict=True,
        )
    )
    return timed(session(path), feed, runs)


def _with_episodes(state: MAMLState, episodes: int) -> MAMLState:
    cfg = state.cfg.model_copy(
        update={"maml": state.cfg.maml.model_copy(update={"episodes_per_step": episodes})}
    )
    return MAMLState(
        cfg, state.spec, state.theta, state.optimizer, state.rng, None, state.log_inner_lr
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="MAML run directory")
    parser.add_argument("--episodes", type=int, nargs="+", default=[4, 20])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    default = MAMLTrainConfig.model_validate({"env": {"name": "nav2d"}})
    state = load_maml_run(args.run) if args.run else init_state(default)
    with tempfile.TemporaryDirectory() as tmp:
        out = {
            "env": state.cfg.env.name,
            "weights": state.layout.num_weights,
            "inner_steps": state.settings.steps,
            "onnxruntime": ort.__version__,
            "adapt": [bench_adapt(state, e, args.runs, Path(tmp)) for e in args.episodes],
            "policy": bench_policy(state, args.runs * 10, Path(tmp)),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
