"""Artifact bundles: `artifacts/<slug>/<format>/` holding the model file(s), tokenizer.json, config.json
and manifest.json.

The manifest lists every other file with its size and sha256, the I/O signature of each precision
variant, library versions and export options. It is written last, and the staged folder is published by
rename, so a bundle folder with a manifest is complete. A hard crash leaves only a dot-prefixed staging
folder without a manifest, which the next export of the same slug and format removes.

    with BundleWriter("artifacts", slug, "onnx") as bundle:
        torch.onnx.export(..., bundle.path / "model.onnx")
        bundle.add_variant("fp32", files=["model.onnx"], io=decoder_io(config), opset=18)
        bundle.finish(config=config, tokenizer=tokenizer, source={"model_id": ..., "weight_sha256": ...})
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from exporters.progress import ByteProgress
from exporters.registry import FORMATS
from model.config import Gemma3Config
from model.errors import UserError
from model.files import fsync_path, write_atomic
from model.interrupts import raise_if_interrupted, signals_deferred
from model.weights import safe_slug

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
CONFIG = "config.json"
HASH_BLOCK_BYTES = 1 << 20
VERSIONED_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxscript", "coremltools", "transformers")
REQUIRED_FIELDS: dict[str, type] = {
    "schema_version": int, "format": str, "precisions": list, "variants": dict, "files": list,
    "versions": dict, "options": dict, "source": dict, "config": dict, "created_at": str,
}
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
LOCK_POLL_SECONDS = 0.1

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- names

def _check_slug_and_format(slug: str, fmt: str) -> None:
    """A safe slug is one plain folder name, so `<root>/<slug>/<format>` cannot leave the root."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    if not isinstance(slug, str) or slug != safe_slug(slug):  # the weights loader's slugs are all fixed points
        raise UserError(f"model slug {slug!r} is not a safe folder name",
                        f"use {safe_slug(slug)!r} (letters, digits, '-', '_' and '.')")


def _unsafe_path_reason(bundle_dir: Path, relative: Any) -> str | None:
    """Why a manifest path could reach outside the bundle, or None when it is a plain path inside it."""
    if not isinstance(relative, str) or not relative:
        return f"path {relative!r} is not a non-empty string"
    pure = PurePosixPath(relative)
    if ("\\" in relative or "\0" in relative or pure.is_absolute() or ".." in pure.parts or not pure.parts
            or pure.as_posix() != relative):
        return f"path {relative!r} is not a plain relative path inside the bundle"
    if relative == MANIFEST:
        return "the manifest lists itself"
    try:
        inside = (bundle_dir / relative).resolve().is_relative_to(bundle_dir.resolve())
    except (OSError, RuntimeError):  # a name too long for the file system, a symbolic-link loop (RuntimeError)
        return f"path {relative!r} cannot be resolved inside the bundle"
    if not inside:
        return f"path {relative!r} leads outside the bundle through a symbolic link"
    return None


def _io_problem(io: Any) -> str | None:
    """What is wrong with an I/O signature {"inputs": [{name, dtype, shape}], "outputs": [...]}, if anything."""
    if not isinstance(io, dict):
        return "io must be an object with inputs and outputs"
    for side in ("inputs", "outputs"):
        tensors = io.get(side)
        if not isinstance(tensors, list) or not tensors:
            return f"io.{side} must be a non-empty list"
        for tensor in tensors:
            if not (isinstance(tensor, dict) and isinstance(tensor.get("name"), str)
                    and isinstance(tensor.get("dtype"), str) and isinstance(tensor.get("shape"), list)):
                return f"io.{side} entry {tensor!r} needs name, dtype and shape"
            if not all(isinstance(dim, (int, str)) and not isinstance(dim, bool) for dim in tensor["shape"]):
                return f"io.{side} {tensor['name']}: a dimension must be an int or the name of a dynamic axis"
    return None


def _owned_by(path: str, main_files: Iterable[str]) -> bool:
    """A variant owns its main files, everything inside a main folder (`model.mlpackage/...`) and the
    sidecars named after a main file (`model.onnx.data`, `model.onnx_data`)."""
    for main in main_files:
        if path == main or path.startswith(main + "/"):
            return True
        rest = path[len(main):]
        if path.startswith(main) and rest[0] in "._" and "/" not in rest:
            return True
    return False


# -------------------------------------------------------------------------------------------- hashing

def file_sha256(path: Path, progress: ByteProgress | None = None) -> str:
    """Streamed in 1 MiB blocks: a model file never has to fit in memory."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    done = 0
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, size)
    return digest.hexdigest()


def _bundle_files(bundle_dir: Path) -> list[str]:
    """Every file below the bundle folder (inside model.mlpackage/ too) but the manifest, relative, posix."""
    found = []
    for directory, _, names in os.walk(bundle_dir):
        for name in names:
            found.append(Path(directory, name).relative_to(bundle_dir).as_posix())
    return sorted(path for path in found if path != MANIFEST)


def _file_entries(bundle_dir: Path, known: dict[str, dict], progress: ByteProgress | None) -> list[dict]:
    """{path, size, sha256} per file. `known` holds entries of files linked from a bundle verified moments
    ago; hashing them again would only cost time."""
    paths = _bundle_files(bundle_dir)
    sizes = {path: (bundle_dir / path).stat().st_size for path in paths}
    total, done, entries = sum(sizes.values()), 0, []
    for path in paths:
        if path in known and known[path]["size"] == sizes[path]:
            entries.append(known[path])
        else:
            on_bytes = (lambda n, _size, before=done: progress(before + n, total)) if progress else None
            entries.append({"path": path, "size": sizes[path], "sha256": file_sha256(bundle_dir / path, on_bytes)})
        done += sizes[path]
    return entries


def _verify_files(bundle_dir: Path, entries: list[dict], progress: ByteProgress | None) -> None:
    # Sizes first: a missing or truncated file fails in milliseconds rather than after hashing the rest.
    for entry in entries:
        path = bundle_dir / entry["path"]
        if not path.is_file():
            raise UserError(f"{path} listed in the manifest is missing", "re-export with gemma-export export")
        size = path.stat().st_size
        if size != entry["size"]:
            raise UserError(f"{path} has {size} bytes but the manifest says {entry['size']}: it was modified "
                            "after export", "re-export or restore it")
    total, done = sum(entry["size"] for entry in entries), 0
    for entry in entries:
        path = bundle_dir / entry["path"]
        on_bytes = (lambda n, _size, before=done: progress(before + n, total)) if progress else None
        if file_sha256(path, on_bytes) != entry["sha256"]:
            raise UserError(f"{path} was modified after export (sha256 mismatch)", "re-export or restore it")
        done += entry["size"]


# ---------------------------------------------------------------------------------- durable file system

def _sync_tree(folder: Path) -> None:
    """Flush every file and folder so that, after a power cut, a manifest never vouches for data that was
    still only in the page cache."""
    for directory, _, names in os.walk(folder):
        for name in names:
            fsync_path(Path(directory, name))
        fsync_path(Path(directory))


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def _link_or_copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:  # file systems without hard links, or a link-count limit
        shutil.copy2(source, destination)


def _remove_bundle_folder(folder: Path) -> None:
    """The manifest goes first: a removal cut short must not leave a folder whose manifest vouches for it."""
    if folder.is_dir():
        (folder / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Swap the staged folder into place. On any failure the previous bundle is back at `target`; a hard
    crash between the two renames leaves it in `.old-<pid>-…`, which the next writer puts back."""
    previous = None
    with signals_deferred():
        raise_if_interrupted()  # one that a library swallowed during the export: publish nothing
        if target.exists():
            previous = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(target, previous)
        try:
            os.rename(staging, target)
        except BaseException:
            if previous is not None:
                os.rename(previous, target)
            raise
        fsync_path(target.parent)
        if previous is not None:
            _remove_bundle_folder(previous)


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is just not ours
        return True
    return True


def _clean_stale_folders(model_dir: Path, fmt: str) -> None:
    """Remove the staging and set-aside folders that dead exports of this format left behind. When a crash
    came between the two renames of _publish, the set-aside folder is the last good bundle: put it back."""
    stale = re.compile(rf"\.{re.escape(fmt)}\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+")
    target = model_dir / fmt
    for folder in sorted(model_dir.iterdir()):
        match = stale.fullmatch(folder.name)
        if not match or _process_is_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not target.exists() and (folder / MANIFEST).is_file():
            log.warning("restoring %s from %s, left aside by an export that crashed", target, folder.name)
            os.rename(folder, target)
        else:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- errors

# A write can fail on a full disk without saying so: numpy's `tofile` (ONNX external data) raises
# OSError("problem writing element …") with no errno. With less than this free on the device, that is the cause.
NEARLY_FULL_BYTES = 64 * 2**20


def _free_bytes(path: Path) -> int:
    """Free bytes on the device holding `path` (or its nearest existing parent)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def _disk_error(error: OSError, where: Path, free_bytes: int | None = None) -> UserError | None:
    """The user-fixable file-system failures (full, read-only, no permission) as a UserError; `free_bytes`: the
    device's free space measured before the failed write's files were cleaned up (an error with no errno)."""
    nearly_full = error.errno is None and free_bytes is not None and free_bytes < NEARLY_FULL_BYTES
    if error.errno in (errno.ENOSPC, errno.EDQUOT) or nearly_full:
        return UserError(f"no space left on the device while writing {where}",
                         "free some disk space or use another --out")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write to {where} ({error.strerror or 'read-only'})",
                         "make it writable or use another --out")
    return None


def _blocking_file(path: Path) -> Path | None:
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


# ------------------------------------------------------------------------------------------------ lock

def _acquire_lock(lock_path: Path, target: Path, wait: bool, timeout_s: float) -> int:
    """An exclusive flock, held until the writer closes; the holder's pid is written inside for messages.
    The lock file is never deleted: unlinking it would let two writers lock two different files."""
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or time.monotonic() >= deadline:
                    holder = _lock_holder(descriptor)
                    waited = f" (waited {timeout_s:g} s)" if wait else ""
                    raise UserError(f"another export into {target} is running (pid {holder}, lock {lock_path})"
                                    f"{waited}", "wait for it or use another --out") from None
                time.sleep(LOCK_POLL_SECONDS)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        return descriptor
    except BaseException:
        os.close(descriptor)
        raise


def _lock_holder(descriptor: int, patience_s: float = 1.0) -> str:
    """The pid the holder wrote into the lock file. A holder writes it just after taking the lock, so a
    contender that arrives in between reads an empty file: it looks again for up to `patience_s` (seen in CI:
    two exports started at once, the loser said "pid unknown")."""
    deadline = time.monotonic() + patience_s
    while not (holder := os.pread(descriptor, 32, 0).decode(errors="replace").strip()):
        if time.monotonic() >= deadline:
            return "unknown"
        time.sleep(0.02)
    return holder


def _release_lock(descriptor: int) -> None:
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    os.close(descriptor)


# ----------------------------------------------------------------------------------------------- bundle

@dataclass(frozen=True)
class BundleVariant:
    precision: str
    files: list[Path]  # the file(s) a runtime opens, absolute
    io: dict[str, list[dict[str, Any]]]
    options: dict[str, Any]
    logits_dtype: str
    opset: int | None = None
    deployment_target: str | None = None


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    config: Gemma3Config

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    def variant(self, precision: str) -> BundleVariant:
        variants = self.manifest["variants"]
        if precision not in variants:
            raise UserError(f"{self.path} has no {precision!r} variant",
                            f"use one of: {', '.join(sorted(variants))}, or export {precision!r}")
        entry = variants[precision]
        return BundleVariant(precision, [self.path / name for name in entry["files"]], entry["io"],
                             entry["options"], entry["logits_dtype"], entry.get("opset"),
                             entry.get("deployment_target"))


def library_versions(packages: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed versions of `packages` (the ones that are installed), from package metadata: importing onnx or
    coremltools just to ask costs seconds."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _manifest_problem(bundle_dir: Path, manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    for name, kind in REQUIRED_FIELDS.items():
        if name not in manifest:
            return f"field {name!r} is missing"
        if not isinstance(manifest[name], kind) or isinstance(manifest[name], bool):
            return f"field {name!r} must be a {kind.__name__}"
    if manifest["format"] not in FORMATS:
        return f"format {manifest['format']!r} is not one of {', '.join(FORMATS)}"
    listed = set()
    for entry in manifest["files"]:
        if not (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and SHA256_HEX.fullmatch(entry["sha256"])):
            return f"file entry {entry!r} needs path, size and sha256"
        if reason := _unsafe_path_reason(bundle_dir, entry.get("path")):
            return reason
        listed.add(entry["path"])
    if not all(isinstance(precision, str) for precision in manifest["precisions"]):
        return "precisions must be names"
    if not manifest["variants"] or sorted(manifest["precisions"]) != sorted(manifest["variants"]):
        return "precisions must name the variants, at least one"
    for precision, variant in manifest["variants"].items():
        if not isinstance(variant, dict) or not isinstance(variant.get("files"), list) or not variant["files"]:
            return f"variant {precision!r} needs a list of files"
        for main in variant["files"]:
            if not isinstance(main, str) or not any(path == main or path.startswith(main + "/") for path in listed):
                return f"variant {precision!r} file {main!r} is not among the listed files"
        if problem := _io_problem(variant.get("io")):
            return f"variant {precision!r}: {problem}"
        if not isinstance(variant.get("options"), dict) or not isinstance(variant.get("logits_dtype"), str):
            return f"variant {precision!r} needs options and logits_dtype"
    return None


def _read_manifest(bundle_dir: Path) -> dict[str, Any]:
    manifest_path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise UserError(f"{bundle_dir} does not exist", "run gemma-export export first, or check the path")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{bundle_dir} has no manifest.json: it is not a finished export",
                        "re-run gemma-export export") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"{manifest_path} is not valid JSON ({error})", "re-run gemma-export export") from None
    except OSError as error:  # a folder named manifest.json, no permission to read it
        raise UserError(f"cannot read {manifest_path} ({error.strerror})", "re-run gemma-export export") from None
    if isinstance(manifest, dict) and type(manifest.get("schema_version")) is int \
            and manifest["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{manifest_path} has schema_version {manifest['schema_version']}, this tool reads "
                        f"{SCHEMA_VERSION}", "re-export with this version of gemma-export")
    if problem := _manifest_problem(bundle_dir, manifest):
        raise UserError(f"{manifest_path} is not a valid bundle manifest: {problem}", "re-run gemma-export export")
    return manifest


def load_bundle(path_or_root: str | os.PathLike, slug: str | None = None, fmt: str | None = None,
                verify: bool = True, progress: ByteProgress | None = None) -> Bundle:
    """The bundle at `path_or_root`, or at `path_or_root/<slug>/<fmt>` when both are given; with `verify`
    every file's size and sha256 is checked against the manifest."""
    bundle_dir = Path(path_or_root)
    if slug is not None or fmt is not None:
        if slug is None or fmt is None:
            raise TypeError("load_bundle takes both slug and fmt, or neither")
        _check_slug_and_format(slug, fmt)
        bundle_dir = bundle_dir / slug / fmt
    manifest = _read_manifest(bundle_dir)
    if verify:
        _verify_files(bundle_dir, manifest["files"], progress)
    return Bundle(bundle_dir, manifest, Gemma3Config.from_dict(manifest["config"]))


# ----------------------------------------------------------------------------------------------- writer

def _write_tokenizer(tokenizer: Any, destination: Path) -> None:
    """`tokenizer` is a tokenizer.json path or an object with `.save(path)` (a `tokenizers.Tokenizer`)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        if not Path(tokenizer).is_file():
            raise UserError(f"tokenizer file {tokenizer} does not exist", "point at the model's tokenizer.json")
        shutil.copyfile(tokenizer, destination)
    else:
        tokenizer.save(str(destination))


class BundleWriter:
    """Stages a bundle in `<root>/<slug>/.<format>.tmp-<pid>-<random>` (same file system as the target,
    so publishing is a rename) under an exclusive lock on `<root>/<slug>/.<format>.lock`.

    Exporters write under `path`, call `add_variant` per precision and `finish` once. Leaving the block
    without finishing (an exception, KeyboardInterrupt, SystemExit) deletes the staging folder and leaves
    the previous bundle as it was. `keep_existing_variants` carries the previous bundle's other precisions
    over (hard-linked), if it verifies. `wait` waits up to `wait_timeout_s` for another export's lock
    instead of failing at once.
    """

    def __init__(self, artifacts_root: str | os.PathLike, slug: str, fmt: str, *,
                 keep_existing_variants: bool = False, wait: bool = False, wait_timeout_s: float = 600.0) -> None:
        _check_slug_and_format(slug, fmt)
        self.slug, self.format = slug, fmt
        self.model_dir = Path(artifacts_root) / slug
        self.target = self.model_dir / fmt
        self.path = self.model_dir / f".{fmt}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.keep_existing_variants = keep_existing_variants
        self.wait, self.wait_timeout_s = wait, wait_timeout_s
        self._variants: dict[str, dict[str, Any]] = {}
        self._lock: int | None = None
        self._finished = False

    def __enter__(self) -> "BundleWriter":
        try:
            self.model_dir.mkdir(parents=True, exist_ok=True)
            self._lock = _acquire_lock(self.model_dir / f".{self.format}.lock", self.target,
                                       self.wait, self.wait_timeout_s)
            _clean_stale_folders(self.model_dir, self.format)
            if self.target.exists() and not self.target.is_dir():
                raise FileExistsError(errno.EEXIST, "not a folder", str(self.target))
            self.path.mkdir()
        except BaseException as error:
            self._close()
            if isinstance(error, (FileExistsError, NotADirectoryError)) and (blocker := _blocking_file(self.target)):
                raise UserError(f"{blocker} is a file where a folder should be",
                                "move it away or use another --out") from None
            if isinstance(error, OSError) and (converted := _disk_error(error, self.model_dir)):
                raise converted from error
            raise
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, traceback: Any) -> None:
        # Measured before the clean-up gives the half-written files' space back.
        free = _free_bytes(self.path) if isinstance(exc, OSError) and exc.errno is None else None
        self._close()
        if isinstance(exc, OSError) and (converted := _disk_error(exc, self.target, free)):
            raise converted from exc
        if exc is None and not self._finished:
            raise RuntimeError("BundleWriter closed without finish(): nothing was published")

    def _close(self) -> None:
        with signals_deferred():  # a second Ctrl-C waits for the cleanup instead of cutting it short
            try:
                _remove_bundle_folder(self.path)
            finally:
                if self._lock is not None:
                    _release_lock(self._lock)
                    self._lock = None

    def add_variant(self, precision: str, files: list[str], io: dict[str, list[dict[str, Any]]],
                    options: dict[str, Any] | None = None, opset: int | None = None,
                    deployment_target: str | None = None, logits_dtype: str = "float32") -> None:
        """Record one precision whose main file(s) are already written under `path`. The parameters match
        `exporters.signature.ExportedVariant`, so `add_variant(**dataclasses.asdict(exported))` works."""
        if not files:
            raise ValueError(f"variant {precision!r} needs at least one file")
        for name in files:
            if (reason := _unsafe_path_reason(self.path, name)) or not (self.path / name).exists():
                raise ValueError(f"variant {precision!r}: {reason or f'{name} was not written into {self.path}'}")
        if problem := _io_problem(io):
            raise ValueError(f"variant {precision!r}: {problem}")
        entry: dict[str, Any] = {"files": list(files), "io": io, "options": dict(options or {}),
                                 "logits_dtype": logits_dtype}
        if opset is not None:
            entry["opset"] = opset
        if deployment_target is not None:
            entry["deployment_target"] = deployment_target
        self._variants[precision] = entry

    def finish(self, config: Gemma3Config, tokenizer: Any, source: dict[str, Any],
               options: dict[str, Any] | None = None, progress: ByteProgress | None = None,
               extra_files: Callable[[Path, dict[str, dict[str, Any]]], None] | None = None) -> Bundle:
        """Write config.json and tokenizer.json, hash everything, write the manifest last and publish.
        `source` holds model_id and weight_sha256; the slug is added. `extra_files(folder, variants)` writes a
        format's own files (the ONNX bundle's repository files) once every variant, carried ones too, is in
        place: the manifest covers them like the rest."""
        if self._lock is None or self._finished:
            raise RuntimeError("finish() must be called once, inside `with BundleWriter(...)`")
        carried, carried_entries = self._carry_previous_variants() if self.keep_existing_variants else ({}, {})
        variants = {**carried, **self._variants}
        if not variants:
            raise ValueError("finish() needs at least one add_variant()")
        (self.path / CONFIG).write_text(json.dumps(config.to_hf_config(), indent=2) + "\n", encoding="utf-8")
        _write_tokenizer(tokenizer, self.path / TOKENIZER)
        if extra_files is not None:
            extra_files(self.path, variants)
        _sync_tree(self.path)
        manifest = {
            "schema_version": SCHEMA_VERSION, "format": self.format, "precisions": sorted(variants),
            "variants": variants, "files": _file_entries(self.path, carried_entries, progress),
            "versions": library_versions(), "options": dict(options or {}),
            "source": {**source, "slug": self.slug}, "config": config.to_dict(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _write_json_atomic(self.path / MANIFEST, manifest)
        _publish(self.path, self.target)
        self._finished = True
        return Bundle(self.target, manifest, config)

    def _carry_previous_variants(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """Link the previous bundle's variants that this export did not redo into the staging folder, with
        their manifest entries. Only a bundle that verifies is carried: its files cannot be trusted otherwise."""
        if not (self.target / MANIFEST).is_file():
            return {}, {}
        try:
            previous = load_bundle(self.target)
        except UserError as error:
            log.warning("not keeping the other variants of %s: %s", self.target, error)
            return {}, {}
        entries = {entry["path"]: entry for entry in previous.manifest["files"]}
        variants, carried_entries = {}, {}
        for precision, variant in previous.manifest["variants"].items():
            if precision in self._variants:
                continue
            owned = [path for path in entries if _owned_by(path, variant["files"])]
            if any((self.path / path).exists() for path in owned):
                log.warning("not keeping variant %s of %s: this export wrote over its files", precision, self.target)
                continue
            for path in owned:
                _link_or_copy(self.target / path, self.path / path)
                carried_entries[path] = entries[path]
            variants[precision] = variant
        return variants, carried_entries
