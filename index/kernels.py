"""The per-request loops of retrieval, compiled (numba): a few tight calls instead of ~30
numpy calls, because a request arrives with cold caches.

Measured on the 100k-item benchmark catalog (2 cores): a ranking handler costs 2-2.5x in
a server what it costs in a warm loop (the client, the kernel's network stack and gRPC
evict the caches between requests; an 8 MB sweep between calls reproduces it in-process),
and each numpy call pays that on its own dispatch code. Compiled with `cache=True`: the
first process compiles (a few seconds) and the rest load the machine code from disk.
"""

from __future__ import annotations

import numba
import numpy as np

_HASH = 0x9E3779B97F4A7C15  # Fibonacci hashing of item rows into the open-addressing table


def readonly(array: np.ndarray) -> np.ndarray:
    """A read-only view: numba compiles a kernel once per argument type, and whether an
    array is writable is part of its type, so the tables and vectors are always read-only
    (as the memory-mapped ones are)."""
    view = array.view()
    view.flags.writeable = False
    return view


@numba.njit(cache=True, nogil=True)
def reach(rows: np.ndarray, scores: np.ndarray, played: np.ndarray,
          weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The neighbours (`rows`/`scores`: an (n, k) table, -1 padded) of the `played` rows,
    each with the weighted sum of its similarities and the play that contributed most
    (ties: the earlier in `played`), in the order first reached."""
    k = rows.shape[1]
    entries = played.shape[0] * k
    bits = 4
    while (1 << bits) < 2 * entries:
        bits += 1
    size = 1 << bits
    slot_row = np.full(size, -1, np.int64)
    slot_at = np.empty(size, np.int64)
    found = np.empty(entries, np.int64)
    sums = np.empty(entries, np.float64)
    largest = np.empty(entries, np.float64)
    anchors = np.empty(entries, np.int64)
    n = 0
    for i in range(played.shape[0]):
        play = played[i]
        for j in range(k):
            row = np.int64(rows[play, j])
            if row < 0:
                break
            contribution = weights[i] * np.float64(scores[play, j])
            slot = np.int64((np.uint64(row) * np.uint64(_HASH)) >> np.uint64(64 - bits))
            while slot_row[slot] != -1 and slot_row[slot] != row:
                slot = (slot + 1) & (size - 1)
            if slot_row[slot] == -1:
                slot_row[slot], slot_at[slot] = row, n
                found[n], sums[n], largest[n], anchors[n] = row, contribution, contribution, play
                n += 1
            else:
                at = slot_at[slot]
                sums[at] += contribution
                if contribution > largest[at]:
                    largest[at], anchors[at] = contribution, play
    return found[:n], sums[:n], anchors[:n]


@numba.njit(cache=True, nogil=True)
def recent_known(rows: np.ndarray, last_at: np.ndarray,
                 recent: int) -> tuple[np.ndarray, np.ndarray]:
    """The latest `recent` known plays (`rows` >= 0), newest first (ties: in record order),
    and for each the number of plays strictly newer (`neighbours.recent_plays`)."""
    known = np.flatnonzero(rows >= 0)
    latest = known[np.argsort(-last_at[known], kind="mergesort")[:recent]]
    played = np.empty(latest.shape[0], np.int64)
    later = np.zeros(latest.shape[0], np.int64)
    for i in range(latest.shape[0]):
        played[i] = rows[latest[i]]
        if i and last_at[latest[i]] == last_at[latest[i - 1]]:
            later[i] = later[i - 1]  # the same time: as many newer plays as the one before
        else:
            later[i] = i
    return played, later


@numba.njit(cache=True, nogil=True)
def clear_rows(bitmap: np.ndarray, rows: np.ndarray) -> None:
    """Clear the rows' bits of a bitmap in place (IndexError for a row outside it)."""
    for row in rows:
        if row < 0 or row >> 3 >= bitmap.shape[0]:
            raise IndexError("row outside the bitmap")
        bitmap[row >> 3] &= np.uint8(0xFF ^ (1 << (row & 7)))


@numba.njit(cache=True, nogil=True)
def mix(vector: np.ndarray, neighbour: np.ndarray,
        weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Both scores of the same items on one scale, then mixed:
    ``(1 - weight) * v / max(v) + weight * n / max(n)``, each max over these items (a max
    <= 0 leaves that part unscaled). The mix, and its neighbour part."""
    v_max = max(vector.max(), 0.0) if vector.shape[0] else 0.0
    n_max = max(neighbour.max(), 0.0) if neighbour.shape[0] else 0.0
    from_neighbours = weight * (neighbour / n_max if n_max > 0 else neighbour)
    return (1 - weight) * (vector / v_max if v_max > 0 else vector) + from_neighbours, \
        from_neighbours


@numba.njit(cache=True, nogil=True, fastmath=True)
def _dot(factors: np.ndarray, row: np.int64, vector: np.ndarray) -> np.float32:
    dot = np.float32(0.0)
    for d in range(vector.shape[0]):
        dot += factors[row, d] * vector[d]
    return dot


@numba.njit(cache=True, nogil=True)
def _score(factors: np.ndarray, live: np.ndarray, offset: int, row: np.int64,
           vector: np.ndarray) -> np.float32:
    """The vector score of a catalog row: the snapshot's below `offset`, the live
    segment's from it."""
    return _dot(factors, row, vector) if row < offset else _dot(live, row - offset, vector)


@numba.njit(cache=True, nogil=True)
def allowed_top(vectors: np.ndarray, bitmap: np.ndarray, first_byte: int, vector: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top k of `vectors` (float32, or int8 codes) by the inner product with
    `vector`, among the rows the bitmap allows (row i is bit i of the bitmap from byte
    `first_byte` on; an empty bitmap allows all): their positions and scores, best first
    (ties: the earlier). Bytes with no bit set are skipped whole, and no row is copied: a
    narrow filter's search of the snapshot, and the live segment's."""
    m = vectors.shape[0]
    best = np.empty(k, np.int64)
    best_scores = np.empty(k, np.float32)
    n = 0
    every = bitmap.shape[0] == 0
    for byte in range((m + 7) >> 3):
        bits = np.uint8(0xFF) if every else bitmap[first_byte + byte]
        if bits == 0:
            continue
        for bit in range(min(8, m - (byte << 3))):
            if not (bits >> bit) & 1:
                continue
            i = np.int64((byte << 3) + bit)
            score = _dot(vectors, i, vector)
            if n == k and score <= best_scores[k - 1]:
                continue
            at = n if n < k else k - 1  # insert, keeping the list sorted (k is small)
            while at > 0 and best_scores[at - 1] < score:
                if at < k:
                    best[at], best_scores[at] = best[at - 1], best_scores[at - 1]
                at -= 1
            best[at], best_scores[at] = i, score
            n = min(n + 1, k)
    return best[:n], best_scores[:n]


@numba.njit(cache=True, nogil=True)
def blend_top(found: np.ndarray, sums: np.ndarray, anchors: np.ndarray, bitmap: np.ndarray,
              n_best: int, ann: np.ndarray, factors: np.ndarray, live: np.ndarray,
              offset: int, vector: np.ndarray, weight: float,
              k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top k of the `n_best` neighbour candidates the bitmap allows (`found`, `sums`,
    `anchors` from `reach`; an empty bitmap allows every row) and the ANN's `ann` rows
    (already restricted; rows from `offset` on are the live segment's, `live`), every one
    scored by both sources exactly, each part divided by
    its max over these candidates (a max <= 0 leaves it unscaled), mixed
    ``(1 - weight) * vector + weight * neighbours``; best first, ties to the earlier
    candidate (the neighbours in the order reached, then the ANN's order); see `mix`.

    Returns the rows, mixed scores, and anchors: the played row behind an item whose
    neighbours' part is the larger, else -1 (its taste).
    """
    # The neighbour candidates the bitmap allows, the n_best best (position order).
    allowed = np.empty(found.shape[0], np.int64)
    m = 0
    for i in range(found.shape[0]):
        row = found[i]
        if bitmap.shape[0] == 0 or (bitmap[row >> 3] >> (row & 7)) & 1:
            allowed[m] = i
            m += 1
    allowed = allowed[:m]
    if m > n_best:
        cut = np.partition(sums[allowed], m - n_best)[m - n_best]
        above = 0
        for at in allowed:
            above += sums[at] > cut
        ties = n_best - above
        kept = np.empty(n_best, np.int64)
        m = 0
        for at in allowed:
            if sums[at] > cut or (sums[at] == cut and ties > 0):
                ties -= sums[at] == cut
                kept[m] = at
                m += 1
        allowed = kept
    # Candidates: those neighbours, then the ANN's rows not among them.
    candidates = np.empty(m + ann.shape[0], np.int64)
    by_neighbours = np.zeros(m + ann.shape[0], np.float64)
    for t in range(m):
        candidates[t] = found[allowed[t]]
        by_neighbours[t] = sums[allowed[t]]
    n = m
    for a in ann:
        fresh = True
        for t in range(m):
            if candidates[t] == a:
                fresh = False
                break
        if fresh:
            candidates[n] = a
            n += 1
    by_vector = np.zeros(n, np.float64)
    if weight < 1.0:
        for t in range(n):
            by_vector[t] = _score(factors, live, offset, candidates[t], vector)
    mixed, from_neighbours = mix(by_vector, by_neighbours[:n], weight)
    top = np.argsort(-mixed, kind="mergesort")[:k]
    out_anchors = np.full(top.shape[0], -1, np.int64)
    for i in range(top.shape[0]):
        t = top[i]
        if t < m and 2 * from_neighbours[t] > mixed[t]:
            out_anchors[i] = anchors[allowed[t]]
    return candidates[top], mixed[top], out_anchors


def warm_up() -> None:
    """Compile (or load from the disk cache) each kernel for the argument types the ranking
    service passes, so no request pays for it."""
    table = readonly(np.full((2, 1), -1, np.int32))
    found, sums, anchors = reach(table, readonly(np.zeros((2, 1), np.float32)),
                                 np.zeros(1, np.int64), np.ones(1))
    factors, vector = readonly(np.zeros((2, 1), np.float32)), readonly(np.zeros(1, np.float32))
    blend_top(found, sums, anchors, np.zeros(0, np.uint8), 1, np.zeros(0, np.int64),
              factors, factors, 8, vector, 0.5, 1)
    allowed_top(factors, np.zeros(0, np.uint8), 0, vector, 1)
    allowed_top(readonly(np.zeros((2, 1), np.int8)), np.zeros(0, np.uint8), 0, vector, 1)
    recent_known(readonly(np.zeros(1, np.int32)), readonly(np.zeros(1)), 1)
    clear_rows(np.zeros(1, np.uint8), np.zeros(1, np.int64))
