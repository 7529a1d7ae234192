"""Shared builders for the export/runtime/bundle tests: untrained runs and their bundles.

Built once per test process (module-level cache) because exporting takes seconds; tests that
modify a bundle copy it first (:func:`copy_bundle`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from training.agent import build_networks
from training.checkpoint import save_checkpoint, write_run_config

SMALL = ("model.encoder_hidden=[32, 32]", "model.hidden=[32, 32]")
_CACHE: dict[tuple, Path] = {}


def make_run(run_dir: Path, overrides: tuple[str, ...] = SMALL, seed: int = 0) -> Path:
    """A run directory with an untrained checkpoint (config + checkpoints/latest.pt)."""
    from runtime.configio import apply_override
    from runtime.tasks import make_family
    from training.registry import validate_run_config

    raw: dict = {"seed": seed}
    for item in overrides:
        apply_override(raw, item)
    cfg = validate_run_config(raw, source="test")
    torch.manual_seed(seed)
    nets = build_networks(cfg, make_family(cfg.env.name).spec)
    write_run_config(run_dir, cfg)
    extra = {"iteration": 0, "env_steps": 0, "log_alpha": nets.log_alpha.detach().clone()}
    save_checkpoint(run_dir, nets.modules(), extra)
    return run_dir


def cached_run(tmp_factory, overrides: tuple[str, ...] = SMALL) -> Path:
    key = ("run", overrides)
    if key not in _CACHE:
        _CACHE[key] = make_run(tmp_factory.mktemp("run"), overrides)
    return _CACHE[key]


def cached_keys(tmp_factory) -> tuple[Path, Path]:
    from export.signing import generate_keypair

    key = ("keys",)
    if key not in _CACHE:
        _CACHE[key] = tmp_factory.mktemp("keys") / "signing"
        generate_keypair(_CACHE[key])
    private = _CACHE[key]
    return private, Path(f"{private}.pub")


def cached_bundle(
    tmp_factory,
    overrides: tuple[str, ...] = SMALL,
    signed: bool = True,
    int8: bool = False,
    profile: str | None = None,
) -> Path:
    """An exported bundle of an untrained run (signed with :func:`cached_keys`)."""
    from export.bundle_writer import ExportOptions, export_bundle

    key = ("bundle", overrides, signed, int8, profile)
    if key not in _CACHE:
        run = cached_run(tmp_factory, overrides)
        private, _ = cached_keys(tmp_factory)
        out = tmp_factory.mktemp("bundles") / "bundle"
        opts = ExportOptions(key=private if signed else None, int8=int8, profile=profile)
        export_bundle(run, out, opts)
        _CACHE[key] = out
    return _CACHE[key]


def copy_bundle(src: Path, dst: Path) -> Path:
    """A private copy of a bundle that a test may modify."""
    shutil.copytree(src, dst)
    return dst
