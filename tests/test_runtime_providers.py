"""Execution providers (TensorRT -> CUDA -> CPU with clean fallback), the TensorRT path's clear
errors on a machine without it, and the ``bench runtime`` / ``selftest`` commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_fixtures import cached_bundle

from runtime.agent import Agent, AgentConfig
from runtime.bundle import read_manifest
from runtime.errors import EdgeadaptError
from runtime.providers import (
    CPU,
    CUDA,
    TRT,
    ProviderError,
    choose_providers,
    cuda_device_present,
    require_provider,
    tensorrt_installed,
    why_unavailable,
)
from runtime.trt import TrtBuildSettings, build_engine, engine_cache_key, require_tensorrt

REPO = Path(__file__).resolve().parents[1]
NO_GPU = not cuda_device_present()
gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return cached_bundle(tmp_path_factory)


def test_provider_order_is_tensorrt_cuda_cpu():
    assert choose_providers(None, available=[CPU, CUDA, TRT]) == [TRT, CUDA, CPU]
    assert choose_providers([CUDA, TRT, CPU], available=[CPU, TRT, CUDA]) == [CUDA, TRT, CPU]


def test_missing_accelerators_fall_back_to_cpu():
    assert choose_providers(None, available=[CPU]) == [CPU]
    assert choose_providers([TRT, CUDA, CPU], available=[CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers([TRT], available=[CPU]) == [CPU]  # the CPU is always appended


@pytest.mark.skipif(tensorrt_installed(), reason="TensorRT is installed here")
def test_tensorrt_missing_is_said_clearly():
    assert why_unavailable(TRT) == "TensorRT not installed"
    with pytest.raises(ProviderError, match="TensorRT not installed"):
        require_tensorrt()
    with pytest.raises(ProviderError, match="TensorRT not installed"):
        require_provider(TRT, available=[CPU])


@pytest.mark.skipif(not NO_GPU, reason="a CUDA device is present")
def test_no_cuda_device_is_said_clearly():
    assert why_unavailable(CUDA) == "no CUDA device"
    with pytest.raises(ProviderError, match="no CUDA device"):
        require_provider(CUDA, available=[CPU])
    # even if onnxruntime claimed the provider, the missing device is the reason given
    with pytest.raises(ProviderError, match="no CUDA device"):
        require_provider(CUDA, available=[CUDA, CPU])


def test_bundle_preferring_tensorrt_loads_on_cpu_here(bundle):
    agent = Agent.load(bundle, providers=[TRT, CUDA, CPU], config=AgentConfig(warmup=1))
    assert agent.providers[-1] == CPU
    if NO_GPU:
        assert agent.providers == [CPU]
    assert agent.self_test(steps=10).passed


def test_trt_build_reports_the_missing_piece(bundle, tmp_path):
    if tensorrt_installed() and not NO_GPU:
        pytest.skip("TensorRT and a GPU are present: covered by the gpu test")
    with pytest.raises(ProviderError, match=r"TensorRT not installed|no CUDA device"):
        build_engine(bundle / "step.onnx", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_engine_cache_key_changes_with_what_makes_engines_incompatible(bundle):
    graph = bundle / "step.onnx"
    base = engine_cache_key(graph, "10.3.0", "Orin (nvgpu) 8.7", TrtBuildSettings())
    assert base == engine_cache_key(graph, "10.3.0", "Orin (nvgpu) 8.7", TrtBuildSettings())
    assert base != engine_cache_key(graph, "10.4.0", "Orin (nvgpu) 8.7", TrtBuildSettings())
    assert base != engine_cache_key(graph, "10.3.0", "NVIDIA H100, 9.0", TrtBuildSettings())
    assert base != engine_cache_key(
        graph, "10.3.0", "Orin (nvgpu) 8.7", TrtBuildSettings(fp16=False)
    )
    assert base != engine_cache_key(
        bundle / "act.onnx", "10.3.0", "Orin (nvgpu) 8.7", TrtBuildSettings()
    )


def test_trt_settings_come_from_the_manifest():
    s = TrtBuildSettings.from_manifest({"fp16": False, "max_batch": 64, "unknown": 1})
    assert s.fp16 is False and s.max_batch == 64 and s.min_batch == 1


def test_provider_error_is_a_user_facing_error():
    assert issubclass(ProviderError, EdgeadaptError)


@gpu
@pytest.mark.skipif(NO_GPU or not tensorrt_installed(), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_engine_matches_onnxruntime(bundle, tmp_path):  # pragma: no cover - GPU only
    import numpy as np

    from runtime.bundle import read_manifest
    from runtime.session import GraphSession
    from runtime.trt import TrtRunner

    manifest = read_manifest(bundle)
    engine = build_engine(bundle / "step.onnx", tmp_path, TrtBuildSettings(fp16=False))
    assert build_engine(bundle / "step.onnx", tmp_path, TrtBuildSettings(fp16=False)) == engine
    vectors = dict(np.load(bundle / manifest.test_vectors))
    feeds = {t.name: vectors[f"in/{t.name}"] for t in manifest.graph("step").inputs}
    ref = GraphSession(bundle / "step.onnx", manifest.graph("step"), providers=[CPU])
    want = ref.run_feeds(feeds)
    got = TrtRunner(engine).run(feeds)
    np.testing.assert_allclose(got["action"], want["action"], atol=1e-4)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )


def test_bench_runtime_json_has_the_promised_keys(bundle):
    res = _cli("bench", "runtime", str(bundle), "--json", "--steps", "300", "--cold-runs", "1")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in (
        "step_us_median",
        "step_us_p99",
        "torch_eager_us_median",
        "speedup_vs_torch",
        "cold_start_s",
        "rss_mb",
        "flops_per_step",
    ):
        assert out[key] is not None and out[key] > 0, key
    assert set(out["batched"]) == {"1", "64", "1024"}
    assert "one_thread_sequential_iobinding" in out["tuning"]
    assert out["step_us_p99"] >= out["step_us_median"]


def test_bench_torch_comparison_skips_a_graph_it_cannot_rebuild(bundle, tmp_path, caplog):
    """A bundle whose step graph lacks the named weights (an older exporter) loses only the
    torch row of ``bench runtime``, with a warning, not the whole benchmark."""
    import numpy as np
    import onnx

    from runtime.bench import torch_runner

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    step = copy / read_manifest(copy).graph("step").file
    model = onnx.load(str(step))
    for init in model.graph.initializer:
        old, init.name = init.name, "renamed/" + init.name
        for node in model.graph.node:
            node.input[:] = [init.name if i == old else i for i in node.input]
    onnx.save(model, str(step))
    traj = {k: np.zeros((4, 2), np.float32) for k in ("obs", "act", "next")}
    traj["rew"] = np.zeros((4, 1), np.float32)
    with caplog.at_level("WARNING"):
        assert torch_runner(copy, traj) is None
    assert "torch eager comparison skipped" in caplog.text


def test_selftest_command(bundle):
    res = _cli("selftest", str(bundle), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["passed"] is True


def test_trt_build_command_fails_with_one_line(bundle, tmp_path):
    if tensorrt_installed() and not NO_GPU:
        pytest.skip("TensorRT and a GPU are present")
    res = _cli("trt-build", str(bundle), "--cache-dir", str(tmp_path))
    assert res.returncode != 0
    assert res.stderr.strip().startswith("error: ") and "Traceback" not in res.stderr


def test_bench_belief_json_compares_o1_and_naive(bundle):
    res = _cli("bench", "belief", str(bundle), "--json", "--max-context", "1000")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [r["context"] for r in out["rows"]] == [10, 100, 1000]
    assert all(r["o1_step_us"] > 0 and r["naive_step_us"] > 0 for r in out["rows"])
    assert out["belief_state_bytes"] == 2 * 4 * read_manifest(bundle).adaptation.latent_dim + 8
