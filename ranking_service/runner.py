"""Running the ranking service: one process, or N sharing a port; until SIGTERM/SIGINT.

With --workers N > 1, N processes share the port (SO_REUSEPORT), each with its own LMDB
reader and memory-mapped index, so Python overhead does not serialise requests. Workers
are started with `spawn`, before any gRPC object exists in them (and from this module,
not `__main__`, so the spawned children can import their entry point).
"""

from __future__ import annotations

import logging
import multiprocessing
import sys

from ranking_service.config import Settings
from ranking_service.server import create_server, open_deps
from rpc.server import configure_logging, run, stop_requested

log = logging.getLogger("freshrec.ranking")


def serve(settings: Settings, worker: int = 0) -> int:
    """Run one server process in the foreground; exit 0 after a clean shutdown."""
    return run("ranking service", log, settings, open_deps, create_server, worker)


def _worker(settings: Settings, worker: int) -> None:
    sys.exit(serve(settings, worker))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m ranking_service` and the `freshrec-ranking` script."""
    settings = Settings.from_args(argv)
    if settings.workers == 1:
        return serve(settings)
    configure_logging()
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, args=(settings, i),
                             name=f"ranking-{i}") for i in range(settings.workers)]
    for proc in procs:
        proc.start()
    stop = stop_requested()
    while not stop.wait(0.5):
        if any(p.exitcode not in (None, 0) for p in procs):
            log.error("a worker died; stopping the others")
            break
    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: each drains its calls
    for proc in procs:
        proc.join()
    return max(p.exitcode or 0 for p in procs)
