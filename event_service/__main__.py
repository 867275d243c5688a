"""`python -m event_service --data-dir D --port P`: serve until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import logging
import sys

from event_service.config import Settings
from event_service.server import create_server, open_deps
from rpc.server import run


def main(argv: list[str] | None = None) -> int:
    """Run the event service in the foreground; exit 0 after a clean shutdown."""
    return run("event service", logging.getLogger("freshrec.events"), Settings.from_args(argv),
               open_deps, create_server)


if __name__ == "__main__":
    sys.exit(main())
