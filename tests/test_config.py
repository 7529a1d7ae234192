"""Config loading: composition, overrides, and clear errors for every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ConfigError, UnknownNameError
from runtime.tasks import make_family
from training.config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs" / "pearl").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_a_known_env(path: Path) -> None:
    cfg = load_train_config(path)
    assert isinstance(cfg, TrainConfig)
    make_family(cfg.env.name)


def test_extends_merges_over_base_and_override_wins() -> None:
    base = load_train_config(ROOT / "configs/pearl/base.yaml")
    oracle = load_train_config(
        ROOT / "configs/pearl/point-nav-oracle.yaml", ["sac.lr_actor=0.001", "train.iterations=7"]
    )
    assert oracle.algo == "oracle"
    assert oracle.model.hidden == base.model.hidden  # inherited through two levels
    assert oracle.sac.lr_actor == 0.001
    assert oracle.train.iterations == 7


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("env: {name: point-nav\n", [], "malformed YAML at line"),
        ("env: {nmae: point-nav}\n", [], "key 'env.nmae': unknown key"),
        ("sac: {lr_actor: fast}\n", [], "key 'sac.lr_actor'"),
        ("sac: {gamma: 1.5}\n", [], "key 'sac.gamma'"),
        ("train: {iterations: 0}\n", [], "key 'train.iterations'"),
        ("- a\n- b\n", [], "expected a mapping at top level"),
        ("extends: nowhere.yaml\n", [], "config file not found"),
        ("seed: 1\n", ["sac.nope=3"], "key 'sac.nope': unknown key"),
        ("seed: 1\n", ["novalue"], "expected KEY=VALUE"),
        ("model: {factor_rank: 9}\n", [], "key 'model.factor_rank'"),
        ("model: {factor_diagonal: false}\n", [], "needs factor_rank >= 1"),
        (
            "model: {factor_rank: 1, factor_diagonal: false, factor_var: shared}\n",
            [],
            "factor_var: shared is the diagonal part's variance",
        ),
        ("model: {factor_var: global}\n", [], "key 'model.factor_var'"),
        ("train: {average_modules: [critic]}\n", [], "key 'train.average_modules'"),
        ("train: {average_decay: 1.0}\n", [], "key 'train.average_decay'"),
    ],
)
def test_bad_config_fails_naming_file_and_key(
    tmp_path: Path, text: str, overrides: list[str], expected: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_train_config(path, overrides)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_env_lists_the_available_ones() -> None:
    with pytest.raises(UnknownNameError) as err:
        make_family("point-nva")
    assert "point-nav" in str(err.value) and "available" in str(err.value)


def test_deeply_nested_yaml_is_a_one_line_config_error(tmp_path: Path) -> None:
    """PyYAML recurses once per nesting level: a hostile file must not end in a traceback."""
    from runtime.configio import apply_override, load_yaml_tree
    from runtime.errors import ConfigError

    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_yaml_tree(deep)
    with pytest.raises(ConfigError, match="nested too deeply"):
        apply_override({}, "a=" + "[" * 5000)
