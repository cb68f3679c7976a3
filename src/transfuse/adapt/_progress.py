"""The progress bar of an adaptation run (rich, as the rest of transfuse): steps done, the objective, times."""

from __future__ import annotations

from typing import Any


class AdaptProgress:
    """A rich progress bar over ``total`` steps showing the latest entropy; does nothing when disabled."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> AdaptProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[entropy]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, entropy="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def step(self, entropy: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, entropy=f"entropy {entropy:.4f}")
