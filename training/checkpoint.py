"""Run directories and checkpoints.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``learning_curve.png`` and ``checkpoints/{latest,iter_NNNNNN}.pt``. Checkpoints are plain
dicts of tensors and numbers loaded with ``torch.load(weights_only=True)``: loading never
executes arbitrary pickled code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from runtime.errors import CheckpointError
from runtime.plugins import import_plugins
from runtime.tasks import TaskFamily, make_family
from training.config import RunConfig
from training.registry import entry_of, validate_run_config

FORMAT = "edgeadapt-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"
LATEST = "latest.pt"


@dataclass
class LoadedRun:
    """A trained run ready for evaluation or export."""

    run_dir: Path
    config: Any  # the algorithm's config class (training.registry)
    family: TaskFamily
    nets: Any  # the algorithm's networks
    state: dict[str, Any]


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path, modules: dict[str, torch.nn.Module], extra: dict[str, Any]
) -> Path:
    """Write ``iter_NNNNNN.pt`` atomically and point ``latest.pt`` at the same content:
    every module's ``state_dict`` under ``nets`` plus ``extra``."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nets": {name: m.state_dict() for name, m in modules.items()},
        **extra,
    }
    return write_checkpoint(run_dir, payload, int(extra.get("iteration", 0)))


def write_checkpoint(run_dir: Path, payload: dict[str, Any], iteration: int) -> Path:
    """``checkpoints/iter_NNNNNN.pt`` and ``latest.pt`` with ``payload``, each written to a
    temporary file and renamed (a crash never leaves a half-written checkpoint)."""
    ckdir = checkpoint_dir(run_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"iter_{iteration:06d}.pt"
    for target in (path, ckdir / LATEST):
        tmp = target.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, target)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict safely, with a clear error when it is missing or corrupt."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/garbage files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an edgeadapt checkpoint")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {data.get('format_version')} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    return data


def write_run_config(run_dir: Path, cfg: RunConfig) -> Path:
    """Write the resolved config of a run (``config.yaml``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def load_run_config(run_dir: Path) -> Any:
    """The resolved config saved in a run directory (its algorithm's config class)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a mapping")
    return validate_run_config(raw, source=str(path))


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> LoadedRun:
    """Rebuild a run's networks from its latest (or the named) checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    import_plugins(cfg.env.plugins)
    family = make_family(cfg.env.name, 1)
    state = read_checkpoint(Path(checkpoint) if checkpoint else checkpoint_dir(run_dir) / LATEST)
    try:
        nets = entry_of(cfg).impl().load_networks(cfg, family.spec, state)
    except CheckpointError as exc:
        raise CheckpointError(f"{run_dir}: {exc}") from None
    return LoadedRun(run_dir, cfg, family, nets, state)
