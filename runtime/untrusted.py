"""Parsing input that comes from outside the process: one error type, whatever the input.

``json.loads`` on hostile bytes can raise more than ``ValueError``: a document nested a few
thousand levels deep raises ``RecursionError``, an integer of more than 4,300 digits raises
``ValueError`` from the int conversion, ``1e999`` silently becomes ``inf``. Every parser of
outside input on the device side (signed commands, manifests, ...) goes through
:func:`loads_json`, so each of these becomes one :class:`UntrustedInputError` (a ``ValueError``)
with a short reason, and non-finite numbers never enter the program.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: Deepest nesting accepted; real documents (manifests, commands) stay below 10 levels.
MAX_DEPTH = 64


class UntrustedInputError(ValueError):
    """Outside input that is not a well-formed document; the message is one line."""


def loads_json(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON from outside; raise :class:`UntrustedInputError` for anything malformed.

    Refused: invalid UTF-8 or JSON, nesting deeper than ``max_depth``, integers too long to
    convert, and non-finite numbers (``NaN``, ``Infinity``, ``1e999``).
    """
    try:
        value = json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise UntrustedInputError("nested too deeply") from None
    except MemoryError:
        raise UntrustedInputError("too large to parse") from None
    except UnicodeDecodeError:
        raise UntrustedInputError("not UTF-8") from None
    except UntrustedInputError:
        raise
    except (ValueError, TypeError) as exc:
        raise UntrustedInputError(f"not valid JSON ({_first_line(exc)})") from None
    if _depth(value, max_depth) > max_depth:
        raise UntrustedInputError(f"nested deeper than {max_depth} levels")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UntrustedInputError(f"number {text[:20]} is out of range")
    return value


def _no_constant(text: str) -> float:
    raise UntrustedInputError(f"{text} is not a number")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed document, iteratively, stopping once past ``limit``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0][:200] if text else type(exc).__name__
