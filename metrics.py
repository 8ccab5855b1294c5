"""Continual-learning metrics computed from an accuracy matrix (GEM-style, pure numpy).

Conventions
-----------
``A`` is a float array of shape ``[T, T]`` with ``A[i, j]`` = test accuracy (a
fraction in [0, 1]) on task ``j`` after training task ``i``.  Indices are 0-based in
code; the formulas in the docstrings use the paper's 1-based notation
(``A_{i,j}``, tasks ``1..T``).  Entries above the first superdiagonal are NaN;
the first superdiagonal ``A[t-1, t]`` holds the accuracy on task ``t`` right after
training task ``t-1`` (head ``t`` freshly created, untrained) and is needed by FWT
and PS.

Averages over tasks in BWT, FWT, AF and PS divide by ``T - 1`` (not ``T``) and
forgetting (AF) is measured against the best earlier accuracy, not ``A[j, j]``.
Every scalar is returned as a plain Python ``float`` (or ``None`` where the metric
is undefined) so the results are JSON-serialisable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRIC_KEYS: tuple[str, ...] = (
    "ACC",
    "BWT",
    "FWT",
    "AF",
    "PS",
    "P",
    "S",
    "Intransigence",
    "AvgAcc",
    "CAP",
)


def validate_matrix(A: np.ndarray) -> None:
    """Raise ValueError unless A is square, finite on/below the first superdiagonal, and in [0, 1] there."""
    A = np.asarray(A, dtype=float)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"accuracy matrix must be square [T, T], got shape {A.shape}")
    T = A.shape[0]
    if T == 0:
        raise ValueError("accuracy matrix must have at least one task (got shape (0, 0))")
    required = np.tril(np.ones((T, T), dtype=bool), k=1)
    missing = required & ~np.isfinite(A)
    if missing.any():
        cells = [(int(i), int(j)) for i, j in zip(*np.nonzero(missing))]
        raise ValueError(
            "accuracy matrix has NaN/inf on or below the first superdiagonal at "
            f"(i, j) = {cells[:10]}{' ...' if len(cells) > 10 else ''}"
        )
    vals = A[required]
    if (vals < 0.0).any() or (vals > 1.0).any():
        bad = required & ((A < 0.0) | (A > 1.0))
        cells = [(int(i), int(j)) for i, j in zip(*np.nonzero(bad))]
        raise ValueError(
            "accuracy matrix entries must be fractions in [0, 1]; out of range at "
            f"(i, j) = {cells[:10]}{' ...' if len(cells) > 10 else ''}"
        )


def _as_matrix(A: np.ndarray) -> np.ndarray:
    """Return A as a validated float array."""
    A = np.asarray(A, dtype=float)
    validate_matrix(A)
    return A


def acc(A: np.ndarray) -> float:
    """ACC = (1/T) sum_{j=1..T} A_{T,j}."""
    A = _as_matrix(A)
    return float(np.mean(A[-1, :]))


def bwt(A: np.ndarray) -> float | None:
    """BWT = 1/(T-1) sum_{j=1..T-1} (A_{T,j} - A_{j,j}); None when T == 1."""
    A = _as_matrix(A)
    T = A.shape[0]
    if T == 1:
        return None
    idx = np.arange(T - 1)
    return float(np.sum(A[T - 1, idx] - A[idx, idx]) / (T - 1))


def fwt(A: np.ndarray, b: Sequence[float] | np.ndarray | None) -> float | None:
    """FWT = 1/(T-1) sum_{j=2..T} (A_{j-1,j} - b_j); None when T == 1 or b is None."""
    A = _as_matrix(A)
    T = A.shape[0]
    if T == 1 or b is None:
        return None
    b = np.asarray(b, dtype=float)
    if b.shape != (T,):
        raise ValueError(f"b must have shape ({T},), got {b.shape}")
    j = np.arange(1, T)
    return float(np.sum(A[j - 1, j] - b[j]) / (T - 1))


def af(A: np.ndarray) -> float | None:
    """AF = 1/(T-1) sum_{j=1..T-1} (max_{l=j..T-1} A_{l,j} - A_{T,j}); None when T == 1."""
    A = _as_matrix(A)
    T = A.shape[0]
    if T == 1:
        return None
    total = 0.0
    for j in range(T - 1):
        total += float(np.max(A[j : T - 1, j]) - A[T - 1, j])
    return total / (T - 1)


def intransigence(A: np.ndarray, joint_diag: Sequence[float] | np.ndarray | None) -> float | None:
    """I = (1/T) sum_{k=1..T} (a*_k - A_{k,k}), a*_k = joint model on tasks 1..k; None when joint_diag is None."""
    A = _as_matrix(A)
    if joint_diag is None:
        return None
    T = A.shape[0]
    a_star = np.asarray(joint_diag, dtype=float)
    if a_star.shape != (T,):
        raise ValueError(f"joint_diag must have shape ({T},), got {a_star.shape}")
    return float(np.mean(a_star - np.diag(A)))


def _plasticity_term(before: float, after: float) -> float:
    """One P term (after - before) / (1 - before); 1.0 if before == 1 and after >= before, else 0.0."""
    gap = 1.0 - before
    if gap == 0.0:
        return 1.0 if after >= before else 0.0
    return (after - before) / gap


def _raw_plasticity(A: np.ndarray) -> float:
    """Unclipped P = 1/(T-1) sum_{t=2..T} (A_{t,t} - A_{t-1,t}) / (1 - A_{t-1,t}) for a validated A with T >= 2."""
    T = A.shape[0]
    return sum(_plasticity_term(float(A[t - 1, t]), float(A[t, t])) for t in range(1, T)) / (T - 1)


def _raw_stability(A: np.ndarray) -> float:
    """Unclipped S = 1 - 1/(T-1) sum_{t=1..T-1} (A_{t,t} - A_{T,t}) for a validated A with T >= 2."""
    T = A.shape[0]
    idx = np.arange(T - 1)
    return 1.0 - float(np.sum(A[idx, idx] - A[T - 1, idx]) / (T - 1))


def plasticity(A: np.ndarray) -> float | None:
    """P = clip(1/(T-1) sum_{t=2..T} (A_{t,t} - A_{t-1,t}) / (1 - A_{t-1,t}), 0, 1); None when T == 1.

    A term whose denominator ``1 - A_{t-1,t}`` is exactly 0 (the untrained head is
    already perfect) is defined as 1.0 if ``A_{t,t} >= A_{t-1,t}`` else 0.0.
    """
    A = _as_matrix(A)
    if A.shape[0] == 1:
        return None
    return float(min(max(_raw_plasticity(A), 0.0), 1.0))


def stability(A: np.ndarray) -> float | None:
    """S = max(0, 1 - 1/(T-1) sum_{t=1..T-1} (A_{t,t} - A_{T,t})) (= max(0, 1 + BWT)); None when T == 1."""
    A = _as_matrix(A)
    if A.shape[0] == 1:
        return None
    return float(max(_raw_stability(A), 0.0))


def ps(A: np.ndarray) -> float | None:
    """PS = 2 P S / (P + S) with P = plasticity(A), S = stability(A) (0 when P + S == 0); None when T == 1."""
    p = plasticity(A)
    s = stability(A)
    if p is None or s is None:
        return None
    if p + s == 0.0:
        return 0.0
    return float(2.0 * p * s / (p + s))


def avg_acc(A: np.ndarray) -> float:
    """Average incremental accuracy = (1/T) sum_{i=1..T} (1/i) sum_{j=1..i} A_{i,j}."""
    A = _as_matrix(A)
    T = A.shape[0]
    return float(np.mean([np.mean(A[i, : i + 1]) for i in range(T)]))


def cap(frozen: int, total: int) -> float:
    """CAP = |B_T| / N (fraction of the N neurons frozen at the end)."""
    if total <= 0:
        raise ValueError(f"total number of neurons must be positive, got {total}")
    if frozen < 0 or frozen > total:
        raise ValueError(f"frozen must lie in [0, {total}], got {frozen}")
    return float(frozen) / float(total)


def compute_metrics(
    A: np.ndarray,
    b: Sequence[float] | np.ndarray | None = None,
    joint_diag: Sequence[float] | np.ndarray | None = None,
    frozen: int | None = None,
    total: int | None = None,
) -> dict[str, float | None]:
    """Return all metrics of ``METRIC_KEYS`` as plain floats (None where undefined or inputs missing)."""
    A = _as_matrix(A)
    return {
        "ACC": acc(A),
        "BWT": bwt(A),
        "FWT": fwt(A, b),
        "AF": af(A),
        "PS": ps(A),
        "P": plasticity(A),
        "S": stability(A),
        "Intransigence": intransigence(A, joint_diag),
        "AvgAcc": avg_acc(A),
        "CAP": cap(frozen, total) if frozen is not None and total is not None else None,
    }


def summarize(values: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Per-key mean and population std (ddof=0) over runs, skipping None/NaN: key -> {"mean", "std", "n"}.

    Keys appear in order of first occurrence; a key with no defined value gets
    ``{"mean": None, "std": None, "n": 0}``.
    """
    keys: list[str] = []
    for record in values:
        for key in record:
            if key not in keys:
                keys.append(key)
    out: dict[str, dict[str, float | int | None]] = {}
    for key in keys:
        xs = [float(r[key]) for r in values if r.get(key) is not None and not math.isnan(float(r[key]))]
        if xs:
            arr = np.asarray(xs, dtype=float)
            out[key] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=0)), "n": len(xs)}
        else:
            out[key] = {"mean": None, "std": None, "n": 0}
    return out
