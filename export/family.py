"""What a meta-RL family declares to be exported: the export half of the adaptation contract.

Each exportable registry entry (:mod:`training.registry`) names a module that provides:

- ``dims_of(run) -> GraphDims``: the sizes its graphs are built for, with ``graph_io(graph)``
  (input and output names), ``tensor_shapes(graph)`` (name -> (shape with "batch", dtype)) and
  ``random_step_inputs(spec, n, rng, nonfinite_share)`` (step-graph inputs covering what a
  device can meet, for parity and test vectors);
- ``reference_modules(run) -> {graph: nn.Module}``: torch modules of the ``step`` and ``act``
  graphs (and any extra graph the family ships) sharing the run's trained weights;
- ``adaptation(run, recording) -> Adaptation``: the manifest declaration (state tensors with
  their initial values, params, summary); ``recording`` holds the calibration rollouts'
  step-graph inputs (None for the draft manifest), for families whose summary is fitted;
- ``PARITY_TARGET``: the torch-vs-onnxruntime error the family's graphs must meet.

Optional: ``parity_target(run)`` (a target that depends on the run: PEARL's full beliefs),
``OUTPUT_TARGETS`` (per-output targets: RL²'s surprise), ``export_graphs(run, modules, out,
opset)`` (graphs the generic exporter cannot write, and extra files: MAML's traced adapt graph
and ``theta.npy``) ``extra_parity(run, bundle_dir, manifest)`` (parity of graphs that the
step inputs cannot feed: MAML's adapt graph) and ``INT8_UNSUPPORTED`` (why an INT8 step graph
makes no sense for the family: MAML's weights are a graph input).

The bundle writer, ``verify`` and the INT8 pass use only these; nothing there tests for an
algorithm by name.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Protocol

import numpy as np

from runtime.tasks.base import FamilySpec


class GraphDims(Protocol):
    """The graph-signature object of a family (PEARL: :class:`export.graphs.Dims`)."""

    obs: int
    act: int

    def graph_io(self, graph: str) -> tuple[tuple[str, ...], tuple[str, ...]]: ...

    def tensor_shapes(self, graph: str) -> dict[str, tuple[list[int | str], str]]: ...

    def random_step_inputs(
        self, spec: FamilySpec, n: int, rng: np.random.Generator, nonfinite_share: float = 0.02
    ) -> dict[str, np.ndarray]: ...


def family_export(run: Any) -> ModuleType:
    """The export declaration of a loaded run's algorithm (a clear error if it has none)."""
    from training.registry import entry_of

    return entry_of(run.config).exporter()
