"""`python -m event_service --data-dir D --port P`: serve until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import logging
import sys

from event_service.config import Settings
from event_service.server import create_server, open_deps
from index.snapshot import SnapshotError
from rpc.server import configure_logging, wait_for_signal

log = logging.getLogger("freshrec.events")


def main(argv: list[str] | None = None) -> int:
    """Run the event service in the foreground; exit 0 after a clean shutdown."""
    configure_logging()
    settings = Settings.from_args(argv)
    try:
        deps = open_deps(settings)
    except SnapshotError as exc:
        log.error("cannot start: %s", exc)
        return 2
    server, port = create_server(settings, deps)
    if settings.metrics_port:
        deps.metrics.serve(settings.metrics_port, settings.host)
    log.info("event service on %s:%d (%s; model %s)", settings.host, port, server.mode,
             deps.catalog.model_version)
    wait_for_signal()
    log.info("shutting down: draining the writer")
    server.stop(settings.grace_s)
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
