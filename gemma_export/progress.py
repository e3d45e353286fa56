"""A progress line for multi-step work: each step an exporter reports advances it and shows its name and the
elapsed time (tqdm), so a long export never looks hung."""

from __future__ import annotations

from tqdm import tqdm


class StepProgress:
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
