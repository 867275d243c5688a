"""Following snapshots/CURRENT: one live snapshot per process, switched atomically.

Both services hold what they derive from the live snapshot (item factors for the event
service, the searchable catalog for each ranking worker) in a `SnapshotFollower`.
`CURRENT` is the single source of truth: `switch` (an admin's reload) validates the new
snapshot, points CURRENT at it and swaps it in, and `follow` (a poll) adopts whatever
CURRENT names, both under one lock, so a poll can never reinstate the version an admin
just replaced. A version that fails to load is refused once, not retried every poll.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from index.snapshot import SnapshotError, current_version, set_current

T = TypeVar("T")


class SnapshotFollower(Generic[T]):
    """The live value derived from one snapshot version, kept in step with CURRENT."""

    def __init__(self, root: Path, load: Callable[[str], T],
                 version_of: Callable[[T], str]) -> None:
        """Load CURRENT now (SnapshotError if it cannot be): a service starts on it."""
        self.root = root
        self._load, self._version_of = load, version_of
        self._lock = threading.Lock()
        self._refused = ""
        self.live: T = load(current_version(root))  # one reference: swapped atomically

    @property
    def version(self) -> str:
        """The live model version."""
        return self._version_of(self.live)

    def switch(self, version: str | None = None) -> T:
        """Load `version` (default: CURRENT), make it CURRENT, and serve it; SnapshotError
        leaves everything as it was."""
        with self._lock:
            target = current_version(self.root) if version is None else version
            live = self._load(target)
            if version is not None:
                set_current(self.root, target)
            self.live = live
            if self._refused == target:
                self._refused = ""
            return live

    def update(self, change: Callable[[T], T]) -> T:
        """Serve `change(live)` instead of the live value, under the same lock as `switch`
        and `follow` (so a change made for one version never replaces a newer one)."""
        with self._lock:
            self.live = change(self.live)
            return self.live

    def follow(self) -> T | None:
        """Adopt the version CURRENT names if it is another one; the new value, else None.

        Raises SnapshotError once per version that cannot be loaded (then keeps the old).
        """
        with self._lock:
            target = current_version(self.root)
            if target in (self._version_of(self.live), self._refused):
                return None
            try:
                self.live = self._load(target)
            except SnapshotError:
                self._refused = target
                raise
            return self.live
