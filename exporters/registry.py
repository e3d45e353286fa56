"""The one table of formats (which exporter serves each, its precisions and default, its options), and the one
routine that turns an exporter's files into a bundle. Everything else that names formats or precisions (the
bundle reader, the validation runners, the CLI's choices and help) derives them from `FORMATS`.

Every format module has `export(model, out_dir, precision, progress) -> ExportedVariant | list[...]`; nothing
else in the pipeline branches on the format to export.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from exporters.signature import ExportedVariant
from model.errors import UserError
from model.loading import LoadedModel
from model.weights import source_block_grids

if TYPE_CHECKING:
    from exporters.artifact import Bundle


@dataclass(frozen=True)
class FormatInfo:
    module: str
    precisions: tuple[str, ...]
    default_precision: str
    options: tuple[str, ...] = ()  # keyword arguments the exporter takes besides the precision
    carries_source_grids: bool = False  # its compressed precisions take the source's own grids (`source_grids=`)


COMPRESSED_PRECISIONS = ("int8", "int4")
# The float precisions and the dtype of a model cast to each (model/gemma3.py: 16-bit weights, products and KV
# cache; the residual stream, norms and logits stay float32).
PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS: dict[str, FormatInfo] = {
    "torchscript": FormatInfo("exporters.torchscript", ("fp32", "bf16", "fp16"), "fp32"),
    "onnx": FormatInfo("exporters.onnx", ("fp32", "fp16", "int8", "int4"), "fp32", carries_source_grids=True),
    "coreml": FormatInfo("exporters.coreml", ("fp16", "fp32", "int8", "int4"), "fp16", ("max_context",),
                         carries_source_grids=True),
    "executorch": FormatInfo("exporters.executorch", ("fp32", "fp16"), "fp32", ("max_context",)),
}


def precisions_help() -> str:
    """Every format's precisions and its default: `torchscript: fp32|bf16|fp16 (default fp32); onnx: …`."""
    return "; ".join(f"{fmt}: {'|'.join(info.precisions)} (default {info.default_precision})"
                     for fmt, info in FORMATS.items())


def format_info(fmt: str) -> FormatInfo:
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def check_precisions(fmt: str, precisions: list[str]) -> list[str]:
    info = format_info(fmt)
    for precision in precisions:
        if precision not in info.precisions:
            raise UserError(f"{fmt} has no precision {precision!r}", f"use one of: {', '.join(info.precisions)}")
    return precisions or [info.default_precision]


def check_format_options(fmt: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(format_info(fmt).options))
    if unknown:
        flags = ", ".join("--" + name.replace("_", "-") for name in unknown)
        takers = [name for name, info in FORMATS.items() if set(unknown) <= set(info.options)]
        raise UserError(f"{flags} does not apply to {fmt}", f"drop it, or export {' or '.join(takers)} with it")


def variant_key(exported: ExportedVariant) -> str:
    """Manifest key of a variant: its precision; a torch.export program beside a TorchScript file of the same
    precision is `<precision>-pt2`."""
    return f"{exported.precision}-pt2" if exported.files[0].endswith(".pt2") else exported.precision


def export_bundle(loaded: LoadedModel, fmt: str, precisions: list[str], artifacts_root: Path,
                  progress: Callable[[str], None] | None = None, wait: bool = False,
                  format_options: dict[str, Any] | None = None, requantize: bool = False,
                  float_quantizer: str | None = None) -> Bundle:
    """Export `precisions` of `fmt` into artifacts_root/<slug>/<fmt>/, keeping the bundle's other verified
    variants; publish atomically (the previous bundle survives any failure or interruption). `format_options`
    are keyword arguments of that format's exporter (Core ML: max_context). `requantize`: a source tensor whose
    GGUF type has no exact grid is rounded onto a new one instead of failing the export. `float_quantizer`: how
    weights without a grid of their own are rounded (a name in exporters/weight_grids.py; default its choice)."""
    from exporters.artifact import BundleWriter  # imported here: artifact checks format names against FORMATS

    precisions = check_precisions(fmt, precisions)
    format_options = dict(format_options or {})
    check_format_options(fmt, format_options)
    if format_info(fmt).carries_source_grids and set(precisions) & set(COMPRESSED_PRECISIONS):
        format_options["source_grids"] = source_block_grids(loaded.weights, requantize)
        if float_quantizer is not None:
            format_options["float_quantizer"] = float_quantizer
    exporter = importlib.import_module(format_info(fmt).module)
    weights = loaded.weights
    source = {"model_id": weights.source_id, "weight_sha256": weights.weight_sha256, "slug": weights.slug}
    # A format's own files beside its variants (ONNX: the Hugging Face repository files, `write_bundle_files`).
    bundle_files = getattr(exporter, "write_bundle_files", None)
    with BundleWriter(artifacts_root, weights.slug, fmt, keep_existing_variants=True, wait=wait) as bundle:
        for variant in exported_variants(exporter, loaded, bundle.path, precisions, progress, format_options):
            fields = dataclasses.asdict(variant)
            fields["precision"] = variant_key(variant)
            bundle.add_variant(**fields)
        return bundle.finish(config=weights.config, tokenizer=loaded.tokenizer,
                             source={"model_id": weights.source_label, "weight_sha256": weights.weight_sha256},
                             options={"precisions": precisions}, progress=None,
                             extra_files=None if bundle_files is None else
                             lambda folder, variants: bundle_files(folder, weights.config, variants, source))


def exported_variants(exporter: Any, loaded: LoadedModel, out_dir: Path, precisions: list[str],
                      progress: Callable[[str], None] | None, format_options: dict[str, Any]) -> list[ExportedVariant]:
    """Every variant of `precisions`, written into `out_dir`: through the format's `export_many` where it has one
    (it shares work between precisions, e.g. one ONNX trace for fp32, int8 and int4), else one `export` each
    (which may return several variants: TorchScript's .pt and .pt2)."""
    if hasattr(exporter, "export_many"):
        return exporter.export_many(loaded.model, out_dir, precisions, progress=progress, **format_options)
    variants: list[ExportedVariant] = []
    for precision in precisions:
        exported = exporter.export(loaded.model, out_dir, precision, progress=progress, **format_options)
        variants.extend(exported if isinstance(exported, list) else [exported])
    return variants
