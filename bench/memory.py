"""Run a command and sample its memory from /proc while it runs (Linux only)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class RunStats:
    seconds: float
    peak_rss_anon: int  # bytes: heap and other anonymous memory, what can exhaust a machine
    peak_rss: int  # bytes: VmHWM, including file-backed (reclaimable) mapped pages
    returncode: int
    output: str


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_sampled(cmd: Sequence[str], interval: float = 0.01, env: dict | None = None) -> RunStats:
    """Run cmd to completion, sampling RssAnon every `interval` seconds and VmHWM at the end."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak_anon = 0
    peak_hwm = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_anon, peak_hwm
        while not stop.is_set():
            peak_anon = max(peak_anon, _status_kib(proc.pid, "RssAnon"))
            peak_hwm = max(peak_hwm, _status_kib(proc.pid, "VmHWM"))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    return RunStats(elapsed, peak_anon * 1024, peak_hwm * 1024, proc.returncode, output)
