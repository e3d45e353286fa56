"""Progress of long work, in its two shapes: the named steps of an export (`Progress`, called with a step name)
and the bytes of hashing a bundle (`ByteProgress`, called with bytes done and bytes in all); and the terminal
bars (tqdm) that show them, so that a long export or verification never looks hung."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from model.interrupts import raise_if_interrupted

Progress = Callable[[str], None] | None
ByteProgress = Callable[[int, int], None]


def report(progress: Progress, step: str) -> None:
    """Announce the next step of an export."""
    raise_if_interrupted()  # between steps: stop at once after a Ctrl-C that the last step's library swallowed
    if progress is not None:
        progress(step)


class StepProgress:
    """A progress line for an export: each step advances it and shows its name and the elapsed time."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.bar: tqdm | None = None

    def __enter__(self) -> "StepProgress":
        self.bar = tqdm(desc=self.title, unit="step", bar_format="{desc}: {n} steps [{elapsed}] {postfix}",
                        leave=False)
        return self

    def __call__(self, step: str) -> None:
        assert self.bar is not None
        self.bar.set_postfix_str(step)
        self.bar.update(1)

    def __exit__(self, *exc_info: object) -> None:
        assert self.bar is not None
        self.bar.close()


def byte_progress_bar(description: str) -> tuple[Any, ByteProgress]:
    """A bar over bytes, and the `ByteProgress` that moves it (e.g. `load_bundle(..., progress=update)`)."""
    bar = tqdm(desc=description, unit="B", unit_scale=True, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return bar, update
