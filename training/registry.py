"""The algorithm registry: ``algo:`` in a config -> everything the tools need for that family.

A meta-RL family is a declaration, not a fork: one :class:`Algorithm` entry names its config
class, its training loop, how to rebuild a trained run's networks, its evaluation policy and its
export declaration (module paths, imported lazily so loading a config never imports torch).
``train``, ``evaluate``, ``export``, ``verify``, ``bench training`` and ``demo`` look the entry
up here and never test for an algorithm by name.

Adding a family: a config class (``training/<algo>_config.py``), a training module with
``train(cfg, run_dir, resume, progress, bar_position)``, ``build_networks(cfg, spec)`` and
``policy_for(run, adaptive)``, an export declaration (``export/<algo>_export.py``, see
:mod:`export.family`), a config folder ``configs/<algo>/`` and one entry below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from runtime.configio import validate
from runtime.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Algorithm:
    """One registry entry. ``module`` holds ``train``, ``build_networks``, ``load_networks``
    and ``policy_for``; ``export_module`` the export declaration (None: not exportable)."""

    name: str
    config: str  # "module:Class"
    module: str
    export_module: str | None
    #: Reads the true task vector (the oracle): the 1 of normalized scores, never exported.
    privileged: bool = False
    label: str = ""
    #: Adaptation params an evaluation of a run may set (``evaluate RUN --param NAME=VALUE``):
    #: name -> the config key it overrides. The names are those the family's bundles declare.
    params: dict[str, str] = field(default_factory=dict)

    def config_class(self) -> type[BaseModel]:
        mod, _, cls = self.config.partition(":")
        return getattr(importlib.import_module(mod), cls)

    def impl(self) -> Any:
        """The training module (imports torch)."""
        return importlib.import_module(self.module)

    def exporter(self) -> Any:
        """The export declaration (imports torch)."""
        if self.export_module is None:
            raise CheckpointError(
                f"{self.name} runs cannot be exported: "
                + (
                    "the oracle reads the true task vector, which a deployed device does not have"
                    if self.privileged
                    else "no export declaration"
                )
            )
        return importlib.import_module(self.export_module)


ALGORITHMS: dict[str, Algorithm] = {
    "pearl": Algorithm(
        "pearl", "training.config:PearlConfig", "training.pearl", "export.pearl_export",
        label="PEARL", params={"forget": "pearl.forget"},
    ),
    "oracle": Algorithm(
        "oracle", "training.config:OracleConfig", "training.pearl", None, privileged=True,
        label="oracle",
    ),
    "rl2": Algorithm(
        "rl2", "training.rl2_config:RL2TrainConfig", "training.rl2_family", "export.rl2_export",
        label="RL²",
    ),
    "maml": Algorithm(
        "maml", "training.maml_config:MAMLTrainConfig", "training.maml_family",
        "export.maml_export", label="MAML",
    ),
}  # fmt: skip


def algorithm(name: str) -> Algorithm:
    """The registry entry ``name``, with a clear error listing the known ones."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(
            f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}"
        ) from None


def register_algorithm(entry: Algorithm, *, overwrite: bool = False) -> None:
    """Add an entry (a plugin's own family); a taken name needs ``overwrite``."""
    if entry.name in ALGORITHMS and not overwrite:
        raise ValueError(f"algorithm {entry.name!r} is already registered")
    ALGORITHMS[entry.name] = entry


def validate_run_config(raw: dict[str, Any], source: str) -> Any:
    """Validate a config dict with the class of its ``algo`` (default "pearl")."""
    name = raw.get("algo", "pearl")
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise ConfigError(
            f"{source}: key 'algo': unknown algorithm {name!r}; "
            f"available: {', '.join(sorted(ALGORITHMS))}"
        )
    raw = {**raw, "algo": name}
    return validate(raw, ALGORITHMS[name].config_class(), source)


def entry_of(cfg: Any) -> Algorithm:
    """The registry entry of a validated run config."""
    return algorithm(cfg.algo)
