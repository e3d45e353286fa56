"""Interrupted and concurrent exports, as a user causes them: `gemma-export` in a subprocess, stopped by SIGINT
(Ctrl-C) or SIGTERM (`kill`, a CI timeout) in the middle of its work, or started twice into one folder.

"In the middle" is observed, not guessed with a sleep: an export is interrupted once its staging folder
(`<out>/<slug>/.<format>.tmp-<pid>-<hex>`, see BundleWriter) exists, i.e. it holds the lock and is writing.
Each case then checks what a user relies on: the exit code, one `error:` line, the previous bundle verifying
with the very same manifest, nothing left behind, and the next run working without clean-up.

The randomized test does sleep, on purpose: it races the signal against every moment of an export (timed from
the CLI's handlers going in, which /proc shows), because how the process ends must not depend on the moment.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from exporters.artifact import MANIFEST, BundleWriter, load_bundle
from exporters.signature import decoder_io
from gemma_export.errors import run_cli
from model.config import PRESETS
from model import interrupts
from model.interrupts import Terminated, signals_deferred, signals_recorded

REPO = Path(__file__).resolve().parents[1]
SLUG = "random-tiny"
EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USER_ERROR = 130, 143, 2
SIGNAL_EXIT = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}
SIGNAL_MESSAGE = {signal.SIGINT: "error: interrupted", signal.SIGTERM: "error: terminated (SIGTERM)"}
PROCESS_TIMEOUT_S = 900  # a tiny export takes ~10 s on a quiet machine, minutes on 2 busy cores
# Signals per format of the randomized test: a few in `make test`, many in `make stress`.
SIGNALS_PER_FORMAT = int(os.environ.get("INTERRUPT_STRESS_DELAYS", "6"))
LOCK_ERROR = re.compile(r"error: another export into (?P<target>\S+) is running \(pid (?P<pid>\d+), "
                        r"lock (?P<lock>\S+\.lock)\); wait for it or use another --out")


class Cli:
    """One `python -m gemma_export ...` process, its output in files (a full pipe would block it)."""

    def __init__(self, log_dir: Path, name: str, *args: str) -> None:
        self.stdout_path, self.stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            # SIGINT back to its default first: a test run from a background job inherits SIGINT ignored,
            # and Python installs its KeyboardInterrupt handler only where SIGINT is not ignored.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gemma_export", *args], cwd=REPO, stdout=stdout, stderr=stderr,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=PROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr_path.read_text().splitlines() if line.startswith("error:")]

    def kill(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait()


def export(log_dir: Path, name: str, fmt: str, out: Path, *extra: str) -> Cli:
    return Cli(log_dir, name, "export", "--format", fmt, "--model", "random:tiny", "--out", str(out), *extra)


def staging_folders(out: Path, fmt: str, pid: int | None = None) -> list[Path]:
    model_dir = out / SLUG
    prefix = f".{fmt}.tmp-{pid}-" if pid is not None else f".{fmt}.tmp-"
    return sorted(model_dir.glob(prefix + "*")) if model_dir.is_dir() else []


def wait_until(condition, cli: Cli, what: str) -> None:
    """Poll every 20 ms; fail with the process's stderr if it ends before `condition` holds."""
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not condition():
        if not cli.running():
            pytest.fail(f"the process ended (exit {cli.process.returncode}) before {what}:\n"
                        f"{cli.stderr_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            cli.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_for_staging(cli: Cli, out: Path, fmt: str, with_a_file: bool = False) -> Path:
    """The export's own staging folder, once it exists (and, with `with_a_file`, once a file was written
    into it: the interruption then has a half-written bundle to clean up)."""
    def staged() -> bool:
        found = staging_folders(out, fmt, cli.pid)
        return bool(found) and (not with_a_file or any(found[0].iterdir()))
    wait_until(staged, cli, f"its {fmt} staging folder appeared")
    return staging_folders(out, fmt, cli.pid)[0]


def caught_signals(pid: int) -> set[int]:
    """The signals a process has handlers for: SigCgt of /proc/<pid>/status, bit n-1 for signal n (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {number for number in range(1, mask.bit_length() + 1) if mask >> (number - 1) & 1}
    raise AssertionError(f"no SigCgt line for pid {pid}")


def wait_for_handlers(cli: Cli) -> float:
    """When the CLI's own handlers are in (SIGTERM caught: Python's start-up catches only SIGINT), as
    time.monotonic(). A signal before then meets Python's defaults, which the CLI cannot change."""
    wait_until(lambda: signal.SIGTERM in caught_signals(cli.pid), cli, "it installed its signal handlers")
    return time.monotonic()


def leftovers(out: Path) -> list[str]:
    """Hidden entries of the model folder other than the lock files, which are permanent by design."""
    return sorted(p.name for p in (out / SLUG).iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def manifests_in_leftovers(out: Path) -> list[str]:
    return [name for name in leftovers(out) if (out / SLUG / name / MANIFEST).exists()]


def assert_bundle_is_whole(bundle_dir: Path) -> dict:
    """It verifies (every listed file's size and sha256), and holds no file the manifest does not list: all of
    it comes from one export."""
    bundle = load_bundle(bundle_dir)
    on_disk = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()}
    assert on_disk - {MANIFEST} == {entry["path"] for entry in bundle.manifest["files"]}
    return bundle.manifest


def read_manifest(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / MANIFEST).read_text())


def assert_interrupted_cleanly(cli: Cli, sent: signal.Signals, out: Path, fmt: str, previous: dict) -> None:
    assert cli.wait() == SIGNAL_EXIT[sent], cli.stderr_path.read_text()[-3000:]
    assert cli.error_lines() == [SIGNAL_MESSAGE[sent]]
    assert assert_bundle_is_whole(out / SLUG / fmt) == previous
    assert manifests_in_leftovers(out) == []
    assert leftovers(out) == []  # stronger: the staging folder is gone, not just manifest-less


# ------------------------------------------------------------------------------------------ good bundles

@dataclass
class GoodBundle:
    root: Path  # an artifacts root holding one finished export
    export_seconds: float  # from the CLI's signal handlers going in to its exit


@pytest.fixture(scope="module")
def good_bundles(tmp_path_factory) -> dict[str, GoodBundle]:
    """One finished export per format, made once and timed; tests work on copies."""
    bundles = {}
    for fmt in ("torchscript", "onnx", "coreml"):
        root = tmp_path_factory.mktemp(f"good-{fmt}")
        cli = export(root, "export", fmt, root / "artifacts")
        handlers_in_at = wait_for_handlers(cli)
        assert cli.wait() == 0, cli.stderr_path.read_text()[-3000:]
        bundles[fmt] = GoodBundle(root / "artifacts", time.monotonic() - handlers_in_at)
    return bundles


def copy_of(good: Path, tmp_path: Path) -> Path:
    out = tmp_path / "artifacts"
    shutil.copytree(good, out)
    return out


# ---------------------------------------------------------------------------------------------- exports

@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "coreml"])
@pytest.mark.slow
def test_interrupted_export_keeps_the_previous_bundle_and_the_next_run_works(fmt, good_bundles, tmp_path):
    out = copy_of(good_bundles[fmt].root, tmp_path)
    previous = read_manifest(out / SLUG / fmt)
    # TorchScript writes model.pt seconds before it is done (model.pt2 follows), so its SIGINT case waits for a
    # half-written bundle; ONNX and Core ML write their files only at the very end of a conversion.
    for sent, with_a_file in ((signal.SIGINT, fmt == "torchscript"), (signal.SIGTERM, False)):
        cli = export(tmp_path, f"interrupted-{sent.name}", fmt, out)
        try:
            staging = wait_for_staging(cli, out, fmt, with_a_file)
            cli.process.send_signal(sent)
            assert_interrupted_cleanly(cli, sent, out, fmt, previous)
            assert not staging.exists()
        finally:
            cli.kill()
    rerun = export(tmp_path, "rerun", fmt, out)
    assert rerun.wait() == 0, rerun.stderr_path.read_text()[-3000:]
    manifest = assert_bundle_is_whole(out / SLUG / fmt)
    assert manifest["precisions"] == previous["precisions"]
    assert leftovers(out) == []


def spread_fractions(count: int, rng: random.Random) -> list[float]:
    """`count` moments as fractions of an export's duration, one at a random point of each equal slice of its
    first 90% (a signal in the last tenth too often comes after the end), shuffled so that SIGINT and SIGTERM
    each meet every part of the export."""
    fractions = [0.9 * (index + rng.random()) / count for index in range(count)]
    rng.shuffle(fractions)
    return fractions


def assert_ended_by_exit_code(cli: Cli, sent: signal.Signals | None, out: Path, fmt: str, previous: dict,
                              what: str) -> str:
    """One signalled export's ending, as 'interrupted' (exit 130/143, one error line) or 'finished first'
    (exit 0: the signal came after the command's outcome was decided, or the process was gone): never a
    death by the signal. Either way the bundle is whole and nothing is left behind."""
    code = cli.wait()
    context = f"{what}: exit {code}\n{cli.stderr_path.read_text()[-3000:]}"
    if sent is not None and code == SIGNAL_EXIT[sent]:
        assert cli.error_lines() == [SIGNAL_MESSAGE[sent]], context
        ending = "interrupted"
    else:
        assert code == 0, context
        assert cli.error_lines() == [] and str(out / SLUG / fmt) in cli.stdout(), context
        ending = "finished first"
    manifest = assert_bundle_is_whole(out / SLUG / fmt)
    # The previous bundle, or this run's own when the signal came after its publish.
    assert manifest == previous or manifest["created_at"] > previous["created_at"], context
    assert leftovers(out) == [], context
    return ending


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's handlers from /proc")
@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "coreml"])
@pytest.mark.slow
def test_a_signal_at_any_moment_of_an_export_ends_it_by_its_exit_code(fmt, good_bundles, tmp_path):
    """SIGINT and SIGTERM (alternately) at random moments spread over a whole export, from the CLI's handlers
    going in to its end: imports, weight loading, tracing, conversion, the publish, the clean-up, the exit.
    Whichever thread takes the signal and whenever, the export ends with 130/143 and one line (or 0, when
    the signal came after it had finished), never by the signal."""
    out = copy_of(good_bundles[fmt].root, tmp_path)
    seed = random.randrange(2**32)
    # The span starts as the good export's duration and shrinks to any faster one seen: a shared machine's
    # load changes from one minute to the next, and moments past the end would test nothing.
    span_s = good_bundles[fmt].export_seconds
    endings: collections.Counter[tuple[str, str]] = collections.Counter()
    for index, fraction in enumerate(spread_fractions(SIGNALS_PER_FORMAT, random.Random(seed))):
        sent, delay = (signal.SIGINT, signal.SIGTERM)[index % 2], fraction * span_s
        previous = read_manifest(out / SLUG / fmt)
        cli = export(tmp_path, f"signalled-{index}", fmt, out)
        try:
            handlers_in_at = wait_for_handlers(cli)
            time.sleep(max(0.0, handlers_in_at + delay - time.monotonic()))
            delivered = cli.running()  # send_signal sends nothing to a process already reaped
            cli.process.send_signal(sent)
            what = f"seed {seed}: {sent.name} {delay:.2f} s after the handlers went in"
            ending = assert_ended_by_exit_code(cli, sent if delivered else None, out, fmt, previous, what)
        finally:
            cli.kill()
        if ending == "finished first":
            span_s = min(span_s, time.monotonic() - handlers_in_at)
        endings[sent.name, ending] += 1
    print(f"{fmt}: seed {seed}, {SIGNALS_PER_FORMAT} signals, span {good_bundles[fmt].export_seconds:.1f} s "
          f"-> {span_s:.1f} s: {dict(endings)}")
    # Enough of them landed inside the export for the test to say something.
    interrupted = sum(count for (_, ending), count in endings.items() if ending == "interrupted")
    assert interrupted >= SIGNALS_PER_FORMAT / 2, (seed, dict(endings))


@pytest.mark.slow
def test_two_sigints_10_ms_apart_end_as_one_interruption(good_bundles, tmp_path):
    """A Ctrl-C pressed twice (or a terminal's and a script's at once): the second one comes while the first
    unwinds the export and cleans up. It must neither cut the clean-up short nor end the process by the
    signal: exit 130, one line, the previous bundle whole, nothing left behind."""
    out = copy_of(good_bundles["onnx"].root, tmp_path)
    previous = read_manifest(out / SLUG / "onnx")
    cli = export(tmp_path, "twice", "onnx", out)
    try:
        wait_for_staging(cli, out, "onnx")
        cli.process.send_signal(signal.SIGINT)
        time.sleep(0.01)
        cli.process.send_signal(signal.SIGINT)
        assert_interrupted_cleanly(cli, signal.SIGINT, out, "onnx", previous)
    finally:
        cli.kill()


@pytest.mark.slow
def test_interrupted_all_keeps_the_bundle_and_releases_it(good_bundles, tmp_path):
    """`gemma-export all`: SIGINT while it exports keeps the previous bundle; SIGTERM while it validates (the
    export is published by then) leaves that new bundle whole, and the export lock free."""
    out = copy_of(good_bundles["torchscript"].root, tmp_path)
    previous = read_manifest(out / SLUG / "torchscript")
    args = ("all", "--model", "random:tiny", "--formats", "torchscript", "--out", str(out),
            "--max-new-tokens", "2", "--decode-tokens", "2", "--repeats", "1")
    cli = Cli(tmp_path, "all-sigint", *args)
    try:
        wait_for_staging(cli, out, "torchscript")
        cli.process.send_signal(signal.SIGINT)
        assert_interrupted_cleanly(cli, signal.SIGINT, out, "torchscript", previous)
    finally:
        cli.kill()

    cli = Cli(tmp_path, "all-sigterm", *args)
    try:
        wait_until(lambda: "validate" in cli.stderr_path.read_text(), cli, "validation started")
        cli.process.send_signal(signal.SIGTERM)
        assert cli.wait() == EXIT_TERMINATED, cli.stderr_path.read_text()[-3000:]
        assert cli.error_lines() == [SIGNAL_MESSAGE[signal.SIGTERM]]
    finally:
        cli.kill()
    published = assert_bundle_is_whole(out / SLUG / "torchscript")
    assert published["created_at"] > previous["created_at"]  # this run's export, published before validation
    assert leftovers(out) == []


# ----------------------------------------------------------------------------------- swallowed signals
# coremltools wraps its optional imports in bare `except:` (`import transformers` in coremltools/_deps takes
# seconds) and has more in its torch frontend: a Ctrl-C landing there was eaten and the Core ML export went on
# to publish and exit 0 (seen on a quiet machine, 0.5-1 s into the export). The handlers record the signal and
# the pipeline raises it again; these cases swallow it on purpose, as such a library does, at a known moment.

def swallow(sent: signal.Signals) -> None:
    """What a library's bare `except:` does to a signal that arrives inside it."""
    try:
        os.kill(os.getpid(), sent)
        time.sleep(5)  # the handler runs (and raises) during the sleep
        pytest.fail(f"{sent.name} was not delivered")
    except BaseException as caught:  # noqa: BLE001 — the library's bare except
        assert isinstance(caught, (KeyboardInterrupt, Terminated))


@pytest.fixture(autouse=True)
def no_signal_left_recorded():
    """Every test of this module leaves no recorded signal behind: the later tests of the session export in this
    same process, and each export step would raise it (`raise_if_interrupted`)."""
    yield
    assert interrupts._received is None, f"a recorded {interrupts._received!r} was left for the next tests"


@pytest.fixture
def sigint_handled():
    """These tests send SIGINT to this very process. A launcher without job control (`make test &` in a script)
    starts it with SIGINT ignored, which `signals_recorded` rightly keeps (as Python's own handler does); here
    Python's handler is put in place for the test, so the result does not depend on how pytest was started."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_a_library_swallowed_still_stops_the_publish(tmp_path, sent, sigint_handled):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    with signals_recorded():
        with pytest.raises(KeyboardInterrupt if sent == signal.SIGINT else Terminated):
            with BundleWriter(tmp_path, SLUG, "onnx") as bundle:
                (bundle.path / "model.onnx").write_bytes(b"graph")
                bundle.add_variant("fp32", files=["model.onnx"], io=decoder_io(PRESETS["tiny"]))
                swallow(sent)
                bundle.finish(config=PRESETS["tiny"], tokenizer=tokenizer,
                              source={"model_id": "random:tiny", "weight_sha256": "0" * 64})
    assert sorted(p.name for p in (tmp_path / SLUG).iterdir()) == [".onnx.lock"]  # nothing published or left


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_command_whose_signal_was_swallowed_does_not_exit_0(sent, capsys, sigint_handled):
    group = click.Group("gemma-export", commands=[click.Command("work", callback=lambda: swallow(sent))])
    assert run_cli(group, ["work"]) == SIGNAL_EXIT[sent]
    assert capsys.readouterr().err.strip() == SIGNAL_MESSAGE[sent]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def turn_into_an_error(sent: signal.Signals) -> None:
    """What a library's catch-all that raises an error of its own (an import fallback, say) does to a signal."""
    try:
        os.kill(os.getpid(), sent)
        time.sleep(5)  # the handler runs (and raises) during the sleep
        pytest.fail(f"{sent.name} was not delivered")
    except (KeyboardInterrupt, Terminated) as caught:
        raise RuntimeError("optional dependency failed to import") from caught


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_a_library_turned_into_its_own_error_still_ends_as_the_signal(sent, capsys, sigint_handled):
    group = click.Group("gemma-export", commands=[click.Command("work", callback=lambda: turn_into_an_error(sent))])
    assert run_cli(group, ["work"]) == SIGNAL_EXIT[sent]
    assert capsys.readouterr().err.strip() == SIGNAL_MESSAGE[sent]


def test_a_signal_another_thread_takes_during_a_deferred_block_is_raised_after_it(sigint_handled):
    """A worker thread (as onnxruntime's and torch's are) takes the process-directed SIGINT while the main thread
    is in a deferred block: the block still finishes whole, and the interruption comes right after it."""
    go, taken = threading.Event(), threading.Event()

    def take_the_signal() -> None:
        go.wait()
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # delivered to this thread, not the main one
        taken.set()

    worker = threading.Thread(target=take_the_signal)
    worker.start()  # before the block, like a runtime's pool: a mask set in the block would not reach it
    steps = []
    with signals_recorded():
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                go.set()
                assert taken.wait(5)
                time.sleep(0.2)  # the main thread runs the Python handler here, at its next bytecodes
                steps.append("block finished")
            steps.append("went on after the block")
    worker.join()
    assert steps == ["block finished"]


def test_a_second_signal_does_not_cut_the_cleanup_short(sigint_handled):
    cleanup = []
    with signals_recorded():
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGINT)  # pressed again while the first one unwinds
                time.sleep(0.2)
                cleanup.append("done")
    assert cleanup == ["done"]


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_the_cli_process_ignores_signals_once_its_exit_code_is_decided(sent, capsys, sigint_handled):
    """The entry point's run (`until_exit`): after the command ends, SIGINT and SIGTERM are ignored rather than
    put back to the defaults that kill, which Python would restore at shutdown anyway."""
    group = click.Group("gemma-export", commands=[click.Command("work", callback=lambda: swallow(sent))])
    try:
        assert run_cli(group, ["work"], until_exit=True) == SIGNAL_EXIT[sent]
        assert {signal.getsignal(handled) for handled in (signal.SIGINT, signal.SIGTERM)} == {signal.SIG_IGN}
        os.kill(os.getpid(), signal.SIGINT)  # a late Ctrl-C: nothing happens
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # A CLI process exits here, keeping its recorded signal; this test process goes on to run exports,
        # whose every step would raise that signal again (`raise_if_interrupted`).
        interrupts._received, interrupts._holding = None, 0
    assert capsys.readouterr().err.strip() == SIGNAL_MESSAGE[sent]


# A CLI whose command's Ctrl-C is taken inside an exec() of a string, as one inside the ONNX exporter's is.
EXEC_INTERRUPTED_CLI = """
import os, signal, time
import click
from gemma_export.errors import entry_point

@click.group()
def cli():
    pass

@cli.command()
def work():
    exec("os.kill(os.getpid(), signal.SIGINT); time.sleep(5)")

entry_point(cli)()
"""


def test_a_ctrl_c_that_left_an_exec_ends_with_exit_130_not_by_the_signal(tmp_path):
    """`python -m`, as the tests and many users run the CLI: CPython remembers a KeyboardInterrupt that left an
    exec() as unhandled and, unless the CLI clears that, kills itself with SIGINT at exit (wait status -2)."""
    (tmp_path / "exec_interrupted.py").write_text(EXEC_INTERRUPTED_CLI)
    result = subprocess.run([sys.executable, "-m", "exec_interrupted", "work"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=PROCESS_TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == EXIT_INTERRUPTED, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == ["error: interrupted"]


# ------------------------------------------------------------------------------------------- concurrency

@pytest.mark.slow
def test_second_export_fails_naming_the_lock_or_waits_with_wait(tmp_path):
    """Deterministic: the first export is paused (SIGSTOP) while it holds the lock, mid-export. A second one
    fails at once with one `error:` line naming the holder and the lock; a third with --wait finishes after
    the first one resumes. The published bundle is whole."""
    out = tmp_path / "artifacts"
    first = export(tmp_path, "first", "torchscript", out)
    second = third = None
    try:
        wait_for_staging(first, out, "torchscript")
        first.process.send_signal(signal.SIGSTOP)
        second = export(tmp_path, "second", "torchscript", out)
        assert second.wait() == EXIT_USER_ERROR
        [line] = second.error_lines()
        match = LOCK_ERROR.fullmatch(line)
        assert match, line
        assert int(match["pid"]) == first.pid
        assert Path(match["lock"]) == out / SLUG / ".torchscript.lock"
        assert staging_folders(out, "torchscript") == staging_folders(out, "torchscript", first.pid)
        third = export(tmp_path, "third", "torchscript", out, "--wait")
        # Its progress line is drawn just before it asks for the lock, which the paused first export holds.
        wait_until(lambda: "export torchscript" in third.stderr_path.read_text(), third, "it reached the lock")
        assert staging_folders(out, "torchscript", third.pid) == []
        first.process.send_signal(signal.SIGCONT)
        assert first.wait() == 0, first.stderr_path.read_text()[-3000:]
        assert third.wait() == 0, third.stderr_path.read_text()[-3000:]
    finally:
        first.process.send_signal(signal.SIGCONT)
        for cli in (first, second, third):
            if cli is not None:
                cli.kill()
    assert_bundle_is_whole(out / SLUG / "torchscript")
    assert leftovers(out) == []


@pytest.mark.slow
def test_two_exports_started_at_once_publish_one_whole_bundle(tmp_path):
    """Both start together. Usually one takes the lock and the other fails naming it; if the machine lets one
    finish before the other reaches the lock, both succeed in turn. Either way the bundle is one export's."""
    out = tmp_path / "artifacts"
    racers = [export(tmp_path, f"racer-{i}", "onnx", out) for i in range(2)]
    try:
        codes = [racer.wait() for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
    assert sorted(codes) in ([0, 0], [0, EXIT_USER_ERROR]), codes
    for racer, code in zip(racers, codes):
        if code == EXIT_USER_ERROR:
            [line] = racer.error_lines()
            match = LOCK_ERROR.fullmatch(line)
            assert match and int(match["pid"]) == next(r.pid for r in racers if r is not racer), line
    manifest = assert_bundle_is_whole(out / SLUG / "onnx")
    winners = [racer for racer, code in zip(racers, codes) if code == 0]
    assert str(out / SLUG / "onnx") in winners[-1].stdout()
    assert manifest["precisions"] == ["fp32"]
    assert leftovers(out) == []


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's handlers from /proc")
@pytest.mark.slow
def test_an_executorch_export_interrupted_while_lowering_ends_by_its_exit_code(tmp_path):
    """The lowering to XNNPACK is one long step (minutes on the real model, with no step boundary inside): a
    Ctrl-C in it ends the export with 130 and one line at once, with no bundle and nothing left behind."""
    out = tmp_path / "artifacts"
    cli = export(tmp_path, "executorch", "executorch", out)
    try:
        wait_for_staging(cli, out, "executorch")
        wait_until(lambda: "lower to XNNPACK" in cli.stderr_path.read_text(), cli, "it started lowering")
        time.sleep(5)  # well inside the tiny model's lowering (~90 s)
        sent_at = time.monotonic()
        cli.process.send_signal(signal.SIGINT)
        assert cli.wait() == SIGNAL_EXIT[signal.SIGINT], cli.stderr_path.read_text()[-3000:]
        assert time.monotonic() - sent_at < 30
        assert cli.error_lines() == [SIGNAL_MESSAGE[signal.SIGINT]]
        assert leftovers(out) == [] and not (out / SLUG / "executorch").exists()
    finally:
        cli.kill()
