"""``edgeadapt verify``: everything that can be checked about a bundle, as one report.

- hashes of every file and the Ed25519 signature (runtime.bundle),
- the ONNX checker on every graph (when the ``onnx`` package is installed),
- the bundle's test vectors through onnxruntime (every step-graph variant),
- with ``--run RUN_DIR``: torch-vs-onnxruntime parity of every float32 graph on >= 10k random
  inputs plus inputs recorded from the runtime's own rollouts on train and test tasks.

Errors are compared as ``|ort - torch| / max(1, |torch|)`` (absolute for values up to 1, such as
actions and latent means; relative for precisions that grow to 1e5); the target is 1e-5, and
1e-4 for full-belief bundles (``factor_rank`` > 0): on ill-conditioned random beliefs (one
direction at precision 1e4, latent means far outside the prior) the posterior amplifies the
few-ulp differences between onnxruntime's and torch's encoder matrix products. Measured on a
trained point-nav bundle with the closed-form float64 update: 9.2e-6 (the mean; surprise 6.9e-6,
cov 2.6e-7), within 1e-5 but with little margin; the earlier sequential float32 Kalman graph:
1.7e-5 to 3.4e-5.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import Manifest, verify_bundle
from runtime.graphio import graph_io_problems
from runtime.providers import CPU
from runtime.selftest import DEFAULT_TOLERANCE, compare_outputs, load_test_vectors, max_rel_err
from runtime.session import GraphSession

log = logging.getLogger(__name__)

PARITY_TARGET = 1e-5  # a family's export declaration may set its own (PEARL full beliefs: 1e-4)
RANDOM_ROWS = 10_000
PARITY_SEED = 99
#: Bytes of step-graph inputs recorded per split for the parity check: 64 tasks for small
#: states, fewer for large ones (MAML nav2d: 21 episodes x 100 steps x 18 KB of weights a row).
RECORDING_BYTES = 256 * 2**20


@dataclass
class VerifyResult:
    """What ``edgeadapt verify --json`` prints; ``ok`` is False when anything failed."""

    bundle: str
    ok: bool
    signature: str
    hashes: str
    onnx_checker: str = "skipped"
    test_vectors: dict[str, float] = field(default_factory=dict)
    parity_max_abs_err: float | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(
    bundle_dir: str | Path,
    pubkey: str | Path | None = None,
    run_dir: str | Path | None = None,
    random_rows: int = RANDOM_ROWS,
) -> VerifyResult:
    """Run every check; with ``pubkey`` a missing signature is a failure."""
    bundle_dir = Path(bundle_dir)
    rep = verify_bundle(bundle_dir, pubkey, require_signature=pubkey is not None)
    res = VerifyResult(str(bundle_dir), rep.ok, rep.signature, rep.hashes, reasons=rep.reasons)
    if rep.manifest is None or rep.hashes != "ok":
        res.ok = False
        return res  # files cannot be trusted: do not load them
    manifest = rep.manifest
    res.onnx_checker = _onnx_checker(bundle_dir, manifest, res.reasons)
    io_problems = graph_io_problems(bundle_dir, manifest)
    res.reasons += io_problems
    if io_problems:  # the graphs cannot be fed what the manifest describes
        res.ok = False
        return res
    res.test_vectors = _test_vectors(bundle_dir, manifest, res.reasons)
    if run_dir is not None:
        res.parity = parity_check(bundle_dir, manifest, Path(run_dir), random_rows)
        res.parity_max_abs_err = res.parity["max_abs_err"]
        target = res.parity.get("target", PARITY_TARGET)
        special = res.parity.get("output_targets", {})
        for name, err in res.parity.get("errors", {}).items():
            goal = special.get(name.split(".", 1)[-1], target)
            if not err <= goal:
                res.reasons.append(f"parity: {name} max error {err:.3g} > target {goal:g}")
        res.reasons += res.parity.get("problems", [])
    res.ok = not res.reasons
    return res


def parity_check(
    bundle_dir: Path, manifest: Manifest, run_dir: Path, random_rows: int = RANDOM_ROWS
) -> dict[str, Any]:
    """Torch (the run's checkpoint) vs onnxruntime (the bundle) on random + recorded inputs."""
    import torch

    from export.calibrate import record_rollouts, tasks_within
    from export.family import family_export
    from export.reference import concat_inputs
    from runtime.agent import Agent, AgentConfig
    from training.checkpoint import load_run

    run = load_run(run_dir)
    problems = _run_matches(run, manifest)
    if problems:
        return {"max_abs_err": float("inf"), "problems": problems}
    family = family_export(run)
    modules = family.reference_modules(run)
    dims = family.dims_of(run)
    rng = np.random.default_rng(PARITY_SEED)
    agent = Agent(manifest, bundle_dir, [CPU], AgentConfig(warmup=1))
    env, eps = run.config.env.name, run.config.eval.episodes
    row_bytes = 4 * sum(int(np.prod(x.shape)) for x in agent.session.inputs.values())
    tasks = tasks_within(RECORDING_BYTES, row_bytes, eps * run.family.spec.horizon, 64)
    recorded = [
        record_rollouts(agent, env, s, tasks, eps, PARITY_SEED).inputs for s in ("train", "test")
    ]
    random = dims.random_step_inputs(run.family.spec, random_rows, rng)
    inputs = concat_inputs(random, *recorded)
    errors: dict[str, float] = {}
    problems = []
    with torch.no_grad():
        for graph in modules:
            graph_errors, graph_problems = _graph_parity(
                bundle_dir, manifest, graph, modules[graph], inputs
            )
            errors |= {f"{graph}.{k}": v for k, v in graph_errors.items()}
            problems += graph_problems
        if hasattr(family, "extra_parity"):  # graphs the step inputs cannot feed (MAML's adapt)
            errors |= family.extra_parity(run, bundle_dir, manifest)
    return {
        "target": family.parity_target(run)
        if hasattr(family, "parity_target")
        else family.PARITY_TARGET,
        "max_abs_err": max(errors.values()),
        "errors": errors,
        "random_rows": random_rows,
        "recorded_rows": int(sum(len(r["transition"]) for r in recorded)),
        "problems": problems,
    }


def _graph_parity(
    bundle_dir: Path,
    manifest: Manifest,
    graph: str,
    module: Any,
    step_inputs: dict[str, np.ndarray],
) -> tuple[dict[str, float], list[str]]:
    """Worst error per output and flag mismatches of one graph against its torch module,
    compared chunk by chunk (a large state, MAML's weights, would otherwise need GB)."""
    from export.calibrate import CHUNK_ROWS

    spec = manifest.graph(graph)
    feeds = {t.name: step_inputs[t.name] for t in spec.inputs}  # paired by name
    session = GraphSession(bundle_dir / spec.file, spec, providers=[CPU])
    errors: dict[str, float] = {}
    flags: dict[str, list[int]] = {}
    n = len(next(iter(feeds.values())))
    for start in range(0, n, CHUNK_ROWS):
        chunk = {k: v[start : start + CHUNK_ROWS] for k, v in feeds.items()}
        _compare_chunk(session, module, spec, chunk, errors, flags)
    problems = [
        f"{graph}.{name}: {bad} of {size} flags differ from torch"
        for name, (bad, size) in flags.items()
        if bad
    ]
    return errors, problems


def _compare_chunk(
    session: GraphSession,
    module: Any,
    spec: Any,
    feeds: dict[str, np.ndarray],
    errors: dict[str, float],
    flags: dict[str, list[int]],
) -> None:
    """Fold one chunk's errors (worst so far) and flag mismatch counts into the totals."""
    import torch

    got = session.run_feeds(feeds)
    args = (torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in spec.inputs)
    ref = {t.name: r.numpy() for t, r in zip(spec.outputs, module(*args), strict=True)}
    keep = np.ones(len(next(iter(feeds.values()))), dtype=bool)
    for arr in feeds.values():  # rows with a non-finite input carry no values
        keep &= np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if "updated" in ref:
        keep &= ref["updated"]
    for name, want in ref.items():
        if want.dtype == np.bool_:
            total = flags.setdefault(name, [0, 0])
            total[0] += int((got[name] != want).sum())
            total[1] += want.size
        elif keep.any():
            err = max_rel_err(got[name][keep], want[keep])
            errors[name] = max(errors.get(name, 0.0), err)


def _run_matches(run: Any, manifest: Manifest) -> list[str]:
    cfg = run.config
    problems = []
    if cfg.env.name != manifest.env:
        problems.append(f"run is for env {cfg.env.name!r}, bundle for {manifest.env!r}")
    if cfg.algo != manifest.algorithm:
        problems.append(f"run is {cfg.algo}, bundle is {manifest.algorithm}")
        return problems
    from export.family import family_export

    ours = [(s.name, s.shape) for s in family_export(run).adaptation(run).state]
    theirs = [(s.name, s.shape) for s in manifest.adaptation.state]
    if ours != theirs:
        problems.append(f"run's adaptation state {ours} != bundle's {theirs}")
    return problems


def _onnx_checker(bundle_dir: Path, manifest: Manifest, reasons: list[str]) -> str:
    try:
        import onnx
    except ModuleNotFoundError:
        return "skipped (onnx not installed)"
    for name, spec in manifest.graphs.items():
        try:
            model = onnx.load(str(bundle_dir / spec.file))
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:  # the checker raises several types
            reasons.append(f"onnx checker: graph {name}: {exc}")
            return f"failed: {name}"
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if opset != manifest.opset:
            reasons.append(f"graph {name} has opset {opset}, manifest says {manifest.opset}")
    return "ok"


def _test_vectors(bundle_dir: Path, manifest: Manifest, reasons: list[str]) -> dict[str, float]:
    vectors = load_test_vectors(str(bundle_dir / manifest.test_vectors))
    out = {}
    for graph in (g for g in manifest.graphs if g.startswith("step")):
        spec = manifest.graph(graph)
        keys = [f"in/{t.name}" for t in spec.inputs] + [
            f"out/{graph}/{t.name}" for t in spec.outputs
        ]
        missing = [k for k in keys if k not in vectors]
        if missing:
            reasons.append(f"test vectors {graph}: missing {', '.join(missing)}")
            continue
        inputs = {t.name: vectors[f"in/{t.name}"] for t in spec.inputs}
        expected = {t.name: vectors[f"out/{graph}/{t.name}"] for t in spec.outputs}
        session = GraphSession(bundle_dir / spec.file, spec, providers=[CPU])
        err, problems = compare_outputs(session.run_feeds(inputs), expected)
        tol = manifest.test_tolerance.get(graph, DEFAULT_TOLERANCE)
        out[graph] = err
        reasons += [f"test vectors {graph}: {p}" for p in problems]
        if not err <= tol:
            reasons.append(f"test vectors {graph}: max error {err:.3g} > tolerance {tol:g}")
    return out
