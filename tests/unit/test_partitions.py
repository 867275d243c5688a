"""The partition function: FNV-1a 32 of the user id, mod P, as any producer computes it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from eventlog.config import LogConfig
from index.partitions import fnv1a_32, partition_of


def test_fnv1a_32_matches_the_published_test_vectors() -> None:
    assert fnv1a_32(b"") == 0x811C9DC5
    assert fnv1a_32(b"a") == 0xE40C292C
    assert fnv1a_32(b"foobar") == 0xBF9CF968


def test_partitions_of_known_ids_are_stable() -> None:
    # In the README for producers in other languages: these must never change.
    assert fnv1a_32(b"alice") == 0x872213E7
    assert [partition_of(u, 16) for u in ("u1", "u2", "alice")] == [3, 6, 7]


@given(st.text(min_size=1, max_size=64), st.integers(1, 4096))
def test_every_user_has_one_partition_in_range(user: str, partitions: int) -> None:
    p = partition_of(user, partitions)
    assert 0 <= p < partitions
    assert LogConfig(urls="nats://x", partitions=partitions).partition(user) == p


def test_subjects_name_their_partition() -> None:
    log = LogConfig(urls="nats://x", partitions=16)
    assert LogConfig.partition_of_subject(log.events_subject(7)) == 7
    assert LogConfig.partition_of_subject(log.shard_subject(15)) == 15
