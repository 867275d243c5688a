"""Settings every freshrec server has (where it listens, limits, security), and flag parsing.

Settings are command-line flags with FRESHREC_* environment defaults; this is the only
place that reads os.environ, once, at start-up.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from eventlog.config import LogConfig
from index.events import Limits

MiB = 1 << 20
S = TypeVar("S", bound="ServerSettings")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Listening, limits and transport security; each service adds its own fields."""

    data_dir: Path = field(metadata={"help": "data dir with snapshots/ and users.lmdb/"})
    host: str = "127.0.0.1"
    port: int = field(default=0, metadata={"help": "gRPC port (0 = pick a free one)"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus HTTP port (0 = off)"})
    max_workers: int = 32  # the sync server's pool (the ranking service runs on asyncio)
    max_concurrent_rpcs: int = 256
    max_message_bytes: int = 4 * MiB
    max_id_length: int = Limits.max_id_length
    grace_s: float = 10.0
    tls_cert: str = field(default="", metadata={"help": "PEM certificate chain (enables TLS)"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(default="", metadata={
        "help": "PEM CA bundle: require client certificates signed by it (mutual TLS)"})
    tokens_file: str = field(default="", metadata={
        "help": "file of '<role> <token>' lines (roles: viewer, ingest, admin); enables auth"})
    reflection: bool = field(default=True, metadata={"help": "serve gRPC reflection"})
    # The log mode (eventlog): off unless --log-urls is given.
    log_urls: str = field(default="", metadata={
        "help": "NATS URLs (comma-separated) of the event log; empty = the embedded mode"})
    log_partitions: int = LogConfig.partitions
    log_replicas: int = LogConfig.replicas
    log_duplicate_window_s: float = LogConfig.duplicate_window_s
    log_retention_s: float = field(default=LogConfig.retention_s, metadata={
        "help": "events and the shards' changelog are kept this long (snapshots cover "
                "what ages out)"})
    log_prefix: str = LogConfig.prefix

    @classmethod
    def from_args(cls: type[S], argv: list[str] | None = None) -> S:
        """Parse flags (defaults from FRESHREC_* env) into this settings class."""
        parser = argparse.ArgumentParser(prog=f"python -m {cls.__module__.split('.')[0]}",
                                         description=cls.__doc__)
        add_fields(parser, cls)
        args = vars(parser.parse_args(argv))
        return cls(**{**args, "data_dir": Path(args["data_dir"])})

    @property
    def log(self) -> LogConfig:
        """Where the event log is and how it is laid out (log mode only)."""
        return LogConfig(urls=self.log_urls, partitions=self.log_partitions,
                         replicas=self.log_replicas,
                         duplicate_window_s=self.log_duplicate_window_s,
                         retention_s=self.log_retention_s, prefix=self.log_prefix)

    def check_security(self) -> None:
        """Refuse half-configured TLS."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")


def add_fields(parser: argparse.ArgumentParser, settings_cls: Any,
               skip: Iterable[str] = ()) -> None:
    """One `--flag-name` per dataclass field; its default comes from FRESHREC_FLAG_NAME."""
    for f in fields(settings_cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        kind = type(default) if default is not None else str
        env = os.environ.get(f"FRESHREC_{f.name.upper()}")
        flag = f"--{f.name.replace('_', '-')}"
        if kind is bool:
            if env is not None:
                default = env.strip().lower() in ("1", "true", "yes", "on")
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata.get("help"))
            continue
        if env is not None:
            default = kind(env)
        parser.add_argument(flag, type=kind, default=default, required=default is None,
                            help=f.metadata.get("help"))
