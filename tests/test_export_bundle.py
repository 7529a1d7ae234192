"""Export: ONNX graphs (opset, dynamic batch), torch-vs-onnxruntime parity, the fused step's
math, INT8 variant, profiles, the CLI (export, keygen, verify) and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from bundle_fixtures import SMALL, cached_bundle, cached_keys, cached_run, copy_bundle, make_run

from export.bundle_writer import ExportOptions, export_bundle
from export.graphs import StepGraph
from export.reference import random_step_inputs, reference_modules, torch_step
from export.verify import PARITY_TARGET, verify
from runtime.bundle import read_manifest
from runtime.errors import BundleError, CheckpointError
from runtime.posterior import prior_belief, update_belief
from runtime.providers import CPU
from runtime.session import GraphSession
from training.agent import scale_action
from training.checkpoint import load_run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = ()  # no overrides: ModelConfig defaults (encoder 3x200, actor 2x256)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return cached_bundle(tmp_path_factory, int8=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return cached_run(tmp_path_factory)


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


def test_graphs_have_opset_17_and_match_the_manifest(bundle):
    manifest = read_manifest(bundle)
    assert manifest.opset >= 17
    for spec in manifest.graphs.values():
        model = onnx.load(str(bundle / spec.file))
        onnx.checker.check_model(model, full_check=True)
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset == manifest.opset
        assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs]
        assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs]


@pytest.mark.parametrize("batch", [1, 7, 1024])
def test_every_graph_runs_at_any_batch_size(bundle, run_dir, batch):
    manifest = read_manifest(bundle)
    run = load_run(run_dir)
    rng = np.random.default_rng(batch)
    dims_inputs = random_step_inputs(_dims(manifest), run.family.spec, batch, rng)
    for spec in manifest.graphs.values():
        feeds = {t.name: dims_inputs[t.name] for t in spec.inputs}  # paired by name
        out = GraphSession(bundle / spec.file, spec, providers=[CPU]).run_feeds(feeds)
        for t in spec.outputs:
            assert out[t.name].shape[0] == batch


def test_fused_step_equals_the_numpy_belief_and_the_torch_actor(run_dir):
    """The graph's arithmetic is the runtime.posterior update followed by tanh(mean) at
    z = posterior mean, scaled like training.agent.scale_action."""
    run = load_run(run_dir)
    spec, cfg = run.family.spec, run.config
    step = reference_modules(run)["step"]
    rng = np.random.default_rng(0)
    belief = prior_belief(4, cfg.model.latent_dim, cfg.model.prior_var)
    for _ in range(5):
        inputs = random_step_inputs(_dims_of(run), spec, 4, rng, cfg.model.prior_var)
        inputs["transition"] = np.nan_to_num(inputs["transition"], posinf=1.0, neginf=-1.0)
        inputs["precision"], inputs["eta"] = belief.precision_BZ, belief.eta_BZ
        inputs["forget"][:] = 0.9
        out = torch_step(step, inputs, _dims_of(run))
        with torch.no_grad():
            mu, var = run.nets.encoder(torch.from_numpy(inputs["transition"]))
        belief = update_belief(belief, mu.numpy(), var.numpy(), 0.9, cfg.model.prior_var)
        np.testing.assert_allclose(out["precision_out"], belief.precision_BZ, rtol=1e-6)
        np.testing.assert_allclose(out["eta_out"], belief.eta_BZ, rtol=1e-6, atol=1e-7)
        with torch.no_grad():
            want = run.nets.actor.deterministic(
                torch.from_numpy(inputs["obs"]), torch.from_numpy(belief.mean.astype(np.float32))
            ).numpy()
        np.testing.assert_allclose(out["action_norm"], want, atol=1e-6)
        np.testing.assert_allclose(out["action"], scale_action(want, spec), atol=1e-6)
        assert out["updated"].all()


def test_step_flags_nonfinite_transitions(run_dir):
    run = load_run(run_dir)
    step = reference_modules(run)["step"]
    inputs = random_step_inputs(_dims_of(run), run.family.spec, 3, np.random.default_rng(1))
    inputs["transition"] = np.nan_to_num(inputs["transition"])
    inputs["transition"][1, 0] = np.nan
    inputs["transition"][2, -1] = np.inf
    assert torch_step(step, inputs, _dims_of(run))["updated"].tolist() == [True, False, False]


def test_parity_torch_vs_onnxruntime_at_default_sizes(tmp_path_factory):
    """>= 10k random + recorded inputs, every graph, default PEARL sizes: error <= 1e-5."""
    run = cached_run(tmp_path_factory, DEFAULT_SIZES)
    bundle = cached_bundle(tmp_path_factory, DEFAULT_SIZES, signed=False)
    res = verify(bundle, run_dir=run)
    assert res.ok, res.reasons
    assert res.parity["random_rows"] >= 10_000 and res.parity["recorded_rows"] > 1000
    assert res.parity_max_abs_err <= PARITY_TARGET
    assert {"step.action", "encoder.mu", "act.action"} <= set(res.parity["errors"])


def test_parity_check_catches_a_different_checkpoint(bundle, tmp_path):
    other = make_run(tmp_path / "other", SMALL, seed=1)  # same sizes, other weights
    res = verify(bundle, run_dir=other)
    assert not res.ok
    assert res.parity_max_abs_err > 1e-3


def test_int8_variant_reports_parity_and_return_change(bundle):
    manifest = read_manifest(bundle)
    assert manifest.graphs["step_int8"].precision == "int8"
    int8 = manifest.provenance["int8"]
    assert 0 < int8["parity_max_abs_err"] < 0.1
    assert int8["return_change"] == pytest.approx(int8["return_int8"] - int8["return_fp32"])
    assert int8["size_bytes"] > 0 and int8["fp32_size_bytes"] > 0  # smaller only for big nets


def test_manifest_records_provenance_and_calibrated_ood(bundle, run_dir):
    manifest = read_manifest(bundle)
    prov = manifest.provenance
    assert prov["config"]["model"]["latent_dim"] == manifest.adaptation.latent_dim
    assert len(prov["config_sha256"]) == 64 and prov["code_version"]
    assert prov["flops_per_step"]["step"] > 0
    assert 0 < manifest.ood.warn < manifest.ood.alarm
    assert manifest.ood.calibration["transitions"] > 1000
    vectors = np.load(bundle / manifest.test_vectors)
    assert {"in/transition", "out/step/action", "out/step_int8/action"} <= set(vectors.files)


def test_oracle_runs_cannot_be_exported(tmp_path):
    run = make_run(tmp_path / "oracle", (*SMALL, "algo=oracle"))
    with pytest.raises(CheckpointError, match="oracle runs cannot be exported"):
        export_bundle(run, tmp_path / "b", ExportOptions())
    assert not (tmp_path / "b").exists()


def test_export_refuses_to_overwrite_without_force(bundle, run_dir):
    with pytest.raises(BundleError, match="--force"):
        export_bundle(run_dir, bundle, ExportOptions())


def test_profiles_choose_providers_and_precision(tmp_path_factory):
    rpi = read_manifest(cached_bundle(tmp_path_factory, profile="rpi-arm-cpu", signed=False))
    assert rpi.profile == "rpi-arm-cpu" and "step_int8" in rpi.graphs
    assert rpi.providers == ["CPUExecutionProvider"] and rpi.trt is None
    jetson = read_manifest(
        cached_bundle(tmp_path_factory, profile="jetson-orin-nano-8gb", signed=False)
    )
    assert jetson.providers[0] == "TensorrtExecutionProvider"
    assert jetson.providers[-1] == "CPUExecutionProvider"
    assert jetson.trt is not None and jetson.trt["fp16"] is True


def test_cli_keygen_export_verify_round_trip(tmp_path, run_dir):
    key = tmp_path / "key"
    assert _cli("keygen", "--out", str(key)).returncode == 0
    out = tmp_path / "bundle"
    res = _cli("export", str(run_dir), "--out", str(out), "--key", str(key), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["signed"] is True
    res = _cli("verify", str(out), "--pubkey", f"{key}.pub", "--run", str(run_dir), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["signature"] == "ok" and report["hashes"] == "ok"
    assert report["parity_max_abs_err"] <= PARITY_TARGET
    # a damaged copy fails with a non-zero exit and says why
    (out / "act.onnx").write_bytes(b"garbage")
    res = _cli("verify", str(out), "--pubkey", f"{key}.pub", "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["hashes"] == "hash mismatch for act.onnx"


def test_cli_verify_without_signature_but_with_key_fails(tmp_path_factory, tmp_path):
    unsigned = copy_bundle(cached_bundle(tmp_path_factory, signed=False), tmp_path / "u")
    _, pub = cached_keys(tmp_path_factory)
    res = _cli("verify", str(unsigned), "--pubkey", str(pub), "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["signature"] == "missing"


def test_cli_export_of_an_oracle_is_a_one_line_error(tmp_path):
    run = make_run(tmp_path / "oracle", (*SMALL, "algo=oracle"))
    res = _cli("export", str(run), "--out", str(tmp_path / "b"))
    assert res.returncode != 0
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_step_graph_module_is_stateless(run_dir):
    """State goes in and out: running the same inputs twice gives the same outputs."""
    run = load_run(run_dir)
    step: StepGraph = reference_modules(run)["step"]
    inputs = random_step_inputs(_dims_of(run), run.family.spec, 8, np.random.default_rng(3))
    a, b = torch_step(step, inputs, _dims_of(run)), torch_step(step, inputs, _dims_of(run))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _dims(manifest):
    from export.graphs import Dims

    return Dims(manifest.obs.dim, manifest.act.dim, manifest.adaptation.latent_dim)


def _dims_of(run):
    from export.reference import dims_of

    return dims_of(run)


def test_saturated_actors_stay_within_one_in_onnxruntime(tmp_path):
    """onnxruntime's Tanh overshoots by up to 2e-7 when saturated (a demo bundle failed its
    health gate on -1.0000001): the PEARL and RL² graphs clamp the normalized action."""
    import onnxruntime as ort

    from export.graphs import MeanActor
    from export.onnx_export import export_module
    from export.rl2_graphs import RL2ActGraph
    from runtime.tasks import make_family
    from training.networks import TanhGaussianActor
    from training.rl2_networks import RL2Agent

    torch.manual_seed(0)
    spec = make_family("point-nav").spec
    pearl = TanhGaussianActor(2, 3, 2, (16,))
    rl2 = RL2Agent(2, 2, 8, (8,), (16,))
    with torch.no_grad():  # pre-tanh values spread over about [-30, 30]
        pearl.net[-1].weight.mul_(40.0)
        rl2.actor[-1].weight.mul_(4000.0)  # its last layer starts 100x smaller
    x = torch.randn(4096, 2)
    cases = {
        "pearl": (MeanActor(pearl), (x, torch.randn(4096, 3)), ("obs", "z"), (0,)),
        "rl2": (RL2ActGraph(rl2, spec), (x, torch.randn(4096, 8)), ("obs", "h"), (1,)),
    }
    for name, (module, example, inputs, (out_index,)) in cases.items():
        outputs = ("action_norm",) if name == "pearl" else ("action", "action_norm")
        path = tmp_path / f"{name}.onnx"
        export_module(module, example, inputs, outputs, path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {k: v.numpy() for k, v in zip(inputs, example, strict=True)}
        norm = sess.run(None, feeds)[out_index]
        assert np.abs(norm).max() <= 1.0, (name, np.abs(norm).max())
        assert (np.abs(norm) == 1.0).mean() > 0.1, name  # saturated: the case the clamp is for
