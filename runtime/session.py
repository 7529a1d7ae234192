"""One ONNX graph with pre-allocated, pre-bound input and output buffers.

The caller writes inputs into :attr:`GraphSession.inputs` (numpy arrays, fixed shapes for the
current batch size), calls :meth:`GraphSession.run`, and reads :attr:`GraphSession.outputs`.
With IOBinding the arrays are bound once by address, so a step allocates nothing: this is what
brings a small graph from ~25 µs to ~15 µs per call (REFERENCE.md); ``iobinding=False`` uses the
plain ``run()`` path (measured side by side in ``bench runtime``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.bundle import GraphSpec
from runtime.errors import BundleError
from runtime.providers import SessionTuning, make_session

_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}


class GraphSession:
    """A tuned onnxruntime session for one graph of a bundle, at batch size ``batch``."""

    def __init__(
        self,
        path: str | Path,
        spec: GraphSpec,
        batch: int = 1,
        providers: list[str] | None = None,
        tuning: SessionTuning | None = None,
        iobinding: bool = True,
    ) -> None:
        self.spec = spec
        try:
            self.session = make_session(path, providers, tuning)
        except Exception as exc:  # onnxruntime raises its own types for corrupt graphs
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"{path}: onnxruntime cannot load the graph ({exc})") from None
        self._check_signature()
        self.iobinding = iobinding
        self.recorder: Callable[[dict[str, np.ndarray]], None] | None = None
        self.batch = 0
        self.resize(batch)

    @property
    def providers(self) -> list[str]:
        """Providers the session actually runs on, best first."""
        return list(self.session.get_providers())

    def resize(self, batch: int) -> None:
        """(Re)allocate and bind every buffer for ``batch`` rows (contents are zeroed)."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.batch = batch
        self.inputs = {t.name: self._alloc(t.shape, t.dtype) for t in self.spec.inputs}
        self.outputs = {t.name: self._alloc(t.shape, t.dtype) for t in self.spec.outputs}
        self._run: Callable[[], None] = self._runner()

    def run(self) -> None:
        """Run the graph on :attr:`inputs`, writing :attr:`outputs` in place."""
        self._run()

    def set_recorder(self, recorder: Callable[[dict[str, np.ndarray]], None] | None) -> None:
        """Call ``recorder(inputs)`` before every run (export records calibration inputs)."""
        self.recorder = recorder
        self._run = self._runner()

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on arbitrary arrays (any batch size) and return fresh outputs: for tests/verify."""
        names = [t.name for t in self.spec.outputs]
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def warm_up(self, calls: int = 20) -> None:
        """First calls are slow (allocation, kernel selection): run some before the loop starts."""
        for _ in range(calls):
            self.run()

    # -- helpers -----------------------------------------------------------------------------
    def _alloc(self, shape: list[int | str], dtype: str) -> np.ndarray:
        concrete = [self.batch if isinstance(s, str) else s for s in shape]
        return np.zeros(concrete, dtype=_DTYPES[dtype])

    def _runner(self) -> Callable[[], None]:
        bound = self._bind() if self.iobinding else self._plain
        recorder = self.recorder
        if recorder is None:
            return bound

        def run() -> None:
            recorder(self.inputs)
            bound()

        return run

    def _bind(self) -> Callable[[], None]:
        binding = self.session.io_binding()
        # OrtValues over the numpy buffers (zero-copy on CPU); keep them alive with the binding.
        self._values = []
        for name, arr in self.inputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr)
            binding.bind_ortvalue_input(name, value)
            self._values.append(value)
        for name, arr in self.outputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr)
            binding.bind_ortvalue_output(name, value)
            self._values.append(value)
        # The C++ session's method directly: the Python wrapper adds ~1 µs per call.
        sess, c_binding = getattr(self.session, "_sess", None), getattr(binding, "_iobinding", None)
        if sess is not None and c_binding is not None and hasattr(sess, "run_with_iobinding"):
            run_c = sess.run_with_iobinding

            def run() -> None:
                run_c(c_binding, None)

            return run
        session = self.session

        def run_py() -> None:
            session.run_with_iobinding(binding)

        return run_py

    def _plain(self) -> None:
        results = self.session.run(list(self.outputs), self.inputs)
        for arr, res in zip(self.outputs.values(), results, strict=True):
            arr[...] = res

    def _check_signature(self) -> None:
        """Names, ranks, fixed axes and dtypes of the file's I/O against the manifest."""
        from runtime.graphio import compare_io

        got_in = {i.name: i for i in self.session.get_inputs()}
        got_out = {o.name: o for o in self.session.get_outputs()}
        want_in = {t.name for t in self.spec.inputs}
        want_out = {t.name for t in self.spec.outputs}
        if set(got_in) != want_in or set(got_out) != want_out:
            raise BundleError(
                f"{self.spec.file}: graph I/O {sorted(got_in)} -> {sorted(got_out)} does not match "
                f"the manifest {sorted(want_in)} -> {sorted(want_out)}"
            )
        name = self.spec.file
        problems = compare_io(name, "input", self.spec.inputs, got_in)
        problems += compare_io(name, "output", self.spec.outputs, got_out)
        if problems:
            raise BundleError("; ".join(problems))
