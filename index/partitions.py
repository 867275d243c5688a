"""The partition of a user: a stable hash any producer can compute.

partition(user_id) = FNV-1a 32-bit of the user id's UTF-8 bytes, mod P. FNV-1a 32 is what
NATS's own `partition(N, token)` subject transform uses, it is a few lines in any
language, and P is fixed when the log is created (like Flink's max parallelism): workers
move whole partitions, they never re-split them.
"""

from __future__ import annotations

FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """The FNV-1a 32-bit hash of `data`."""
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_of(user_id: str, partitions: int) -> int:
    """The partition (0..partitions-1) that owns this user's events and state."""
    return fnv1a_32(user_id.encode("utf-8")) % partitions
