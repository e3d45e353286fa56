"""Options that several commands share, defined once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from model.weights import DEFAULT_MODEL

MODEL_HELP = "gemma-3-270m (embedded, offline), random:tiny|270m|1b, a hub id, a .gguf file or a model folder."


def model_options(model_help: str = MODEL_HELP) -> Callable[[Any], Any]:
    """`--model` (passed to the command as `model_id`) and `--revision`, the two that name the weights."""
    def decorate(function: Any) -> Any:
        function = click.option("--revision", default=None,
                                 help="Hub revision (branch, tag or commit) of a hub id.")(function)
        return click.option("--model", "model_id", default=DEFAULT_MODEL, show_default=True,
                            help=model_help)(function)
    return decorate
