"""TensorRT engines built on the device from a bundle's ONNX graph (TensorRT 10 Python API).

An engine only runs on the TensorRT version and GPU that built it, so bundles ship ONNX and the
device builds the engine once and caches it under a key made of the graph's sha256, the
TensorRT version, the GPU name and compute capability, and the build settings (FP16, batch
range). Later loads find the cached file and skip the (minutes-long on a Jetson) build.

NOT VERIFIED ON HARDWARE: no GPU or TensorRT was available where this was written. The code
follows the documented TensorRT 10 API (``Builder``, ``OnnxParser``, ``BuilderConfig.
set_memory_pool_limit``, ``BuilderFlag.FP16``, optimization profiles,
``build_serialized_network``, ``Runtime.deserialize_cuda_engine``, named tensors with
``set_tensor_address`` + ``execute_async_v3``). What is tested here: the clear errors when
TensorRT or a CUDA device is missing, and the cache key. The default runtime path on a GPU is
onnxruntime's TensorRT execution provider (see :mod:`runtime.providers`), which uses the same
cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import sha256_file
from runtime.providers import ProviderError, cuda_device_present, tensorrt_installed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrtBuildSettings:
    """How the engine is built; part of the cache key."""

    fp16: bool = True
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1024
    workspace_mb: int = 256

    @classmethod
    def from_manifest(cls, trt: dict[str, Any] | None) -> TrtBuildSettings:
        """Settings recorded by ``edgeadapt export --trt`` (defaults when absent)."""
        known = {k: v for k, v in (trt or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`ProviderError` saying what is missing."""
    if not tensorrt_installed():
        raise ProviderError(
            "TensorRT not installed: install JetPack's python3-libnvinfer or "
            "`pip install 'edgeadapt[trt]'`, or run on onnxruntime's CUDA/CPU providers"
        )
    if not cuda_device_present():
        raise ProviderError("no CUDA device: TensorRT needs an NVIDIA GPU")
    import tensorrt

    return tensorrt


def gpu_identity() -> str:
    """GPU name and compute capability (``nvidia-smi``), or the Jetson model; "unknown" else."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    model = Path("/proc/device-tree/model")
    if model.is_file():
        return model.read_text(errors="replace").strip("\x00 \n")
    return "unknown"


def engine_cache_key(
    onnx_path: Path, trt_version: str, gpu: str, settings: TrtBuildSettings
) -> str:
    """Stable key: graph content, TensorRT version, GPU and build settings."""
    blob = json.dumps(
        {
            "graph": sha256_file(onnx_path),
            "tensorrt": trt_version,
            "gpu": gpu,
            "settings": asdict(settings),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def build_engine(
    onnx_path: str | Path, cache_dir: str | Path, settings: TrtBuildSettings | None = None
) -> Path:
    """Build (or find in the cache) the serialized engine for ``onnx_path``; returns its path."""
    trt = require_tensorrt()
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    settings = settings or TrtBuildSettings()
    key = engine_cache_key(onnx_path, trt.__version__, gpu_identity(), settings)
    path = cache_dir / f"{onnx_path.stem}-{key}.engine"
    if path.is_file():
        log.info("TensorRT engine cache hit: %s", path)
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("building TensorRT engine for %s (this can take minutes)", onnx_path.name)
    serialized = _build_serialized(trt, onnx_path, settings)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, path)
    return path


class TrtRunner:
    """Runs a serialized engine on numpy inputs (named tensors, ``execute_async_v3``).

    Device memory and copies go through the CUDA runtime of the ``cuda-python`` package.
    """

    def __init__(self, engine_path: str | Path) -> None:
        trt = require_tensorrt()
        self._cudart = _cudart()
        self._trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ProviderError(f"{engine_path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._stream = _check(self._cudart.cudaStreamCreate())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs in, execute, copy outputs out (synchronous)."""
        trt, cud = self._trt, self._cudart
        buffers, outputs = [], {}
        try:
            for name in self.names:
                if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    host = np.ascontiguousarray(feeds[name])
                    self.context.set_input_shape(name, host.shape)
                    ptr = self._device_copy_in(host, buffers)
                    self.context.set_tensor_address(name, ptr)
            for name in self.names:
                if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                    shape = tuple(self.context.get_tensor_shape(name))
                    dtype = trt.nptype(self.engine.get_tensor_dtype(name))
                    host = np.empty(shape, dtype=dtype)
                    ptr = _check(cud.cudaMalloc(max(host.nbytes, 1)))
                    buffers.append(ptr)
                    self.context.set_tensor_address(name, ptr)
                    outputs[name] = (host, ptr)
            if not self.context.execute_async_v3(self._stream):
                raise ProviderError("TensorRT execute_async_v3 failed")
            kind = cud.cudaMemcpyKind.cudaMemcpyDeviceToHost
            for host, ptr in outputs.values():
                _check(cud.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self._stream))
            _check(cud.cudaStreamSynchronize(self._stream))
        finally:
            for ptr in buffers:
                cud.cudaFree(ptr)
        return {name: host for name, (host, _) in outputs.items()}

    def _device_copy_in(self, host: np.ndarray, buffers: list[int]) -> int:
        cud = self._cudart
        ptr = _check(cud.cudaMalloc(max(host.nbytes, 1)))
        buffers.append(ptr)
        kind = cud.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(cud.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self._stream))
        return ptr


# -- helpers ---------------------------------------------------------------------------------
def _build_serialized(trt: Any, onnx_path: Path, settings: TrtBuildSettings) -> Any:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ProviderError(f"{onnx_path.name}: TensorRT cannot parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(
            tensor.name,
            (settings.min_batch, *rest),
            (settings.opt_batch, *rest),
            (settings.max_batch, *rest),
        )
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ProviderError(f"{onnx_path.name}: TensorRT engine build failed (see log)")
    return serialized


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise ProviderError(
                "cuda-python not installed (needed to run TensorRT engines directly); "
                "use onnxruntime's TensorRT execution provider instead"
            ) from None
    return cudart


def _check(result: Any) -> Any:
    """cuda-python calls return (err, value...); raise on error, return the value."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ProviderError(f"CUDA error {int(err)}")
    return rest[0] if len(rest) == 1 else tuple(rest) if rest else None
