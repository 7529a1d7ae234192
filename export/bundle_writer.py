"""``edgeadapt export``: a run directory -> a signed, self-describing bundle directory.

Order of work: graphs (ONNX, checked) -> a provisional manifest so the real runtime can load the
graphs -> in-distribution rollouts through the runtime (OOD calibration, recorded inputs) ->
test vectors with torch-computed expected outputs -> optional INT8 variant (parity and return
change measured) -> final manifest with every file's sha256 -> detached Ed25519 signature.
The bundle is assembled in a temporary sibling directory and renamed into place at the end, so
a failed export never leaves a half-written bundle where a device could pick it up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.calibrate import Recording, ood_thresholds, record_rollouts, tasks_within
from export.family import family_export
from export.onnx_export import DEFAULT_OPSET, export_graph
from export.reference import concat_inputs, take_rows, torch_step
from export.signing import sign_file
from runtime import RUNTIME_VERSION
from runtime.agent import Agent, AgentConfig
from runtime.bundle import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    BoxSpec,
    Manifest,
    OODSpec,
    sha256_file,
)
from runtime.errors import BundleError, ConfigError
from runtime.providers import CPU, CUDA, TRT
from training.checkpoint import CONFIG_FILE, LoadedRun, load_run

log = logging.getLogger(__name__)

TEST_VECTORS_FILE = "test_vectors.npz"
TEST_VECTOR_ROWS = 64  # 48 recorded + 16 random
FP32_TOLERANCE = 1e-4  # self-test on another CPU: allow for different kernels
INT8_TOLERANCE = 1e-3  # int8 vs its own export-time outputs (different int8 kernels)
CALIBRATION_SEED = 20_240_611
#: Bytes of step inputs the calibration rollouts may record (fewer tasks for large states).
CALIBRATION_BYTES = 256 * 2**20
TRT_DEFAULTS = {
    "fp16": True,
    "min_batch": 1,
    "opt_batch": 1,
    "max_batch": 1024,
    "workspace_mb": 256,
}


@dataclass(frozen=True)
class ExportOptions:
    """What ``edgeadapt export`` was asked for."""

    profile: str | None = None
    key: Path | None = None
    int8: bool = False
    trt: bool = False
    opset: int = DEFAULT_OPSET
    calibration_tasks: int = 64  # train tasks rolled out for OOD thresholds and test vectors
    force: bool = False
    #: Defaults of declared adaptation params written into the manifest (e.g. PEARL's forget);
    #: the calibration rollouts and test vectors use them too.
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class ExportResult:
    """Where the bundle went and what was measured while making it."""

    bundle_dir: Path
    manifest: Manifest
    signed: bool
    int8: dict[str, Any] | None


def export_bundle(run_dir: str | Path, out_dir: str | Path, options: ExportOptions) -> ExportResult:
    """Export the latest checkpoint of ``run_dir`` into the bundle directory ``out_dir``."""
    run = load_run(run_dir)
    family = family_export(run)  # refuses oracle runs
    modules = family.reference_modules(run)
    out_dir = Path(out_dir)
    _check_target(out_dir, options.force)
    profile = _load_profile(options.profile, options.opset)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        manifest, int8 = _build(run, family, modules, tmp, options, profile)
        if options.key is not None:
            sign_file(tmp / MANIFEST_FILE, options.key, tmp / SIGNATURE_FILE)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle written to %s", out_dir)
    return ExportResult(out_dir, manifest, options.key is not None, int8)


# -- the build -------------------------------------------------------------------------------
def _build(
    run: LoadedRun,
    family: Any,
    modules: dict[str, torch.nn.Module],
    tmp: Path,
    options: ExportOptions,
    profile: Any,
) -> tuple[Manifest, dict[str, Any] | None]:
    dims = family.dims_of(run)
    adaptation = with_param_defaults(family.adaptation(run, None), options.params)
    if hasattr(family, "export_graphs"):  # a family with graphs of its own making (MAML)
        graphs = family.export_graphs(run, modules, tmp, options.opset)
    else:
        graphs = {
            name: export_graph(mod, name, dims, tmp / f"{name}.onnx", options.opset)
            for name, mod in modules.items()
        }
    draft = _manifest(run, adaptation, graphs, {}, _placeholder_ood(), options, profile)
    recording = _calibration_recording(draft, tmp, run, options.calibration_tasks)
    # A fitted summary needs the rollouts; the params keep the defaults set above.
    fitted = family.adaptation(run, recording)
    adaptation = fitted.model_copy(update={"params": adaptation.params})
    ood = OODSpec(**ood_thresholds(recording))
    vector_inputs = _vector_inputs(recording, run, dims)
    expected = {"step": torch_step(modules["step"], vector_inputs, dims)}
    int8 = None
    if _wants_int8(family, options, profile):
        from export.quantize import quantize_step

        draft = draft.model_copy(update={"ood": ood})
        graphs["step_int8"], expected["step_int8"], int8 = quantize_step(
            tmp, draft, graphs, vector_inputs, modules["step"], run
        )
    _write_vectors(tmp / TEST_VECTORS_FILE, vector_inputs, expected)
    tolerance = {"step": FP32_TOLERANCE, **({"step_int8": INT8_TOLERANCE} if int8 else {})}
    provenance = _provenance(run, modules, options, recording, int8)
    manifest = _manifest(run, adaptation, graphs, provenance, ood, options, profile, tolerance, tmp)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return manifest, int8


def with_param_defaults(adaptation: Any, values: dict[str, float]) -> Any:
    """``adaptation`` with the defaults of its declared params replaced by ``values``; a name
    it does not declare or a value outside the param's range is a :class:`ConfigError`."""
    try:
        defaults = adaptation.param_values(values)
    except ValueError as err:
        raise ConfigError(f"export --param: {err}") from None
    params = [p.model_copy(update={"default": defaults[p.name]}) for p in adaptation.params]
    return adaptation.model_copy(update={"params": params})


def _wants_int8(family: Any, options: ExportOptions, profile: Any) -> bool:
    """Whether to write the INT8 step graph; an explicit --int8 a family refuses is an error.

    A family declares ``INT8_UNSUPPORTED = "<why>"`` when quantizing its step graph is
    meaningless (MAML: the policy weights are a graph input, nothing to quantize). An INT8
    device profile then gets the fp32 graph, with a warning.
    """
    why = getattr(family, "INT8_UNSUPPORTED", None)
    if options.int8 and why:
        raise BundleError(f"--int8 is not available for this family: {why}")
    if profile is not None and profile.precision == "int8":
        if why:
            log.warning("profile %s asks for INT8; exporting fp32 only: %s", profile.name, why)
            return False
        return True
    return options.int8


def _calibration_recording(
    draft: Manifest, tmp: Path, run: LoadedRun, most_tasks: int = 64
) -> Recording:
    """Rollouts of the exported graph in the runtime on train-split tasks, recorded: at most
    ``most_tasks`` tasks and :data:`CALIBRATION_BYTES` of step inputs (a MAML nav2d run's 21
    episodes x 100 steps x 18 kB of weights a row would be 2.4 GB for 64 tasks)."""
    agent = Agent(draft, tmp, providers=[CPU], config=AgentConfig(warmup=1))
    cfg = run.config
    row_bytes = 4 * sum(int(np.prod(x.shape)) for x in agent.session.inputs.values())
    rows_per_task = cfg.eval.episodes * run.family.spec.horizon
    tasks = tasks_within(CALIBRATION_BYTES, row_bytes, rows_per_task, most_tasks)
    return record_rollouts(agent, cfg.env.name, "train", tasks, cfg.eval.episodes, CALIBRATION_SEED)


def _vector_inputs(recording: Recording, run: LoadedRun, dims: Any) -> dict[str, np.ndarray]:
    """48 recorded rows (spread over the recording) and 16 random ones."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    n_rec = min(TEST_VECTOR_ROWS * 3 // 4, recording.rows)
    idx = np.sort(rng.choice(recording.rows, size=n_rec, replace=False))
    # Finite rows only: INT8 graphs quantize activations per call over the whole batch, so
    # one NaN row would make every row's expected output meaningless.
    random = dims.random_step_inputs(run.family.spec, TEST_VECTOR_ROWS - n_rec, rng, 0.0)
    return concat_inputs(take_rows(recording.inputs, idx), random)


def _write_vectors(
    path: Path, inputs: dict[str, np.ndarray], expected: dict[str, dict[str, np.ndarray]]
) -> None:
    arrays = {f"in/{k}": v for k, v in inputs.items()}
    for graph, outs in expected.items():
        arrays |= {f"out/{graph}/{k}": v for k, v in outs.items()}
    with path.open("wb") as f:
        np.savez(f, **arrays)


def _manifest(
    run: LoadedRun,
    adaptation: Any,
    graphs: dict[str, Any],
    provenance: dict[str, Any],
    ood: OODSpec,
    options: ExportOptions,
    profile: Any,
    tolerance: dict[str, float] | None = None,
    bundle_dir: Path | None = None,
) -> Manifest:
    """The manifest; with ``bundle_dir`` the sha256 of every file in it is filled in."""
    cfg, spec = run.config, run.family.spec
    files = {}
    if bundle_dir is not None:
        files = {
            p.name: sha256_file(p)
            for p in sorted(bundle_dir.iterdir())
            if p.is_file() and p.name not in (MANIFEST_FILE, SIGNATURE_FILE)
        }
    return Manifest(
        schema_version=SCHEMA_VERSION,
        bundle_id=str(uuid.uuid4()),
        version=RUNTIME_VERSION,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        adaptation=adaptation,
        env=cfg.env.name,
        plugins=list(cfg.env.plugins),
        profile=profile.name if profile is not None else options.profile,
        min_runtime_version=RUNTIME_VERSION,
        opset=options.opset,
        graphs=graphs,
        files=files,
        obs=BoxSpec(
            dim=spec.obs_dim,
            low=[float(x) for x in spec.obs_low],
            high=[float(x) for x in spec.obs_high],
            normalization="none: raw observations",
        ),
        act=BoxSpec(
            dim=spec.act_dim,
            low=[float(x) for x in spec.act_low],
            high=[float(x) for x in spec.act_high],
            normalization="policy emits a in [-1, 1]; physical = low + (high - low) / 2 * (a + 1)",
        ),
        horizon=spec.horizon,
        test_vectors=TEST_VECTORS_FILE,
        test_tolerance=tolerance or {},
        ood=ood,
        providers=_providers(options, profile),
        trt=_trt_settings(options, profile),
        provenance=provenance,
    )


def _placeholder_ood() -> OODSpec:
    return OODSpec(warn=1e30, alarm=2e30, warn_quantile=0.99, alarm_quantile=0.999)


def _providers(options: ExportOptions, profile: Any) -> list[str]:
    if profile is not None:
        return list(profile.execution_providers)
    return [TRT, CUDA, CPU] if options.trt else [CPU]


def _trt_settings(options: ExportOptions, profile: Any) -> dict[str, Any] | None:
    wants = options.trt or (profile is not None and TRT in profile.execution_providers)
    if not wants:
        return None
    fp16 = profile.precision == "fp16" if profile is not None else True
    return {**TRT_DEFAULTS, "fp16": fp16}


def _provenance(
    run: LoadedRun,
    modules: dict[str, torch.nn.Module],
    options: ExportOptions,
    recording: Recording,
    int8: dict[str, Any] | None,
) -> dict[str, Any]:
    import onnx
    import onnxruntime

    cfg = run.config
    config_text = (run.run_dir / CONFIG_FILE).read_bytes()
    out: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "config_sha256": hashlib.sha256(config_text).hexdigest(),
        "config": cfg.model_dump(mode="json"),
        "checkpoint": {k: _jsonable(v) for k, v in run.state.items() if _is_scalar(v)},
        "final_metrics": _final_metrics(run.run_dir),
        "code_version": _code_version(),
        "runtime_version": RUNTIME_VERSION,
        "exporter": f"torch.onnx legacy exporter (dynamo=False), torch {torch.__version__}",
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "calibration": {"split": "train", "rows": recording.rows, "seed": CALIBRATION_SEED},
        "eval": {"tasks": cfg.eval.tasks, "episodes": cfg.eval.episodes},
        "flops_per_step": {name: matrix_flops(m) for name, m in modules.items()},
    }
    if options.params:
        out["param_defaults"] = dict(options.params)  # export --param: set over the run's
    if int8 is not None:
        out["int8"] = int8
    return out


def matrix_flops(module: torch.nn.Module) -> int:
    """FLOPs of one batch-1 call counted over Linear layers (2 * in * out each); the
    elementwise belief arithmetic adds a few dozen more and is left out."""
    return sum(
        2 * m.in_features * m.out_features
        for m in module.modules()
        if isinstance(m, torch.nn.Linear)
    )


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        last = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}
    return {k: v for k, v in last.items() if _is_scalar(v)}


def _code_version() -> str:
    """``git describe`` of the source tree when available, else the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return f"{RUNTIME_VERSION}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return RUNTIME_VERSION


def _is_scalar(v: Any) -> bool:
    return isinstance(v, int | float | str | bool) or (
        isinstance(v, torch.Tensor) and v.numel() == 1
    )


def _jsonable(v: Any) -> Any:
    return v.item() if isinstance(v, torch.Tensor) else v


def _check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise BundleError(f"{out_dir} exists and is not empty; pass --force to replace it")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    os.chmod(out_dir, 0o755)


def _load_profile(name: str | None, opset: int) -> Any:
    if name is None:
        return None
    from devices.profiles import load_profile

    profile = load_profile(name)
    if opset > profile.max_opset:
        raise BundleError(
            f"opset {opset} is newer than profile {profile.name} supports ({profile.max_opset})"
        )
    return profile
