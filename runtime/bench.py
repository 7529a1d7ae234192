"""``edgeadapt bench runtime`` and ``bench belief``: latency, throughput, memory, cold start.

All latencies are per *step* = one ``act`` + one ``observe`` of a single agent (µs, medians
and p99 over thousands of steps), fed a recorded trajectory from the bundle's task family.
Peak RSS and cold start come from a fresh child process that imports only the runtime (this
process may hold torch for the eager comparison), so they are what a device would see.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.agent import Agent, AgentConfig
from runtime.bundle import load_verified
from runtime.errors import BundleError
from runtime.evaluation import held_out_tasks
from runtime.providers import CPU, SessionTuning
from runtime.tasks import make_family

log = logging.getLogger(__name__)

BATCHES = (1, 64, 1024)
CONTEXT_LENGTHS = (10, 100, 1_000, 10_000, 100_000)


def bench_runtime(
    bundle_dir: str | Path,
    steps: int = 20_000,
    pubkey: str | None = None,
    profile: str | None = None,
    cold_runs: int = 3,
    rounds: int = 10,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Every number of ``bench runtime`` as one JSON-able dict.

    The configurations (tuned runtime, each onnxruntime choice, torch eager) are timed
    *interleaved*, ``rounds`` chunks each in turn, so a change in machine load while the
    benchmark runs hits them all alike and their ratios stay meaningful.
    """
    bundle_dir = Path(bundle_dir)
    manifest = load_verified(bundle_dir, pubkey)
    traj = trajectory(manifest.env, 2000)
    runners = {
        name: agent_runner(Agent(manifest, bundle_dir, [CPU], cfg), traj)
        for name, cfg in tuning_variants(manifest).items()
    }
    torch_run = torch_runner(bundle_dir, traj, run_dir)
    if torch_run is not None:
        runners["torch_eager"] = torch_run
    lat = interleaved(runners, steps, rounds)
    tuned = lat[TUNED]
    out: dict[str, Any] = {
        "bundle": str(bundle_dir),
        "env": manifest.env,
        "algorithm": manifest.algorithm,
        "step_us_median": _median(tuned),
        "step_us_p99": float(np.percentile(tuned, 99)),
        "steps": steps,
        "torch_eager_us_median": _median(lat["torch_eager"]) if torch_run else None,
    }
    out["speedup_vs_torch"] = (
        out["torch_eager_us_median"] / out["step_us_median"] if torch_run else None
    )
    out |= cold_start(bundle_dir, pubkey, cold_runs)
    out |= flops(manifest, out["step_us_median"])
    out["batched"] = batched_throughput(manifest, bundle_dir, traj)
    out["tuning"] = {name: _median(v) for name, v in lat.items() if name != "torch_eager"}
    out["tuning"]["first_call_without_warmup_us"] = _first_call_us(manifest, bundle_dir, traj)
    out["load_average"] = os.getloadavg()[0]
    out["cpu_count"] = os.cpu_count()
    if profile is not None:
        out["budget"] = _budget(profile, out["step_us_median"], out["rss_mb"])
    return out


TUNED = "one_thread_sequential_iobinding"
Runner = Callable[[int], np.ndarray]


def tuning_variants(manifest: Any) -> dict[str, AgentConfig]:
    """The onnxruntime choices compared; :data:`TUNED` is what the runtime uses by default."""
    variants = {
        "ort_defaults_run": AgentConfig(
            tuning=SessionTuning(intra_op_threads=0, sequential=False), iobinding=False
        ),
        "one_thread_sequential_run": AgentConfig(iobinding=False),
        TUNED: AgentConfig(),
        "basic_graph_optimization": AgentConfig(tuning=SessionTuning(optimize_all=False)),
    }
    if "step_int8" in manifest.graphs:
        variants["int8_step_graph"] = AgentConfig(precision="int8")
    return variants


def agent_runner(agent: Agent, traj: dict[str, np.ndarray]) -> Runner:
    """A closure timing ``n`` more steps of ``agent`` along ``traj`` (continuing each call)."""
    pos = [0]

    def run(n: int) -> np.ndarray:
        out = step_latencies(agent, traj, n, start=pos[0])
        pos[0] += n
        return out

    return run


def torch_runner(
    bundle_dir: Path, traj: dict[str, np.ndarray], run_dir: str | Path | None = None
) -> Runner | None:
    """The same step in torch eager (numpy in/out, one thread), when torch is installed: the
    run's own step module with ``run_dir``, else rebuilt from the bundle (PEARL)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx") is None:
        return None
    from export.torch_reference import TorchStepper

    try:
        return TorchStepper(bundle_dir, traj, run_dir=run_dir).run
    except (KeyError, RuntimeError, ValueError) as exc:
        # The torch model is rebuilt from the graph's named weights; a bundle written by an
        # older exporter may not match. The ONNX figures stand on their own.
        log.warning(
            "torch eager comparison skipped: cannot rebuild the model from %s: %r", bundle_dir, exc
        )
        return None


def interleaved(runners: dict[str, Runner], steps: int, rounds: int) -> dict[str, np.ndarray]:
    """``steps`` timed steps per runner, in ``rounds`` alternating chunks."""
    chunk = max(1, steps // rounds)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            parts[name].append(run(chunk))
    return {name: np.concatenate(p) for name, p in parts.items()}


def trajectory(env: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` consecutive (obs, normalized action, reward, next_obs) from the family under a
    smooth random policy, episodes chained; the same inputs feed every configuration."""
    family = make_family(env, 1)
    spec = family.spec
    rng = np.random.default_rng(seed)
    task = held_out_tasks(family, "test", 1, seed)
    obs = family.reset(task, rng)
    rows: dict[str, list[np.ndarray]] = {"obs": [], "act": [], "rew": [], "next": []}
    act = np.zeros((1, spec.act_dim), dtype=np.float32)
    for _ in range(n):
        act = np.clip(0.8 * act + 0.4 * rng.normal(size=act.shape), -1, 1).astype(np.float32)
        res = family.step(spec.act_low + (spec.act_high - spec.act_low) / 2 * (act + 1))
        rows["obs"].append(obs[0])
        rows["act"].append(act[0])
        rows["rew"].append(res.reward[:1])
        rows["next"].append(res.obs[0])
        obs = family.reset(task, rng) if res.truncated[0] or res.terminated[0] else res.obs
    return {k: np.asarray(v, dtype=np.float32) for k, v in rows.items()}


def step_latencies(
    agent: Agent, traj: dict[str, np.ndarray], steps: int, start: int = 0
) -> np.ndarray:
    """Per-step (act + observe) wall times in µs of one agent along ``traj`` (cyclically)."""
    n = len(traj["obs"])
    out = np.empty(steps)
    obs, rew, nxt = traj["obs"], traj["rew"], traj["next"]
    clock = time.perf_counter_ns
    for i in range(steps):
        j = (start + i) % n
        o = obs[j]
        t0 = clock()
        a = agent.act(o)
        agent.observe(o, a, float(rew[j, 0]), nxt[j])
        out[i] = clock() - t0
    return out / 1e3


def batched_throughput(
    manifest: Any, bundle_dir: Path, traj: dict[str, np.ndarray], calls: int = 200
) -> dict[str, dict[str, float]]:
    """Agent-steps per second with B agents stepped in one call (act + observe), B in 1, 64,
    1024; each agent follows the trajectory from its own offset, so consecutive calls chain."""
    out = {}
    n_rows = len(traj["obs"])
    for b in BATCHES:
        agent = Agent(manifest, bundle_dir, [CPU], AgentConfig())
        agent.reset(b)
        offsets = (np.arange(b) * 37) % n_rows
        n = max(10, calls if b < 1024 else calls // 10)
        times = np.empty(n)
        for i in range(n):
            idx = (offsets + i) % n_rows
            o, r, nx = traj["obs"][idx], traj["rew"][idx, 0], traj["next"][idx]
            t0 = time.perf_counter_ns()
            a = agent.act(o)
            agent.observe(o, a, r, nx)
            times[i] = time.perf_counter_ns() - t0
        med = float(np.median(times)) / 1e3
        out[str(b)] = {"call_us_median": med, "agent_steps_per_s": b / med * 1e6}
    return out


def cold_start(bundle_dir: Path, pubkey: str | None, runs: int) -> dict[str, float]:
    """Median time (s) from spawning a fresh interpreter to its first action, and the child's
    peak RSS (MB) after 2000 more steps."""
    results = [_cold_start_once(bundle_dir, pubkey) for _ in range(max(1, runs))]
    return {
        "cold_start_s": float(np.median([r["first_action_s"] for r in results])),
        "rss_mb": float(np.median([r["rss_mb"] for r in results])),
        "cold_start_breakdown_s": results[0]["breakdown_s"],
    }


def belief_scaling(
    bundle_dir: str | Path, lengths: tuple[int, ...] = CONTEXT_LENGTHS, reps: int = 200
) -> dict[str, Any]:
    """Per-step cost at context length T: running natural parameters (the runtime) vs the
    naive recompute (encoder over all T transitions + product of Gaussians every step)."""
    from runtime.posterior import full_product_of_gaussians, product_of_gaussians
    from runtime.session import GraphSession

    bundle_dir = Path(bundle_dir)
    manifest = load_verified(bundle_dir)
    pearl = manifest.adaptation
    if pearl.algorithm != "pearl":
        raise BundleError(
            f"{bundle_dir}: bench belief compares PEARL's running belief with a recompute; "
            f"this bundle is {pearl.algorithm}"
        )
    traj = trajectory(manifest.env, 5000)
    context = np.concatenate([traj["obs"], traj["act"], traj["rew"], traj["next"]], axis=1)
    context = np.resize(context, (max(lengths) + 1, context.shape[1])).astype(np.float32)
    agent = Agent(manifest, bundle_dir, [CPU], AgentConfig())
    enc = GraphSession(bundle_dir / manifest.graph("encoder").file, manifest.graph("encoder"))
    rows = []
    for t in lengths:
        _feed(agent, traj, t - int(agent.belief.count))
        o1 = _median(step_latencies(agent, traj, reps))
        naive = []
        for _ in range(max(3, min(reps, 200_000 // t))):
            t0 = time.perf_counter_ns()
            f = enc.run_feeds({"transition": context[: t + 1]})
            if pearl.full_belief:
                full_product_of_gaussians(f["mu"], f.get("var"), f.get("u"), pearl.prior_var)
            else:
                product_of_gaussians(f["mu"], f["var"], pearl.prior_var)
            naive.append((time.perf_counter_ns() - t0) / 1e3)
        rows.append({"context": t, "o1_step_us": o1, "naive_step_us": _median(naive)})
    state_bytes = sum(a.nbytes for a in agent.state.values()) + agent._count.nbytes
    return {"bundle": str(bundle_dir), "rows": rows, "belief_state_bytes": state_bytes}


# -- helpers ---------------------------------------------------------------------------------
def _feed(agent: Agent, traj: dict[str, np.ndarray], count: int) -> None:
    """Absorb ``count`` more transitions from ``traj`` (cyclically) without timing them."""
    n = len(traj["obs"])
    obs, act, rew, nxt = traj["obs"], traj["act"], traj["rew"], traj["next"]
    for i in range(max(0, count)):
        j = i % n
        agent.observe(obs[j], act[j], float(rew[j, 0]), nxt[j])


def flops(manifest: Any, step_us: float) -> dict[str, Any]:
    """Matrix FLOPs of one step (from the manifest) and the rate they run at."""
    per_step = manifest.provenance.get("flops_per_step", {}).get("step")
    if not per_step:
        return {"flops_per_step": None, "gflops_per_s": None}
    return {"flops_per_step": per_step, "gflops_per_s": per_step / (step_us * 1e3)}


def _first_call_us(manifest: Any, bundle_dir: Path, traj: dict[str, np.ndarray]) -> float:
    agent = Agent(manifest, bundle_dir, [CPU], replace(AgentConfig(), warmup=0))
    return float(step_latencies(agent, traj, 1)[0])


def _cold_start_once(bundle_dir: Path, pubkey: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "runtime.coldstart", str(bundle_dir)]
    if pubkey:
        cmd += ["--pubkey", str(pubkey)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child failed: {proc.stderr.strip()[-500:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["first_action_s"] = res["first_action_at"] - t0
    return res


def _budget(profile_name: str, step_us: float, rss_mb: float) -> dict[str, Any]:
    from devices.profiles import check_budget, load_profile

    profile = load_profile(profile_name)
    violations = check_budget(profile, step_us=step_us, rss_mb=rss_mb)
    return {
        "profile": profile.name,
        "step_budget_us": profile.step_budget_us,
        "memory_budget_mb": profile.memory_budget_mb,
        "ok": not violations,
        "violations": violations,
    }


def _median(x: np.ndarray | list[float]) -> float:
    return float(np.median(np.asarray(x)))
