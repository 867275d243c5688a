"""The ALS model: batch training with `implicit` and the exact per-user fold-in.

Confidence follows Hu-Koren-Volinsky: ``c = 1 + alpha * w`` where ``w`` is the summed
implicit-feedback weight of a (user, item) pair. `implicit` scales its matrix by its own
``alpha`` and treats the result as ``c`` directly, so we hand it ``c`` and set its alpha
to 1: the batch model and the online fold-in then share one convention. The batch model
is trained on undecayed weights; the fold-in of a user decays each play's weight by
``0.5 ** (age / half_life_s)`` (`index.history`), which is 1 with the decay off.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack

from index.user_stats import UserStats

# Floats per chunk: users * (padded history + d) * d, so a chunk's arrays (factors and
# the d x d systems) stay near 32 MB whatever the history lengths.
_CHUNK_FLOATS = 4_000_000


@dataclass(frozen=True)
class AlsParams:
    """Hyper-parameters of the batch model; stored in the snapshot manifest."""

    # Chosen on a validation window (`python -m bench.tune`, README "Choosing the defaults"):
    # the best at d = 64; d = 128 scored 3% higher there at twice the cost per event.
    factors: int = 64
    regularization: float = 30.0
    alpha: float = 40.0
    iterations: int = 15
    seed: int = 0
    half_life_s: float = 120.0  # of a play's weight in the fold-in, by its age; 0 = no decay

    def __post_init__(self) -> None:
        if self.factors < 1 or self.factors > 1024:
            raise ValueError(f"factors must be in [1, 1024], got {self.factors}")
        if not self.regularization > 0:
            raise ValueError(f"regularization must be > 0, got {self.regularization}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not self.half_life_s >= 0:
            raise ValueError(f"half_life_s must be >= 0, got {self.half_life_s}")

    def as_dict(self) -> dict[str, float | int]:
        """The parameters as a JSON-ready dict."""
        return asdict(self)

    @staticmethod
    def of(values: dict[str, Any]) -> AlsParams:
        """The parameters of a dict made by `as_dict` (e.g. a snapshot manifest's `als`)."""
        return AlsParams(**{f.name: values[f.name] for f in fields(AlsParams) if f.name in values})


@dataclass(frozen=True)
class History:
    """A user's known items (row numbers in the catalog) and their summed weights."""

    items: np.ndarray  # int64
    weights: np.ndarray  # float32, same length

    def __post_init__(self) -> None:
        if self.items.shape != self.weights.shape or self.items.ndim != 1:
            raise ValueError("history items and weights must be 1-d arrays of one length")


def confidence_matrix(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, shape: tuple[int, int], alpha: float
) -> sp.csr_matrix:
    """CSR matrix of confidences ``1 + alpha * sum(w)`` per (row, col); repeats accumulate."""
    summed = sp.csr_matrix(
        (weights.astype(np.float64), (rows, cols)), shape=shape, dtype=np.float64
    )
    summed.sum_duplicates()
    summed.data = 1.0 + alpha * summed.data
    return summed.astype(np.float32)


def train_als(
    user_items: sp.csr_matrix, params: AlsParams, threads: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ALS on a confidence matrix; returns (user_factors, item_factors) as float32."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    # implicit runs its own threads; BLAS threads on top would oversubscribe the cores.
    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=1.0,
            iterations=params.iterations,
            random_state=params.seed,
            num_threads=threads,
        )
        model.fit(user_items, show_progress=False)
    return (
        np.ascontiguousarray(model.user_factors, dtype=np.float32),
        np.ascontiguousarray(model.item_factors, dtype=np.float32),
    )


def solve_stats(gram: np.ndarray, alpha: float, upper: np.ndarray, linear: np.ndarray,
                weighted: np.ndarray) -> np.ndarray:
    """``(gram + alpha P)^-1 (s + alpha m)`` for statistics P (its upper triangle is read),
    s, m: the fold-in of one user (or, with the users' Gram, of one item)."""
    system = gram + alpha * upper  # fresh: dposv factors it in place
    rhs = linear + alpha * weighted
    _, x, info = lapack.dposv(system.T, rhs, lower=1, overwrite_a=1)
    if info != 0:  # not positive definite by rounding: LU on the full matrix
        full = np.triu(upper) + np.triu(upper, 1).T
        x = np.linalg.solve(gram + alpha * full, rhs)
    return np.asarray(x, np.float32)


class FoldIn:
    """Solves user vectors against fixed item factors, many users at a time.

    For user u: ``x_u = (YtY + lambda*I + sum_i (c_ui - 1) y_i y_i^T)^-1 sum_i c_ui y_i``.
    ``YtY + lambda*I`` is computed once per snapshot.
    """

    def __init__(self, item_factors: np.ndarray, regularization: float, alpha: float) -> None:
        if item_factors.ndim != 2:
            raise ValueError(f"item factors must be 2-d, got shape {item_factors.shape}")
        self.item_factors = item_factors
        self.alpha = float(alpha)
        self.dim = item_factors.shape[1]
        factors64 = np.asarray(item_factors, dtype=np.float64)
        self.gram = factors64.T @ factors64 + regularization * np.eye(self.dim)

    def exact(self, histories: Sequence[History]) -> np.ndarray:
        """Exact fold-in from the histories: one stacked solve per chunk of users."""
        out = np.zeros((len(histories), self.dim), dtype=np.float32)
        for chunk, factors, conf, extra in self._padded_chunks(histories):
            lhs = self.gram + np.matmul(factors.transpose(0, 2, 1), factors * extra[..., None])
            rhs = np.matmul(conf[:, None, :], factors)[:, 0, :]
            out[chunk] = np.linalg.solve(lhs, rhs[..., None])[..., 0]
        return out

    def from_stats(self, stats: Sequence[UserStats]) -> np.ndarray:
        """Exact fold-in from a user's statistics (no history needed): a Cholesky solve
        each (LAPACK dposv, ~9 us at d = 64), reading the upper triangle only."""
        out = np.zeros((len(stats), self.dim), dtype=np.float32)
        for i, s in enumerate(stats):
            out[i] = solve_stats(self.gram, self.alpha, s.upper, s.linear, s.weighted)
        return out

    def _padded_chunks(
        self, histories: Sequence[History]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (user positions, factors B*L*d, c B*L, c - 1 B*L) for chunks of users.

        Users are sorted by history length so a chunk's padding stays small; a padded
        slot has c = 0 and c - 1 = 0, so it adds nothing to either side of the system.
        """
        lengths = np.maximum([len(h.items) for h in histories], 1)
        order = np.argsort(lengths, kind="stable")
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and ((end + 1 - start) * (lengths[order[end]] + self.dim)
                                        * self.dim <= _CHUNK_FLOATS):
                end += 1
            chunk = order[start:end]
            yield chunk, *self._pad(histories, chunk, int(lengths[order[end - 1]]))
            start = end

    def _pad(
        self, histories: Sequence[History], chunk: np.ndarray, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        items = np.zeros((len(chunk), width), dtype=np.int64)
        extra = np.zeros((len(chunk), width))
        conf = np.zeros((len(chunk), width))
        for row, user in enumerate(chunk):
            history = histories[user]
            n = len(history.items)
            items[row, :n] = history.items
            extra[row, :n] = self.alpha * history.weights
            conf[row, :n] = extra[row, :n] + 1.0
        factors = self.item_factors[items].astype(np.float64)
        return factors, conf, extra
