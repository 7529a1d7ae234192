"""The training loops' progress bar (tqdm): one per run, the metrics that matter in its postfix."""

from __future__ import annotations

from typing import Any

#: Postfix label -> (metrics key, format) shown when the key is in the iteration's row.
Postfix = dict[str, tuple[str, str]]


class Progress:
    """A tqdm bar over training iterations (a no-op when disabled)."""

    def __init__(
        self,
        enabled: bool,
        total: int,
        initial: int,
        desc: str,
        postfix: Postfix,
        position: int = 0,
    ) -> None:
        self.postfix = postfix
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True,
                position=position,
            )  # fmt: skip

    def advance(self, row: dict[str, Any]) -> None:
        """One iteration done: show its metrics."""
        if self.bar is None:
            return
        shown = {label: fmt.format(row[key]) for label, (key, fmt) in self.postfix.items()
                 if key in row}  # fmt: skip
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
