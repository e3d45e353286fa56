"""One model source through every command: the folder it names without loading it, and a hub revision carried
from the command line to validate, bench and bench's child processes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import model.weights
from exporters.artifact import BundleWriter
from exporters.signature import decoder_io
from gemma_export.cli import cli
from gemma_export.errors import run_cli
from model.loading import load
from model.tokenizer import GemmaTokenizer
from model.weights import load_weights, save_hf_directory, source_slug
from test_weights import write_tiny_gguf
from validation import pipeline
from validation.bench import BenchJob, BenchSettings, run_job
from validation.report import save_piece
from validation.runners import Selection

HUB_ID = "owner/tiny-gemma"
QUICK_BENCH = BenchSettings(threads=1, ttft_prompt_tokens=2, prefill_tokens=4, decode_tokens=2, repeats=1)


def run_in_process(*args: str) -> int:
    try:
        return run_cli(cli, list(args))
    except SystemExit as exit:  # a failed validation ends by sys.exit (see gemma_export's finish)
        return exit.code
    finally:
        logging.disable(logging.NOTSET)  # run_cli quiets logging for the process; the other tests need it back


@pytest.fixture
def hub_revisions(tmp_path, monkeypatch) -> dict[str | None, Path]:
    """HUB_ID with two revisions of different weights (main: random:tiny, v1: random:tiny:7), served from local
    folders instead of the hub."""
    folders = {}
    for revision, source in ((None, "random:tiny"), ("v1", "random:tiny:7")):
        weights = load_weights(source)
        folders[revision] = save_hf_directory(weights.config, weights.state_dict, tmp_path / f"hub-{revision}")
        GemmaTokenizer.tiny().save(folders[revision] / "tokenizer.json")
    monkeypatch.setattr(model.weights, "download_from_hub", lambda repo_id, revision: folders[revision])
    return folders


def test_the_artifacts_folder_of_a_source_is_known_without_its_weights(tiny, tmp_path):
    folder = save_hf_directory(tiny.weights.config, tiny.weights.state_dict, tmp_path / "..odd name..")
    gguf = write_tiny_gguf(tmp_path / "My Model (q8).gguf", tiny.weights)
    for source in ("random:tiny", "random:tiny:7", "random:tiny:0", str(folder), str(gguf)):
        assert source_slug(source) == load_weights(source).slug, source
    assert (source_slug("gemma-3-270m"), source_slug(HUB_ID)) == ("gemma-3-270m", "owner--tiny-gemma")


def test_report_renders_without_loading_the_weights(tmp_path, monkeypatch):
    def no_download(repo_id, revision):
        raise AssertionError("report downloaded the weights")

    monkeypatch.setattr(model.weights, "download_from_hub", no_download)
    folder = tmp_path / "owner--tiny-gemma" / "report"
    save_piece(folder, "validation", {"model": {"slug": "owner--tiny-gemma", "model_id": HUB_ID},
                                      "max_new_tokens": 1, "heldout_tokens": 2, "runners": [], "skipped": []})
    assert run_in_process("report", "--model", HUB_ID, "--out", str(tmp_path)) == 0
    assert (folder / "report.md").is_file() and (folder / "report.html").is_file()


def test_bench_children_load_the_revision_the_bench_was_given(hub_revisions, tmp_path, monkeypatch):
    loaded = load(HUB_ID, revision="v1")
    jobs = []
    monkeypatch.setattr(pipeline, "bench_all", lambda bench_jobs, *args, **kwargs: jobs.extend(bench_jobs) or
                        {"runners": [], "baselines": []})
    pipeline.run_bench(loaded, tmp_path, Selection(formats=("pytorch",), devices=("cpu",)), QUICK_BENCH)
    job = BenchJob.from_json(next(job for job in jobs if job.spec.backend == "pytorch").to_json())
    assert (job.model_id, job.revision) == (HUB_ID, "v1")
    assert load(job.model_id, revision=job.revision).weights.weight_sha256 == loaded.weights.weight_sha256
    assert run_job(job)["decode_tokens_per_second"] > 0  # what the child process runs
    assert loaded.weights.source_label == f"{HUB_ID}@v1"  # how the report names the model


def test_validate_takes_the_revision_the_bundle_was_exported_from(hub_revisions, tmp_path, capsys):
    """The bundle's source hash is the revision's: without --revision it is another model's bundle."""
    weights = load_weights(HUB_ID, revision="v1")
    with BundleWriter(tmp_path, weights.slug, "torchscript") as bundle:
        (bundle.path / "model.pt").write_bytes(b"not a TorchScript file")
        bundle.add_variant("fp32", files=["model.pt"], io=decoder_io(weights.config))
        bundle.finish(config=weights.config, tokenizer=GemmaTokenizer.tiny(),
                      source={"model_id": f"{HUB_ID}@v1", "weight_sha256": weights.weight_sha256})
    validate = ("validate", "--model", HUB_ID, "--out", str(tmp_path), "--formats", "torchscript",
                "--max-new-tokens", "1", "--perplexity-tokens", "2", "--threads", "1")
    assert run_in_process(*validate) == 2
    assert "was exported from other weights" in capsys.readouterr().err
    assert run_in_process(*validate, "--revision", "v1") == 1  # the bundle is this model's; its file is broken
    stderr = capsys.readouterr().err
    assert "FAIL torchscript fp32 cpu: torchscript cannot load model.pt" in stderr, stderr
    assert "other weights" not in stderr
