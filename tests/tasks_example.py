"""Run the user-family example of docs/tasks.md exactly as written, so docs and tests agree."""

from __future__ import annotations

import functools
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "tasks.md"
MARKER = "<!-- example: pendulum-varied -->"


def example_source() -> str:
    """The python code block right after the example marker in docs/tasks.md."""
    text = DOC.read_text()
    after = text[text.index(MARKER) + len(MARKER) :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```", start)]


@functools.cache
def run_example() -> dict:
    """Execute the example once per process (it registers 'pendulum-varied'); its namespace."""
    namespace: dict = {"__name__": "docs_tasks_example"}
    exec(compile(example_source(), str(DOC), "exec"), namespace)
    return namespace
