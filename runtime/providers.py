"""onnxruntime sessions: execution-provider choice and single-sample tuning.

Providers are tried in the order TensorRT -> CUDA -> CPU (or the order a device profile or the
manifest gives); the ones this onnxruntime build lacks are skipped with a log line, and the CPU
provider is always last, so a GPU-less machine falls back cleanly. A request that *requires* an
accelerator fails with a clear reason ("TensorRT not installed", "no CUDA device").

Session options for lowest single-sample latency on a CPU (REFERENCE.md): one intra-op thread,
sequential execution, every graph optimization, warm-up at load.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from runtime.errors import EdgeadaptError

log = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_ORDER = (TRT, CUDA, CPU)


class ProviderError(EdgeadaptError):
    """A required execution provider or accelerator is not available."""


@dataclass(frozen=True)
class SessionTuning:
    """onnxruntime knobs; the defaults are the single-sample CPU tuning."""

    intra_op_threads: int = 1
    sequential: bool = True
    optimize_all: bool = True
    fp16: bool = False  # TensorRT EP only
    trt_cache_dir: str | None = None  # TensorRT EP engine/timing cache directory


def session_options(tuning: SessionTuning) -> ort.SessionOptions:
    """SessionOptions for ``tuning`` (``intra_op_threads=0`` means onnxruntime's default)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if tuning.intra_op_threads > 0:
        so.intra_op_num_threads = tuning.intra_op_threads
        so.inter_op_num_threads = 1
    if tuning.sequential:
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if tuning.optimize_all
        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    )
    # No spinning: on a shared 2-core machine a spinning pool steals time from the control loop.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def choose_providers(
    preferred: list[str] | tuple[str, ...] | None = None,
    available: list[str] | None = None,
) -> list[str]:
    """The usable subset of ``preferred`` (default TensorRT, CUDA, CPU), CPU always last."""
    available = list(ort.get_available_providers() if available is None else available)
    chosen = []
    for name in preferred or DEFAULT_ORDER:
        if name in available and name not in chosen:
            chosen.append(name)
        elif name not in available:
            log.debug("execution provider %s not available here: %s", name, why_unavailable(name))
    if CPU not in chosen:
        chosen.append(CPU)
    return [p for p in chosen if p != CPU] + [CPU]


def require_provider(name: str, available: list[str] | None = None) -> None:
    """Raise :class:`ProviderError` with the reason when provider ``name`` cannot be used."""
    available = list(ort.get_available_providers() if available is None else available)
    if name == CPU:
        return
    if name not in available:
        raise ProviderError(f"{name} unavailable: {why_unavailable(name)}")
    if not cuda_device_present():
        raise ProviderError(f"{name} unavailable: no CUDA device")


def why_unavailable(name: str) -> str:
    """A one-line reason a provider cannot be used on this machine."""
    if name == TRT and not tensorrt_installed():
        return "TensorRT not installed"
    if name in (TRT, CUDA) and not cuda_device_present():
        return "no CUDA device"
    if name in (TRT, CUDA):
        return "this onnxruntime build has no GPU providers (install onnxruntime-gpu)"
    return "not in this onnxruntime build"


def tensorrt_installed() -> bool:
    """Whether the TensorRT Python package can be imported."""
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def cuda_device_present() -> bool:
    """Whether an NVIDIA GPU is visible (device node or nvidia-smi), without importing CUDA."""
    if Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl").exists():
        return True
    return shutil.which("nvidia-smi") is not None and Path("/proc/driver/nvidia").exists()


def provider_options(providers: list[str], tuning: SessionTuning) -> list[Any]:
    """Providers with their options (TensorRT: fp16 and engine cache) for InferenceSession."""
    out: list[Any] = []
    for name in providers:
        if name == TRT:
            opts: dict[str, str] = {"trt_fp16_enable": "1" if tuning.fp16 else "0"}
            if tuning.trt_cache_dir:
                opts |= {
                    "trt_engine_cache_enable": "1",
                    "trt_engine_cache_path": tuning.trt_cache_dir,
                    "trt_timing_cache_enable": "1",
                    "trt_timing_cache_path": tuning.trt_cache_dir,
                }
            out.append((name, opts))
        else:
            out.append(name)
    return out


def make_session(
    path: str | Path,
    providers: list[str] | None = None,
    tuning: SessionTuning | None = None,
) -> ort.InferenceSession:
    """An InferenceSession on the best available providers, tuned for single samples.

    If creating the session fails on an accelerator (a TensorRT engine that does not build, a
    CUDA initialization error), the next provider in the list is tried, down to the CPU.
    """
    tuning = tuning or SessionTuning()
    chosen = choose_providers(providers)
    while True:
        try:
            sess = ort.InferenceSession(
                str(path), session_options(tuning), providers=provider_options(chosen, tuning)
            )
        except Exception as exc:  # onnxruntime raises several types from provider setup
            if len(chosen) == 1:
                raise
            log.warning("%s failed on %s (%s); falling back", Path(path).name, chosen[0], exc)
            chosen = chosen[1:]
            continue
        log.debug("session %s on %s", Path(path).name, sess.get_providers())
        return sess
