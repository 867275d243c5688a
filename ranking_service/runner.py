"""Running the ranking service: one process, or N sharing a port; until SIGTERM/SIGINT.

With --workers N > 1, N processes share the port (SO_REUSEPORT), each with its own LMDB
reader and memory-mapped index, so Python overhead does not serialise requests. In log
mode (--log-urls) this process also keeps the host's read replica (`replica`), and every
server is a child process. Workers
are started with `spawn`, before any gRPC object exists in them (and from this module,
not `__main__`, so the spawned children can import their entry point).
"""

from __future__ import annotations

import logging
import multiprocessing
import sys

from index import snapshots_dir, users_dir
from index.kernels import warm_up
from index.store import UserStore
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
    if not settings.log_urls:
        return serve(settings) if settings.workers == 1 else supervise(settings)
    # Log mode: this process follows the changelog into the host's store (its only
    # writer), and the servers, each a child process, read it.
    from ranking_service.replica import Replica

    configure_logging()
    store = UserStore(users_dir(settings.data_dir))
    replica = Replica(settings.log, store, snapshots_dir(settings.data_dir),
                      max_id_length=settings.max_id_length)
    replica.start()
    try:
        return supervise(settings)
    finally:
        replica.stop(10)
        store.close()


def supervise(settings: Settings) -> int:
    """Run `settings.workers` server processes until SIGTERM/SIGINT or one dies."""
    configure_logging()
    warm_up()  # compile the kernels once, into their disk cache, before N workers load them
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
