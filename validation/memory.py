"""This process's memory as the kernel counts it: resident now (VmRSS) and its high-water mark (VmHWM).

One reader for the bench children, which report their peak, and for the resource-limit tests, which also reset
the peak between phases (writing 5 to /proc/self/clear_refs) to measure one phase at a time.
"""

from __future__ import annotations

import platform
import resource
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def status_bytes() -> dict[str, int]:
    """{"VmRSS": bytes, "VmHWM": bytes} from /proc/self/status; empty where there is no /proc (macOS)."""
    found: dict[str, int] = {}
    try:
        lines = STATUS.read_text(encoding="utf-8").splitlines()
    except OSError:
        return found
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) * 1024
    return found


def peak_rss_bytes() -> int:
    """This process's peak resident set. On Linux VmHWM: getrusage's ru_maxrss keeps the high-water mark of the
    image before exec, so a bench child would report at least its parent's RSS."""
    if "VmHWM" in (status := status_bytes()):
        return status["VmHWM"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def reset_peak_rss() -> None:
    """Start a new high-water mark at the current resident set (Linux only)."""
    CLEAR_REFS.write_text("5")
