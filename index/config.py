"""Reading service settings: command-line flags, with FRESHREC_* environment defaults.

The only place that reads os.environ; each service's config.py builds its frozen
settings from this once, at start-up.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from dataclasses import MISSING, fields
from typing import Any


def add_fields(parser: argparse.ArgumentParser, settings_cls: Any,
               skip: Iterable[str] = ()) -> None:
    """One `--flag-name` per dataclass field; its default comes from FRESHREC_FLAG_NAME."""
    for f in fields(settings_cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        kind = type(default) if default is not None else str
        env = os.environ.get(f"FRESHREC_{f.name.upper()}")
        if env is not None:
            default = kind(env)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default,
                            required=default is None, help=f.metadata.get("help"))
