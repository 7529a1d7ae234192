"""Does a bundle's manifest describe its graphs? Declared I/O against the ONNX files' real I/O.

A signed manifest can still be wrong (a packaging bug, a hand edit before signing): an ``obs.dim``
that contradicts the graphs only surfaced as a numpy broadcast error deep in the health gate.
:func:`graph_io_problems` compares, for every graph of the manifest, each declared
:class:`~runtime.bundle.TensorSpec` (name, rank, every fixed axis, dtype) with the input or
output onnxruntime reads from the file, and the observation and action boxes with the tensors
that carry them (``obs``, ``action``, ``transition`` = obs, action, reward, next obs), when a
graph has them. Symbolic axes (any name) match the declared ``"batch"`` axis. Nothing here is
specific to one algorithm's state tensors: those are checked through their TensorSpecs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.bundle import Manifest, TensorSpec

#: onnxruntime's type strings for the manifest's dtypes.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def graph_io_problems(bundle_dir: str | Path, manifest: Manifest) -> list[str]:
    """One sentence per disagreement between the manifest and its graphs; empty when none."""
    import onnxruntime as ort

    problems: list[str] = []
    for name, spec in sorted(manifest.graphs.items()):
        try:
            sess = ort.InferenceSession(
                str(Path(bundle_dir) / spec.file), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several types for a bad file
            problems.append(f"graph {name}: cannot be loaded ({_first_line(exc)})")
            continue
        actual_in = {a.name: a for a in sess.get_inputs()}
        actual_out = {a.name: a for a in sess.get_outputs()}
        problems += compare_io(name, "input", spec.inputs, actual_in)
        problems += compare_io(name, "output", spec.outputs, actual_out)
        problems += _box_problems(name, manifest, {**actual_in, **actual_out})
    return problems


def compare_io(
    graph: str, kind: str, declared: list[TensorSpec], actual: dict[str, Any]
) -> list[str]:
    """Declared tensors against an onnxruntime session's I/O args (name, dtype, shape)."""
    problems = []
    names = [t.name for t in declared]
    if set(names) != set(actual):
        problems.append(
            f"graph {graph}: manifest declares {kind}s {sorted(names)}, the file has "
            f"{sorted(actual)}"
        )
    for spec in declared:
        arg = actual.get(spec.name)
        if arg is None:
            continue
        where = f"graph {graph} {kind} {spec.name!r}"
        dtype = ORT_DTYPES.get(arg.type, arg.type)
        if dtype != spec.dtype:
            problems.append(f"{where}: manifest says {spec.dtype}, the file has {dtype}")
        shape = list(arg.shape)
        if len(shape) != len(spec.shape) or not all(
            _axis_agrees(d, a) for d, a in zip(spec.shape, shape, strict=True)
        ):
            problems.append(
                f"{where}: manifest says shape {spec.shape}, the file has {_show(shape)}"
            )
    return problems


def _box_problems(graph: str, manifest: Manifest, tensors: dict[str, Any]) -> list[str]:
    o, a = manifest.obs.dim, manifest.act.dim
    expected = {
        "obs": (o, f"obs.dim {o}"),
        "next_obs": (o, f"obs.dim {o}"),
        "action": (a, f"act.dim {a}"),
        "transition": (2 * o + a + 1, f"2 * obs.dim + act.dim + 1 = {2 * o + a + 1}"),
    }
    problems = []
    for name, (want, why) in expected.items():
        arg = tensors.get(name)
        if arg is None or not arg.shape:
            continue
        last = arg.shape[-1]
        if isinstance(last, int) and last != want:
            problems.append(f"graph {graph} tensor {name!r} has last axis {last}, manifest {why}")
    return problems


def _axis_agrees(declared: int | str, actual: int | str | None) -> bool:
    """A fixed axis must be equal; a declared symbolic axis must be symbolic in the file."""
    if isinstance(declared, int):
        return not isinstance(actual, int) or actual == declared
    return not isinstance(actual, int)


def _show(shape: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else repr(d) for d in shape) + "]"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
