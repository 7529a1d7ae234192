"""Load YAML configs into typed, validated pydantic models.

Composition: a YAML file may name a parent with ``extends: other.yaml`` (path relative to the
file); the child is deep-merged over the parent. Overrides ``a.b=value`` (value parsed as YAML)
are applied last. Every error names the file, the dotted key and what was expected.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from runtime.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

EXTENDS_KEY = "extends"


def load_config(path: str | Path, model: type[M], overrides: list[str] | None = None) -> M:
    """Read ``path`` (following ``extends``), apply ``overrides`` and validate into ``model``."""
    path = Path(path)
    raw = load_yaml_tree(path)
    for item in overrides or []:
        apply_override(raw, item)
    return validate(raw, model, source=str(path))


def validate(raw: dict[str, Any], model: type[M], source: str) -> M:
    """Validate a plain dict into ``model``, turning pydantic errors into one clear line each."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in exc.errors())) from None


def load_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML mapping and merge it over its ``extends`` parent, recursively."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' cycle through {' -> '.join(map(str, _seen))}")
    data = _read_mapping(path)
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: key '{EXTENDS_KEY}': expected a file path, got {parent!r}")
    base = load_yaml_tree(path.parent / parent, (*_seen, path))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``over`` merged in; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override in place (value parsed as YAML)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. sac.lr=0.001")
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"override {item!r}: value is nested too deeply") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{path}: malformed YAML: nested too deeply") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"key '{key}': unknown key (check the spelling)"
    if kind == "missing":
        return f"key '{key}': required but missing"
    got = err.get("input")
    return f"key '{key}': {err.get('msg', 'invalid')} (got {got!r})"
