"""The snapshot follower: an admin's switch and a poll can never undo each other."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.follower import SnapshotFollower
from index.snapshot import INDEX_FILE, SnapshotError, current_version, set_current

V1, V2 = "small-v1", "small-v2"


@pytest.fixture()
def root(tmp_path: Path, data_dir: Path) -> Path:
    """A snapshots dir with V1 (CURRENT) and a copy of it named V2."""
    target = snapshots_dir(tmp_path)
    shutil.copytree(snapshots_dir(data_dir), target)
    shutil.copytree(target / V1, target / V2)
    manifest = target / V2 / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'"{V1}"', f'"{V2}"'))
    return target


class GatedLoader:
    """Loads snapshots; the first load of `gated` stops until the test lets it go on."""

    def __init__(self, root: Path, gated: str) -> None:
        self.root, self.gated = root, gated
        self.loaded, self.proceed = threading.Event(), threading.Event()
        self.calls: list[str] = []

    def __call__(self, version: str) -> CatalogSnapshot:
        self.calls.append(version)
        catalog = CatalogSnapshot.load(self.root, version, with_index=False)
        if version == self.gated and not self.loaded.is_set():
            self.loaded.set()
            assert self.proceed.wait(10)
        return catalog


def _follower(root: Path, loader: GatedLoader) -> SnapshotFollower[CatalogSnapshot]:
    return SnapshotFollower(root, loader, lambda catalog: catalog.model_version)


def test_a_poll_between_loading_and_current_cannot_bring_the_old_version_back(
    root: Path,
) -> None:
    loader = GatedLoader(root, gated=V2)
    follower = _follower(root, loader)
    switch = threading.Thread(target=follower.switch, args=(V2,))
    switch.start()
    assert loader.loaded.wait(10)  # V2 is loaded; CURRENT still names V1
    assert current_version(root) == V1
    polled: list[object] = []
    poll = threading.Thread(target=lambda: polled.append(follower.follow()))
    poll.start()  # the maintenance thread's poll lands in the gap
    poll.join(0.3)
    assert poll.is_alive(), "the poll must wait for the switch, not read CURRENT in the gap"
    loader.proceed.set()
    switch.join(10)
    poll.join(10)
    assert follower.version == V2 and current_version(root) == V2
    assert polled == [None]  # nothing to follow: CURRENT and the live version agree
    assert loader.calls == [V1, V2]  # V1 at start; the poll never reloaded it


def test_another_process_follows_a_switch_on_its_next_poll(root: Path) -> None:
    answered = _follower(root, GatedLoader(root, gated=""))
    other = _follower(root, GatedLoader(root, gated=""))
    answered.switch(V2)
    assert other.version == V1
    followed = other.follow()
    assert followed is not None and followed.model_version == V2
    assert other.follow() is None  # already there


def test_a_bad_current_is_refused_once_and_an_explicit_switch_retries_it(root: Path) -> None:
    loader = GatedLoader(root, gated="")
    follower = _follower(root, loader)
    shutil.copytree(root / V1, root / "broken")
    (root / "broken" / INDEX_FILE).write_bytes(b"\0" * 64)
    set_current(root, V1)
    (root / "CURRENT").write_text("broken\n")  # as a faulty deploy would
    with pytest.raises(SnapshotError, match="broken"):
        follower.follow()
    assert follower.follow() is None  # remembered: not reloaded every poll
    assert loader.calls == [V1, "broken"]
    with pytest.raises(SnapshotError):
        follower.switch("broken")  # an admin asking again is tried again
    assert loader.calls == [V1, "broken", "broken"]
    assert follower.version == V1 and current_version(root) == "broken"
    follower.switch(V2)
    assert follower.version == V2 and current_version(root) == V2
