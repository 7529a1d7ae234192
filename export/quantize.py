"""INT8 variant of the step graph (onnxruntime dynamic quantization) and what it costs.

Weights of every Gemm/MatMul are stored as int8 and activations are quantized on the fly
(``quantize_dynamic``): 3.5x smaller graph, no calibration set needed. The belief arithmetic
stays float32: only products with a weight matrix (an initializer) are quantized, never the
full belief's covariance products, whose entries span orders of magnitude that one per-tensor
int8 scale cannot hold. Caveat: the activation scale is computed per call over the whole
batch, so in batched mode one agent's inputs change the rounding of the others', and a NaN
row would poison them all (the runtime zeroes non-finite rows before an INT8 call for that
reason).

Reported: parity against the torch float32 reference on the test-vector inputs and 10k random
(finite) inputs, and the change in meta-test return versus the float32 graph.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from export.family import family_export
from export.graphs import Dims
from export.onnx_export import check_graph, graph_spec
from export.reference import torch_step
from runtime.agent import Agent, AgentConfig
from runtime.bundle import GraphSpec, Manifest
from runtime.evaluation import held_out_tasks, rollout
from runtime.providers import CPU
from runtime.selftest import max_rel_err
from runtime.session import GraphSession
from runtime.tasks import make_family
from training.checkpoint import LoadedRun

log = logging.getLogger(__name__)

INT8_FILE = "step_int8.onnx"


def quantize_step(
    bundle_dir: Path,
    draft: Manifest,
    graphs: dict[str, GraphSpec],
    vector_inputs: dict[str, np.ndarray],
    step_module: torch.nn.Module,
    run: LoadedRun,
) -> tuple[GraphSpec, dict[str, np.ndarray], dict[str, Any]]:
    """Write ``step_int8.onnx``; return its spec, its test-vector outputs and a report."""
    dims = family_export(run).dims_of(run)
    src, dst = bundle_dir / graphs["step"].file, bundle_dir / INT8_FILE
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=activation_products(src),
    )
    check_graph(dst)
    spec = graph_spec("step_int8", dims, INT8_FILE, precision="int8")
    session = GraphSession(dst, spec, providers=[CPU])
    expected = session.run_feeds(vector_inputs)
    manifest = draft.model_copy(update={"graphs": {**graphs, "step_int8": spec}})
    report = {
        "parity_max_abs_err": _parity(session, step_module, dims, run, vector_inputs),
        **_return_change(manifest, bundle_dir, run),
        "size_bytes": dst.stat().st_size,
        "fp32_size_bytes": src.stat().st_size,
    }
    log.info("int8 variant: %s", report)
    return spec, expected, report


def activation_products(path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes of a graph that multiply two activations (no weight)."""
    import onnx

    model = onnx.load(str(path))
    weights = {t.name for t in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and not any(i in weights for i in n.input)
    ]


def _parity(
    session: GraphSession,
    module: torch.nn.Module,
    dims: Dims,
    run: LoadedRun,
    vector_inputs: dict[str, np.ndarray],
) -> float:
    rng = np.random.default_rng(7)
    random = dims.random_step_inputs(run.family.spec, 10_000, rng)
    worst = 0.0
    for inputs in (vector_inputs, random):
        # INT8 activations are quantized per call over the whole batch: a NaN row would poison
        # every row, so (like the runtime does) only finite transitions are fed.
        finite = np.isfinite(inputs["transition"]).all(axis=1)
        inputs = {k: v[finite] for k, v in inputs.items()}
        got, ref = session.run_feeds(inputs), torch_step(module, inputs, dims)
        keep = ref["updated"]  # rows with a NaN/inf transition carry no values
        for k in ("action", "action_norm"):
            worst = max(worst, max_rel_err(got[k][keep], ref[k][keep]))
    return worst


def _return_change(manifest: Manifest, bundle_dir: Path, run: LoadedRun) -> dict[str, float]:
    cfg = run.config
    tasks = held_out_tasks(make_family(cfg.env.name, 1), "test", cfg.eval.tasks, 0)
    base = AgentConfig(warmup=1)
    returns = {}
    for precision in ("fp32", "int8"):
        agent = Agent(manifest, bundle_dir, [CPU], replace(base, precision=precision))
        res = rollout(agent, cfg.env.name, tasks, cfg.eval.episodes, 0)
        returns[precision] = float(res.returns_TE.mean())
    change = returns["int8"] - returns["fp32"]
    return {
        "return_fp32": returns["fp32"],
        "return_int8": returns["int8"],
        "return_change": change,
        "return_change_pct": 100.0 * change / max(abs(returns["fp32"]), 1e-9),
    }
