"""Write the bundle's graphs as ONNX (opset >= 17, dynamic batch axis) and check them.

The legacy TorchScript exporter (``dynamo=False``) is used: for these MLPs it reproduces torch
to float32 rounding, while the dynamo exporter has had correctness pitfalls (REFERENCE.md) and
is slower to run. Parity is tested, not assumed (``edgeadapt verify --run``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export.graphs import BATCH, example_inputs
from runtime.bundle import GraphSpec, TensorSpec

DEFAULT_OPSET = 17


def export_graph(
    module: nn.Module, graph: str, dims: Any, path: Path, opset: int = DEFAULT_OPSET
) -> GraphSpec:
    """Export ``module`` as graph ``graph`` ("step", "act" or a family's extra graph) to
    ``path``; ``dims`` is the family's dims object (:class:`export.family.GraphDims`)."""
    inputs, outputs = dims.graph_io(graph)
    export_module(module.eval(), example_inputs(graph, dims), inputs, outputs, path, opset)
    return graph_spec(graph, dims, path.name)


def export_module(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    path: Path,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
) -> None:
    """The one exporter call every graph goes through: legacy TorchScript exporter, named
    I/O, constant folding, a dynamic batch axis unless ``dynamic`` is False (traced graphs
    with static shapes), then the ONNX checker."""
    register_inverse()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes={name: {0: BATCH} for name in inputs + outputs} if dynamic else None,
            do_constant_folding=True,
        )
    check_graph(path)


def register_inverse() -> None:
    """Export ``torch.linalg.inv`` as onnxruntime's ``com.microsoft.Inverse`` (batched, float
    and double on the CPU; ONNX itself has no inverse). Idempotent."""
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic("aten::linalg_inv", _inverse_symbolic, DEFAULT_OPSET)


def _inverse_symbolic(g: Any, a: Any) -> Any:
    return g.op("com.microsoft::Inverse", a).setType(a.type())


def check_graph(path: Path) -> None:
    """ONNX checker with full shape inference; raises on an invalid model."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def graph_spec(graph: str, dims: Any, file: str, precision: str = "fp32") -> GraphSpec:
    """The manifest entry for ``graph`` stored in ``file``."""
    kind = "step" if graph.startswith("step") else graph
    inputs, outputs = dims.graph_io(kind)
    shapes = dims.tensor_shapes(kind)

    def specs(names: tuple[str, ...]) -> list[TensorSpec]:
        return [TensorSpec(name=n, shape=shapes[n][0], dtype=shapes[n][1]) for n in names]

    return GraphSpec(
        file=file,
        inputs=specs(inputs),
        outputs=specs(outputs),
        precision=precision,
        description=DESCRIPTIONS.get(graph, ""),
    )


def graph_opset(path: Path) -> int:
    """The default-domain opset a model file declares."""
    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


DESCRIPTIONS = {
    "step": "fused step: absorb the transition into the state, surprise, action for obs",
    "step_int8": "fused step, weights INT8 (onnxruntime dynamic quantization)",
    "encoder": "transition -> Gaussian factor over the latent (mu, var and/or directions u)",
    "act": "(obs, state) -> deterministic action under the current state (scaled, normalized)",
    "adapt": "episodic adaptation: (state, buffered episodes, mask, params) -> state_out, ok",
}
