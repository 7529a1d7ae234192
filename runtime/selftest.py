"""On-device self-test: the bundle's test vectors through onnxruntime, then timed steps.

``test_vectors.npz`` holds ``in/<input>`` arrays (N rows of step-graph inputs, recorded from
in-distribution rollouts and random draws at export) and ``out/<graph>/<output>`` arrays, the
expected outputs of each step graph variant. The error of a float output is
``|got - expected| / max(1, |expected|)``: absolute for values up to 1 (actions, means) and
relative for large ones (precisions can reach 1e5); boolean outputs must match exactly.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from runtime.errors import BundleError

if TYPE_CHECKING:
    from runtime.agent import Agent, SelfTestReport

DEFAULT_TOLERANCE = 1e-4


def load_test_vectors(path: str) -> dict[str, np.ndarray]:
    """Arrays of a test-vector file (no pickles: ``allow_pickle=False``)."""
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):  # a bare .npy array, not an archive
            raise ValueError("not an .npz archive")
        with data:
            return {k: data[k] for k in data.files}
    except EOFError:  # an empty file
        raise BundleError(f"{path}: unreadable test vectors (empty file)") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # truncated, corrupt
        raise BundleError(f"{path}: unreadable test vectors ({exc})") from None


def compare_outputs(
    got: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> tuple[float, list[str]]:
    """Largest abs-or-relative float error and the boolean mismatches, by output name.

    Rows the expected ``updated`` flag marks False carry no meaningful values (non-finite
    transition): only the flag itself is compared there.
    """
    worst, problems = 0.0, []
    keep = expected.get("updated")
    for name, exp in expected.items():
        out = got[name]
        if out.shape != exp.shape:
            problems.append(f"{name}: shape {out.shape} != expected {exp.shape}")
        elif exp.dtype == np.bool_:
            bad = int((out != exp).sum())
            if bad:
                problems.append(f"{name}: {bad} of {exp.size} flags differ")
        elif keep is not None and len(keep) == len(exp):
            worst = max(worst, max_rel_err(out[keep], exp[keep]))
        else:
            worst = max(worst, max_rel_err(out, exp))
    return worst, problems


def max_rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max(1, |expected|) over finite-compatible entries (NaN -> inf)."""
    got = got.astype(np.float64)
    expected = expected.astype(np.float64)
    err = np.abs(got - expected) / np.maximum(1.0, np.abs(expected))
    err = np.where(np.isnan(err), np.inf, err)
    return float(err.max()) if err.size else 0.0


def run_self_test(agent: Agent, steps: int = 200) -> SelfTestReport:
    """Check ``agent``'s step graph against the bundle's test vectors and time ``steps`` steps."""
    from runtime.agent import SelfTestReport

    manifest, reasons = agent.manifest, []
    vectors = load_test_vectors(str(agent.bundle_dir / manifest.test_vectors))
    graph = agent.graph_name
    inputs = {t.name: vectors.get(f"in/{t.name}") for t in agent.session.spec.inputs}
    expected = {t.name: vectors.get(f"out/{graph}/{t.name}") for t in agent.session.spec.outputs}
    missing = [k for k, v in {**inputs, **expected}.items() if v is None]
    if missing:
        reasons.append(f"test vectors lack {', '.join(missing)} for graph {graph}")
        return SelfTestReport(False, float("inf"), float("nan"), reasons)
    err, problems = compare_outputs(agent.session.run_feeds(inputs), expected)
    reasons += problems
    tol = manifest.test_tolerance.get(graph, DEFAULT_TOLERANCE)
    if not err <= tol:
        reasons.append(f"test vectors: max error {err:.3g} > tolerance {tol:.3g}")
    transitions = inputs["transition"]
    finite = transitions[np.isfinite(transitions).all(axis=1)]  # time normal steps only
    median_us, step_problems = _timed_steps(agent, finite if len(finite) else transitions, steps)
    reasons += step_problems
    return SelfTestReport(not reasons, err, median_us, reasons)


def _timed_steps(agent: Agent, transitions: np.ndarray, steps: int) -> tuple[float, list[str]]:
    """Median act+observe time (µs) of a fresh single agent fed recorded transitions."""
    from runtime.agent import Agent

    probe = Agent(agent.manifest, agent.bundle_dir, agent.providers, replace(agent.config))
    o, a = agent.manifest.obs.dim, agent.manifest.act.dim
    times, problems = [], []
    obs = transitions[0, :o]
    for i in range(steps):
        row = transitions[i % len(transitions)]
        reward, nxt = float(row[o + a]), row[o + a + 1 :]
        t0 = time.perf_counter_ns()
        act = probe.act(obs)
        probe.observe(obs, act, reward, nxt)
        times.append(time.perf_counter_ns() - t0)
        if not (np.isfinite(act).all() and np.abs(act).max() <= 1.0):
            problems.append(f"step {i}: action {act} not finite or outside [-1, 1]")
            break
        obs = nxt
    return float(np.median(times) / 1e3), problems
