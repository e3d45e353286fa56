"""Artifact bundles: manifest contents, verification, atomic and crash-safe publishing, locking, merging."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from exporters import artifact
from exporters.artifact import BundleWriter, load_bundle
from model.config import PRESETS
from model.errors import UserError
from model.files import write_atomic
from model.weights import safe_slug

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]
SOURCE = {"model_id": "random:tiny", "weight_sha256": "0" * 64}
IO = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
      "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", TINY.vocab_size]}]}


class FakeTokenizer:
    def save(self, path: str) -> None:
        Path(path).write_text('{"model": {"type": "fake"}}', encoding="utf-8")


def model_file(precision: str) -> str:
    return "model.onnx" if precision == "fp32" else f"model_{precision}.onnx"


def write_bundle(root: Path, precisions=("fp32",), content: bytes = b"weights", tokenizer=None, **writer_options):
    with BundleWriter(root, "tiny", "onnx", **writer_options) as bundle:
        for precision in precisions:
            name = model_file(precision)
            (bundle.path / name).write_bytes(b"graph " + precision.encode() + content)
            (bundle.path / f"{name}.data").write_bytes(b"tensors " + precision.encode() + content)
            bundle.add_variant(precision, files=[name], io=IO, options={"precision": precision}, opset=18)
        return bundle.finish(config=TINY, tokenizer=tokenizer or FakeTokenizer(), source=SOURCE,
                             options={"opset": 18})


def leftovers(root: Path) -> list[str]:
    """Hidden entries of the model folder other than the (deliberately permanent) lock file."""
    return sorted(p.name for p in (root / "tiny").iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_round_trip_write_then_load_verifies(tmp_path):
    written = write_bundle(tmp_path, precisions=("fp32", "fp16"))
    loaded = load_bundle(tmp_path, "tiny", "onnx")
    assert loaded.path == tmp_path / "tiny" / "onnx" == written.path
    assert loaded.config == TINY
    assert loaded.format == "onnx" and loaded.precisions == ["fp16", "fp32"]
    fp16 = loaded.variant("fp16")
    assert fp16.files == [loaded.path / "model_fp16.onnx"] and fp16.opset == 18
    assert fp16.io == IO and fp16.options == {"precision": "fp16"} and fp16.logits_dtype == "float32"
    manifest = loaded.manifest
    assert manifest["schema_version"] == 1 and manifest["options"] == {"opset": 18}
    assert manifest["source"] == {**SOURCE, "slug": "tiny"}
    assert manifest["versions"]["python"] == sys.version.split()[0] and "torch" in manifest["versions"]
    assert datetime.fromisoformat(manifest["created_at"]).utcoffset() == timedelta(0)
    assert json.loads((loaded.path / "config.json").read_text())["model_type"] == "gemma3_text"
    assert leftovers(tmp_path) == []


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    with BundleWriter(tmp_path, "tiny", "coreml") as bundle:
        weights = bundle.path / "model.mlpackage" / "Data" / "weights"
        weights.mkdir(parents=True)
        (weights / "weight.bin").write_bytes(os.urandom(3 * artifact.HASH_BLOCK_BYTES + 17))
        (bundle.path / "model.mlpackage" / "Manifest.json").write_text("{}")
        bundle.add_variant("fp16", files=["model.mlpackage"], io=IO, deployment_target="iOS18")
        bundle.finish(config=TINY, tokenizer=FakeTokenizer(), source=SOURCE)
    folder = tmp_path / "tiny" / "coreml"
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert on_disk == ["config.json", "model.mlpackage/Data/weights/weight.bin", "model.mlpackage/Manifest.json",
                       "tokenizer.json"]
    assert manifest["files"] == [{"path": path, "size": (folder / path).stat().st_size,
                                  "sha256": hashlib.sha256((folder / path).read_bytes()).hexdigest()}
                                 for path in on_disk]
    assert manifest["variants"]["fp16"]["deployment_target"] == "iOS18"
    assert "opset" not in manifest["variants"]["fp16"]


def test_manifest_is_written_after_every_file_it_lists(tmp_path, monkeypatch):
    present_when_manifest_written = []
    write_json = artifact._write_json_atomic

    def spy(path, data):
        present_when_manifest_written.extend(sorted(
            p.relative_to(path.parent).as_posix() for p in path.parent.rglob("*") if p.is_file()))
        write_json(path, data)

    monkeypatch.setattr(artifact, "_write_json_atomic", spy)
    bundle = write_bundle(tmp_path)
    assert present_when_manifest_written == [entry["path"] for entry in bundle.manifest["files"]]
    assert len(present_when_manifest_written) == 4


def test_progress_reports_every_byte(tmp_path):
    write_bundle(tmp_path, content=b"x" * (2 * artifact.HASH_BLOCK_BYTES))
    calls = []
    bundle = load_bundle(tmp_path / "tiny" / "onnx", progress=lambda done, total: calls.append((done, total)))
    total = sum(entry["size"] for entry in bundle.manifest["files"])
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_replacing_a_bundle_publishes_the_new_one_and_removes_the_old(tmp_path):
    write_bundle(tmp_path, content=b"old")
    write_bundle(tmp_path, content=b"new")
    loaded = load_bundle(tmp_path, "tiny", "onnx")
    assert (loaded.path / "model.onnx").read_bytes() == b"graph fp32new"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("interruption", [RuntimeError("export failed"), KeyboardInterrupt(), SystemExit(1)])
def test_leaving_the_block_unfinished_keeps_the_previous_bundle(tmp_path, interruption):
    write_bundle(tmp_path, content=b"old")
    with pytest.raises(type(interruption)):
        with BundleWriter(tmp_path, "tiny", "onnx") as bundle:
            (bundle.path / "model.onnx").write_bytes(b"half written")
            raise interruption
    assert [p.parent.name for p in tmp_path.rglob("manifest.json")] == ["onnx"]
    assert (load_bundle(tmp_path, "tiny", "onnx").path / "model.onnx").read_bytes() == b"graph fp32old"
    assert leftovers(tmp_path) == []


def test_failure_inside_finish_before_the_manifest_leaves_no_manifest(tmp_path):
    class BrokenTokenizer:
        def save(self, path):
            raise RuntimeError("tokenizer cannot be saved")

    write_bundle(tmp_path, content=b"old")
    with pytest.raises(RuntimeError, match="tokenizer"):
        write_bundle(tmp_path, content=b"new", tokenizer=BrokenTokenizer())
    assert [p.parent.name for p in tmp_path.rglob("manifest.json")] == ["onnx"]
    assert (load_bundle(tmp_path, "tiny", "onnx").path / "model.onnx").read_bytes() == b"graph fp32old"
    assert leftovers(tmp_path) == []


def test_failed_swap_puts_the_previous_bundle_back(tmp_path, monkeypatch):
    write_bundle(tmp_path, content=b"old")
    rename = os.rename

    def rename_failing_for_staging(source, destination):
        if ".tmp-" in str(source):
            raise OSError(errno.EIO, "Input/output error")
        rename(source, destination)

    monkeypatch.setattr(os, "rename", rename_failing_for_staging)
    with pytest.raises(OSError, match="Input/output"):
        write_bundle(tmp_path, content=b"new")
    assert (load_bundle(tmp_path, "tiny", "onnx").path / "model.onnx").read_bytes() == b"graph fp32old"
    assert leftovers(tmp_path) == []


def test_stale_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    write_bundle(tmp_path)
    model_dir = tmp_path / "tiny"
    dead = dead_pid()
    for name in (f".onnx.tmp-{dead}-0badc0de", f".onnx.old-{dead}-00000001", f".onnx.tmp-{os.getpid()}-0000beef",
                 f".coreml.tmp-{dead}-00000002"):
        (model_dir / name).mkdir()
        (model_dir / name / "model.onnx").write_bytes(b"partial")
    write_bundle(tmp_path)
    # Another format's leftovers wait for that format's next export, which holds its lock.
    assert leftovers(tmp_path) == [f".coreml.tmp-{dead}-00000002", f".onnx.tmp-{os.getpid()}-0000beef"]


def test_crash_between_the_two_renames_restores_the_previous_bundle(tmp_path):
    write_bundle(tmp_path, content=b"old")
    model_dir = tmp_path / "tiny"
    os.rename(model_dir / "onnx", model_dir / f".onnx.old-{dead_pid()}-0000abcd")
    (model_dir / f".onnx.tmp-{dead_pid()}-0000dcba").mkdir()
    with BundleWriter(tmp_path, "tiny", "onnx") as bundle:
        assert (load_bundle(tmp_path, "tiny", "onnx").path / "model.onnx").read_bytes() == b"graph fp32old"
        (bundle.path / "model.onnx").write_bytes(b"new")
        bundle.add_variant("fp32", files=["model.onnx"], io=IO)
        bundle.finish(config=TINY, tokenizer=FakeTokenizer(), source=SOURCE)
    assert (model_dir / "onnx" / "model.onnx").read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_modified_file_fails_verification_with_sha256(tmp_path):
    bundle = write_bundle(tmp_path)
    data = bundle.path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[::-1])  # same size: only the hash can tell
    with pytest.raises(UserError, match=r"model.onnx.data was modified after export \(sha256 mismatch\)"):
        load_bundle(bundle.path)
    assert load_bundle(bundle.path, verify=False).precisions == ["fp32"]


def test_truncated_file_fails_on_the_size_check(tmp_path):
    bundle = write_bundle(tmp_path)
    (bundle.path / "model.onnx").write_bytes(b"g")
    with pytest.raises(UserError, match=r"model.onnx has 1 bytes but the manifest says 17"):
        load_bundle(bundle.path)


def test_deleted_file_fails_verification(tmp_path):
    bundle = write_bundle(tmp_path)
    (bundle.path / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json listed in the manifest is missing; re-export"):
        load_bundle(bundle.path)


def rewrite_manifest(bundle_path: Path, change) -> None:
    manifest = json.loads((bundle_path / "manifest.json").read_text())
    change(manifest)
    (bundle_path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad_path", ["../outside.bin", "/etc/passwd", "a/../../b", "./model.onnx", "a\\b"])
def test_manifest_path_that_leaves_the_bundle_is_refused(tmp_path, bad_path):
    bundle = write_bundle(tmp_path)
    rewrite_manifest(bundle.path, lambda m: m["files"].append({"path": bad_path, "size": 0, "sha256": "0" * 64}))
    with pytest.raises(UserError, match="not a valid bundle manifest: path .* not a plain relative path"):
        load_bundle(bundle.path)


def test_manifest_path_through_a_symlink_out_of_the_bundle_is_refused(tmp_path):
    bundle = write_bundle(tmp_path)
    (tmp_path / "secret").write_bytes(b"secret")
    (bundle.path / "link").symlink_to(tmp_path / "secret")
    rewrite_manifest(bundle.path, lambda m: m["files"].append(
        {"path": "link", "size": 6, "sha256": hashlib.sha256(b"secret").hexdigest()}))
    with pytest.raises(UserError, match="leads outside the bundle through a symbolic link"):
        load_bundle(bundle.path)


@pytest.mark.parametrize("text, message", [
    (None, "has no manifest.json: it is not a finished export; re-run gemma-export export"),
    ("{not json", "is not valid JSON"),
    ("[]", "not a valid bundle manifest: it is not a JSON object"),
    ('{"schema_version": 2}', "has schema_version 2, this tool reads 1"),
    ('{"schema_version": 1}', "field 'format' is missing"),
])
def test_missing_or_invalid_manifest_is_a_user_error(tmp_path, text, message):
    bundle = write_bundle(tmp_path)
    manifest = bundle.path / "manifest.json"
    manifest.unlink()
    if text is not None:
        manifest.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_bundle(bundle.path)


def test_wrong_field_types_are_refused(tmp_path):
    bundle = write_bundle(tmp_path)
    rewrite_manifest(bundle.path, lambda m: m["variants"]["fp32"]["io"]["inputs"][0].update(shape=[1.5]))
    with pytest.raises(UserError, match="a dimension must be an int or the name of a dynamic axis"):
        load_bundle(bundle.path)


def test_unknown_precision_lists_the_available_ones(tmp_path):
    bundle = write_bundle(tmp_path, precisions=("fp32", "q4"))
    with pytest.raises(UserError, match=r"no 'fp16' variant; use one of: fp32, q4"):
        bundle.variant("fp16")


def test_missing_bundle_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist; run gemma-export export first"):
        load_bundle(tmp_path, "tiny", "onnx")


# The folder names the weights loader has always made (model.weights.safe_slug, the one definition): bundles
# exported before stay where validate and report look for them.
@pytest.mark.parametrize("text, slug", [
    ("google/gemma-3-270m", "google--gemma-3-270m"), ("random:tiny", "random-tiny"),
    ("../../etc", "etc"), (".hidden", "hidden"), ("a..b", "a.b"), ("Gemma 3 (q4).", "Gemma-3--q4"), ("..", "model"),
])
def test_safe_slug(text, slug, tmp_path):
    assert safe_slug(text) == slug
    with BundleWriter(tmp_path, slug, "onnx") as bundle:  # the writer takes every slug the loader makes
        (bundle.path / "model.onnx").write_bytes(b"graph")
        bundle.add_variant("fp32", files=["model.onnx"], io=IO)
        bundle.finish(config=TINY, tokenizer=FakeTokenizer(), source=SOURCE)
    assert load_bundle(tmp_path, slug, "onnx").path == tmp_path / slug / "onnx"


def test_writer_refuses_unsafe_slug_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="'../escape' is not a safe folder name; use 'escape'"):
        BundleWriter(tmp_path, "../escape", "onnx")
    with pytest.raises(UserError, match="'Gemma 3' is not a safe folder name; use 'Gemma-3'"):
        BundleWriter(tmp_path, "Gemma 3", "onnx")
    with pytest.raises(UserError, match="unknown export format 'gguf'; use one of: torchscript, onnx, coreml"):
        BundleWriter(tmp_path, "tiny", "gguf")


def test_read_only_artifacts_root_is_a_user_error(tmp_path, monkeypatch):
    def read_only_mkdir(path, mode=0o777):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    with pytest.raises(UserError, match="cannot write to .*Read-only file system.*; make it writable or use another"):
        write_bundle(tmp_path / "artifacts")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("blocker", ["artifacts", "artifacts/tiny", "artifacts/tiny/onnx"])
def test_file_where_a_folder_should_be_is_a_user_error(tmp_path, blocker):
    (tmp_path / blocker).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocker).write_text("in the way")
    with pytest.raises(UserError, match=f"{tmp_path / blocker} is a file where a folder should be"):
        write_bundle(tmp_path / "artifacts")
    if blocker == "artifacts/tiny/onnx":
        assert leftovers(tmp_path / "artifacts") == []


def test_disk_full_while_exporting_is_a_user_error_without_leftovers(tmp_path):
    write_bundle(tmp_path, content=b"old")
    with pytest.raises(UserError, match="no space left on the device while writing .*onnx; free some disk space"):
        with BundleWriter(tmp_path, "tiny", "onnx") as bundle:
            (bundle.path / "model.onnx").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert leftovers(tmp_path) == []
    assert (load_bundle(tmp_path, "tiny", "onnx").path / "model.onnx").read_bytes() == b"graph fp32old"


@pytest.mark.parametrize("free_bytes, names_the_disk", [(1 << 20, True), (50 << 30, False)])
def test_a_write_error_without_errno_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch, free_bytes,
                                                                           names_the_disk):
    """numpy's `tofile` (ONNX external data) fails on a full disk with OSError("problem writing element …") and no
    errno (seen in a `make all` that filled the disk): with almost no space left, the error says so; with space
    left, the same error stays what it is."""
    import exporters.artifact as artifact

    real_usage = shutil.disk_usage
    monkeypatch.setattr(artifact.shutil, "disk_usage",
                        lambda path: real_usage(path)._replace(free=free_bytes))
    with pytest.raises(UserError if names_the_disk else OSError) as raised:
        with BundleWriter(tmp_path, "tiny", "onnx") as bundle:
            (bundle.path / "model.onnx_data").write_bytes(b"partial")
            raise OSError("problem writing element 1236992 to file")
    if names_the_disk:
        assert str(raised.value).startswith("no space left on the device while writing")
    else:
        assert type(raised.value) is OSError and "problem writing element" in str(raised.value)
    assert leftovers(tmp_path) == []


def test_disk_full_during_finish_is_a_user_error_without_leftovers(tmp_path, monkeypatch):
    def full_disk_fsync(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    with pytest.raises(UserError, match="no space left on the device"):
        write_bundle(tmp_path)
    assert leftovers(tmp_path) == [] and not (tmp_path / "tiny" / "onnx").exists()


HOLD_THE_LOCK = """
import sys
from exporters.artifact import BundleWriter
with BundleWriter(sys.argv[1], "tiny", "onnx"):
    print("locked", flush=True)
    sys.stdin.readline()
    raise SystemExit(0)
"""


def test_second_writer_fails_or_waits_while_another_process_holds_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = tmp_path / "tiny" / ".onnx.lock"
        with pytest.raises(UserError, match=rf"another export into .*onnx is running \(pid {holder.pid}, "
                                            rf"lock {lock}\); wait for it or use another --out"):
            write_bundle(tmp_path)
        with pytest.raises(UserError, match=r"\(waited 0.2 s\)"):
            write_bundle(tmp_path, wait=True, wait_timeout_s=0.2)
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert write_bundle(tmp_path, wait=True, wait_timeout_s=60).precisions == ["fp32"]
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert leftovers(tmp_path) == []


def test_keep_existing_variants_merges_a_new_precision_into_the_bundle(tmp_path):
    first = write_bundle(tmp_path, precisions=("fp32", "fp16", "q4"), content=b"v1")
    merged = write_bundle(tmp_path, precisions=("fp16",), content=b"v2", keep_existing_variants=True)
    assert merged.precisions == ["fp16", "fp32", "q4"]
    assert (merged.path / "model_fp16.onnx").read_bytes() == b"graph fp16v2"
    assert (merged.path / "model_q4.onnx.data").read_bytes() == b"tensors q4v1"
    old_entries = {entry["path"]: entry for entry in first.manifest["files"]}
    new_entries = {entry["path"]: entry for entry in load_bundle(merged.path).manifest["files"]}
    assert new_entries.keys() == old_entries.keys()
    for path in ("model.onnx", "model.onnx.data", "model_q4.onnx", "model_q4.onnx.data"):
        assert new_entries[path] == old_entries[path]
    assert new_entries["model_fp16.onnx"]["sha256"] == hashlib.sha256(b"graph fp16v2").hexdigest()
    replaced = write_bundle(tmp_path, precisions=("fp16",), content=b"v3")
    assert replaced.precisions == ["fp16"]


def test_keep_existing_variants_drops_a_previous_bundle_that_fails_verification(tmp_path):
    first = write_bundle(tmp_path, precisions=("fp32", "q4"), content=b"v1")
    (first.path / "model_q4.onnx").write_bytes(b"graph q4XX")
    merged = write_bundle(tmp_path, precisions=("fp16",), content=b"v2", keep_existing_variants=True)
    assert merged.precisions == ["fp16"]
    assert sorted(p.name for p in merged.path.iterdir()) == [
        "config.json", "manifest.json", "model_fp16.onnx", "model_fp16.onnx.data", "tokenizer.json"]


def test_forgetting_finish_is_a_programming_error(tmp_path):
    with pytest.raises(RuntimeError, match="without finish"):
        with BundleWriter(tmp_path, "tiny", "onnx"):
            pass
    assert not (tmp_path / "tiny" / "onnx").exists() and leftovers(tmp_path) == []


def test_an_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """model.files.write_atomic, the one writer of manifests, reports and tokenizer.json."""
    path = tmp_path / "report" / "report.md"
    write_atomic(path, "old")

    def full_disk_fsync(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    with pytest.raises(OSError):
        write_atomic(path, "new")
    assert path.read_text(encoding="utf-8") == "old" and [p.name for p in path.parent.iterdir()] == ["report.md"]
