"""The benchmark's CPU accounting (`bench.load.cpu_seconds`), which its reading of what
bounds a throughput figure rests on."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.load import cpu_seconds


def _burn(seconds: float) -> None:
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


def test_a_process_cpu_is_counted() -> None:
    before = cpu_seconds(os.getpid(), descendants=False)
    _burn(0.3)
    used = cpu_seconds(os.getpid(), descendants=False) - before
    assert 0.2 <= used <= 0.6


def test_descendants_are_counted_and_only_with_descendants() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\nuntil = time.process_time() + "
                              "0.4\nwhile time.process_time() < until: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 30
        while cpu_seconds(child.pid, descendants=False) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)  # until its burn is over (then it sleeps, alive)
        assert cpu_seconds(child.pid, descendants=False) >= 0.3
        assert cpu_seconds(os.getpid()) - cpu_seconds(os.getpid(), descendants=False) >= 0.3
    finally:
        child.kill()
        child.wait()
