"""Starting and stopping the real services as subprocesses (benchmarks, crash tests, tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

_LISTENING = re.compile(r" on [\d.]+:(\d+) \(")
# The ranking service, and the benchmark's wrapper of it (`bench.fixed_answer`): they take
# --workers (default 2), so `start_process` always says how many.
RANKING_MODULES = ("ranking_service", "bench.fixed_answer")


def start_process(module: str, data_dir: Path, *args: str, port: int = 0,
                  workers: int = 1) -> tuple[subprocess.Popen[str], int]:
    """Start `python -m <module>` from this checkout on `port` (0: a free one); return once
    it listens."""
    command = [sys.executable, "-m", module, "--data-dir", str(data_dir), "--port", str(port),
               *(["--workers", str(workers)] if module in RANKING_MODULES else []), *args]
    return start_command(command, {**os.environ, "PYTHONPATH": os.getcwd()}, workers)


def start_command(command: list[str], env: dict[str, str],
                  workers: int = 1) -> tuple[subprocess.Popen[str], int]:
    """Start a server command; return it and its port once it listens.

    "Listens" is read off the log: each server process says "... on HOST:PORT (...", and
    with `workers` processes behind one port all of them must have said it.
    """
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env)
    assert proc.stderr is not None
    seen, listening = [], 0
    for line in proc.stderr:
        seen.append(line)
        found = _LISTENING.search(line)
        listening += found is not None
        if found and listening == workers:
            # Keep draining the log so the server never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(found.group(1))
    proc.wait(10)
    raise RuntimeError(f"{command[0]} did not start: {''.join(seen)[-2000:]}")


def stop(procs: Iterable[subprocess.Popen[str]], sig: int = signal.SIGTERM,
         timeout: float = 60) -> list[int]:
    """Signal every live process (SIGTERM: drain and exit), wait, kill what hangs; exit codes."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes
