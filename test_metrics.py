"""Tests for metrics.py (hand-computed matrices) and utils.py (figures are written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

import metrics
import utils

NAN = float("nan")

# 3 tasks, with backward transfer on task 1 (0.8 -> 0.9) before it is forgotten (-> 0.6),
# so average forgetting (against the max) differs from -BWT (against A[j, j]).
A3 = np.array(
    [
        [0.8, 0.1, NAN],
        [0.9, 0.7, 0.2],
        [0.6, 0.5, 0.9],
    ]
)
B3 = [0.1, 0.05, 0.15]
JOINT3 = [0.85, 0.75, 0.95]


def test_acc_3x3() -> None:
    # ACC = (0.6 + 0.5 + 0.9) / 3 = 2.0 / 3
    assert metrics.acc(A3) == pytest.approx(2.0 / 3.0)


def test_bwt_3x3() -> None:
    # BWT = ((0.6 - 0.8) + (0.5 - 0.7)) / (T - 1 = 2) = -0.4 / 2 = -0.2
    assert metrics.bwt(A3) == pytest.approx(-0.2)


def test_af_uses_max_not_diagonal() -> None:
    # task 1: max(A[0,0], A[1,0]) - A[2,0] = max(0.8, 0.9) - 0.6 = 0.3
    # task 2: max(A[1,1]) - A[2,1] = 0.7 - 0.5 = 0.2
    # AF = (0.3 + 0.2) / 2 = 0.25, whereas -BWT = 0.2
    assert metrics.af(A3) == pytest.approx(0.25)
    assert metrics.af(A3) != pytest.approx(-metrics.bwt(A3))


def test_fwt_against_b() -> None:
    # task 2: A[0,1] - b[1] = 0.1 - 0.05 = 0.05
    # task 3: A[1,2] - b[2] = 0.2 - 0.15 = 0.05
    # FWT = (0.05 + 0.05) / 2 = 0.05   (b[0] is unused)
    assert metrics.fwt(A3, B3) == pytest.approx(0.05)
    assert metrics.fwt(A3, None) is None
    with pytest.raises(ValueError):
        metrics.fwt(A3, [0.1, 0.2])


def test_ps_by_hand() -> None:
    # P terms: t=2: (0.7 - 0.1) / (1 - 0.1) = 0.6 / 0.9 = 2/3
    #          t=3: (0.9 - 0.2) / (1 - 0.2) = 0.7 / 0.8 = 7/8
    # P = (2/3 + 7/8) / 2 = (16/24 + 21/24) / 2 = 37/48
    # S = 1 - ((0.8 - 0.6) + (0.7 - 0.5)) / 2 = 1 - 0.2 = 4/5  (= 1 + BWT)
    # PS = 2 * 37/48 * 4/5 / (37/48 + 4/5) = (296/240) / (377/240) = 296/377
    assert metrics.plasticity(A3) == pytest.approx(37.0 / 48.0)
    assert metrics.stability(A3) == pytest.approx(0.8)
    assert metrics.stability(A3) == pytest.approx(1.0 + metrics.bwt(A3))
    assert metrics.ps(A3) == pytest.approx(296.0 / 377.0)


def test_avg_acc_and_intransigence() -> None:
    # row means: [0.8] -> 0.8; [0.9, 0.7] -> 0.8; [0.6, 0.5, 0.9] -> 2/3
    # AvgAcc = (0.8 + 0.8 + 2/3) / 3 = (12/15 + 12/15 + 10/15) / 3 = 34/45
    assert metrics.avg_acc(A3) == pytest.approx(34.0 / 45.0)
    # I = mean(0.85 - 0.8, 0.75 - 0.7, 0.95 - 0.9) = mean(0.05, 0.05, 0.05) = 0.05
    assert metrics.intransigence(A3, JOINT3) == pytest.approx(0.05)
    assert metrics.intransigence(A3, None) is None


def test_compute_metrics_3x3_and_json() -> None:
    m = metrics.compute_metrics(A3, b=B3, joint_diag=JOINT3, frozen=200, total=800)
    assert list(m) == list(metrics.METRIC_KEYS)
    assert m["ACC"] == pytest.approx(2.0 / 3.0)
    assert m["BWT"] == pytest.approx(-0.2)
    assert m["FWT"] == pytest.approx(0.05)
    assert m["AF"] == pytest.approx(0.25)
    assert m["PS"] == pytest.approx(296.0 / 377.0)
    assert m["Intransigence"] == pytest.approx(0.05)
    assert m["AvgAcc"] == pytest.approx(34.0 / 45.0)
    assert m["CAP"] == pytest.approx(0.25)  # 200 / 800
    assert all(type(v) is float for v in m.values())
    assert json.loads(json.dumps(m)) == m

    partial = metrics.compute_metrics(A3)
    assert partial["FWT"] is None and partial["Intransigence"] is None and partial["CAP"] is None
    json.dumps(partial)


def test_single_task() -> None:
    A1 = np.array([[0.7]])
    m = metrics.compute_metrics(A1, b=[0.1], joint_diag=[0.8], frozen=10, total=800)
    assert m["ACC"] == pytest.approx(0.7)
    assert m["AvgAcc"] == pytest.approx(0.7)
    assert m["Intransigence"] == pytest.approx(0.1)  # 0.8 - 0.7
    assert m["CAP"] == pytest.approx(10 / 800)
    for key in ("BWT", "FWT", "AF", "PS", "P", "S"):
        assert m[key] is None, key
    json.dumps(m)


def test_untrained_head_already_perfect() -> None:
    # A[0,1] = 1: denominator 1 - A[0,1] = 0, the term is 1.0 if A[1,1] >= A[0,1] else 0.0.
    keeps = np.array([[0.9, 1.0], [0.8, 1.0]])
    # P = 1.0; S = 1 - (0.9 - 0.8) = 0.9; PS = 2 * 1 * 0.9 / 1.9 = 1.8 / 1.9
    assert metrics.plasticity(keeps) == 1.0
    assert metrics.stability(keeps) == pytest.approx(0.9)
    assert metrics.ps(keeps) == pytest.approx(1.8 / 1.9)

    drops = np.array([[0.9, 1.0], [0.8, 0.95]])
    # P = 0.0; S = 0.9; PS = 0 / 0.9 = 0
    assert metrics.plasticity(drops) == 0.0
    assert metrics.ps(drops) == 0.0
    # FWT = A[0,1] - b[1] = 1.0 - 0.5 = 0.5 (single term, divided by T - 1 = 1)
    assert metrics.fwt(keeps, [0.5, 0.5]) == pytest.approx(0.5)


def test_ps_clipping_and_zero_sum() -> None:
    # P raw = (0.2 - 0.6) / (1 - 0.6) = -1 -> clipped to 0; S = 1 - (1.0 - 1.0) = 1; PS = 0
    neg_p = np.array([[1.0, 0.6], [1.0, 0.2]])
    assert metrics.plasticity(neg_p) == 0.0
    assert metrics.stability(neg_p) == 1.0
    assert metrics.ps(neg_p) == 0.0
    # P = (0.5 - 0.5) / 0.5 = 0; S = 1 - (1.0 - 0.0) = 0; P + S == 0 -> PS = 0
    zero = np.array([[1.0, 0.5], [0.0, 0.5]])
    assert metrics.ps(zero) == 0.0
    # positive backward transfer: S = 1 - (0.5 - 0.9) = 1.4 (only clipped below)
    pos = np.array([[0.5, 0.1], [0.9, 0.8]])
    assert metrics.stability(pos) == pytest.approx(1.4)
    # P = (0.8 - 0.1) / 0.9 = 7/9 (clip at 1 leaves it unchanged)
    assert metrics.plasticity(pos) == pytest.approx(7.0 / 9.0)


def test_perfect_no_forgetting_is_exactly_zero() -> None:
    # Every column stays constant once its task is learned.
    A = np.array(
        [
            [0.97, 0.10, NAN, NAN],
            [0.97, 0.93, 0.11, NAN],
            [0.97, 0.93, 0.91, 0.09],
            [0.97, 0.93, 0.91, 0.99],
        ]
    )
    assert metrics.bwt(A) == 0.0
    assert metrics.af(A) == 0.0
    assert metrics.stability(A) == 1.0
    # ACC = (0.97 + 0.93 + 0.91 + 0.99) / 4 = 3.8 / 4 = 0.95
    assert metrics.acc(A) == pytest.approx(0.95)


def test_cap() -> None:
    assert metrics.cap(480, 4800) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        metrics.cap(1, 0)
    with pytest.raises(ValueError):
        metrics.cap(900, 800)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 3)),  # not square
        np.zeros(3),  # not 2-D
        np.zeros((0, 0)),  # no task
        np.array([[NAN, 0.1], [0.5, 0.6]]),  # NaN on the diagonal
        np.array([[0.5, NAN], [0.5, 0.6]]),  # NaN on the first superdiagonal
        np.array([[0.5, 0.1], [NAN, 0.6]]),  # NaN below the diagonal
        np.array([[0.5, 0.1], [1.5, 0.6]]),  # > 1 (percent instead of fraction)
        np.array([[0.5, -0.1], [0.5, 0.6]]),  # < 0
    ],
)
def test_validate_matrix_rejects(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        metrics.validate_matrix(bad)
    with pytest.raises(ValueError):
        metrics.compute_metrics(bad)


def test_validate_matrix_accepts_nan_above_superdiagonal() -> None:
    metrics.validate_matrix(A3)
    metrics.validate_matrix(np.array([[0.5]]))


def test_summarize() -> None:
    runs = [
        {"ACC": 0.5, "BWT": None, "FWT": None},
        {"ACC": 0.7, "BWT": -0.1, "FWT": None},
        {"ACC": 0.9, "BWT": -0.3, "FWT": None},
    ]
    s = metrics.summarize(runs)
    # ACC: mean 0.7; population std = sqrt((0.2^2 + 0 + 0.2^2) / 3) = sqrt(0.08 / 3)
    assert s["ACC"]["mean"] == pytest.approx(0.7)
    assert s["ACC"]["std"] == pytest.approx(math.sqrt(0.08 / 3.0))
    assert s["ACC"]["n"] == 3
    # BWT: None skipped -> values -0.1, -0.3: mean -0.2, std 0.1
    assert s["BWT"] == {"mean": pytest.approx(-0.2), "std": pytest.approx(0.1), "n": 2}
    assert s["FWT"] == {"mean": None, "std": None, "n": 0}
    json.dumps(s)


def test_summarize_of_compute_metrics() -> None:
    A_other = np.array([[0.6, 0.1, NAN], [0.5, 0.8, 0.2], [0.4, 0.7, 0.9]])
    s = metrics.summarize([metrics.compute_metrics(A3), metrics.compute_metrics(A_other)])
    assert set(s) == set(metrics.METRIC_KEYS)
    # ACC: 2/3 and (0.4 + 0.7 + 0.9) / 3 = 2/3 -> std exactly representable as 0
    assert s["ACC"]["mean"] == pytest.approx(2.0 / 3.0)
    assert s["ACC"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert s["CAP"]["n"] == 0
    json.dumps(s)


def _assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_accuracy_matrix(tmp_path: Path) -> None:
    path = tmp_path / "acc.png"
    utils.plot_accuracy_matrix(A3, path, title="toy")
    _assert_png(path)
    big = np.tril(np.full((30, 30), 0.5), k=1)
    big[np.triu_indices(30, k=2)] = NAN
    utils.plot_accuracy_matrix(big, tmp_path / "big.png")
    _assert_png(tmp_path / "big.png")
    assert plt.get_fignums() == []


@pytest.mark.parametrize("sizes", [[200] * 4, [64] * 5 + [128] * 5 + [256] * 5 + [512] * 5])
def test_plot_shapley_heatmap(tmp_path: Path, sizes: list[int]) -> None:
    rng = np.random.default_rng(0)
    n = sum(sizes)
    phi = [rng.normal(0.0, 0.01, n) for _ in range(3)]
    phi[1][: sizes[0]] = NAN  # a whole layer unevaluated
    phi[2][::7] = NAN
    names = [f"L{i}" for i in range(len(sizes))]
    path = tmp_path / "phi.png"
    utils.plot_shapley_heatmap(phi, sizes, names, path)
    _assert_png(path)
    assert plt.get_fignums() == []
    with pytest.raises(ValueError):
        utils.plot_shapley_heatmap(phi, sizes[:-1], names[:-1], tmp_path / "bad.png")


def test_plot_shapley_heatmap_all_nan(tmp_path: Path) -> None:
    path = tmp_path / "nan.png"
    utils.plot_shapley_heatmap([np.full(10, NAN)], [4, 6], ["a", "b"], path)
    _assert_png(path)


def test_plot_capacity(tmp_path: Path) -> None:
    frozen = np.array([[20, 20, 20, 20], [40, 38, 35, 30], [60, 55, 50, 40]])
    path = tmp_path / "cap.png"
    utils.plot_capacity(frozen, [200] * 4, ["fc1", "fc2", "fc3", "fc4"], path)
    _assert_png(path)
    assert plt.get_fignums() == []


def test_plot_frozen_by_rule(tmp_path: Path) -> None:
    frac = np.array([[0.1, 0.1], [0.3, 0.2], [0.6, 0.3]])
    path = tmp_path / "rules.png"
    utils.plot_frozen_by_rule({"global": frac, "per-layer": frac[:, ::-1]}, ["fc1", "fc2"], path)
    _assert_png(path)
    with pytest.raises(ValueError, match=r"shape \[T, 3\]"):
        utils.plot_frozen_by_rule({"global": frac}, ["fc1", "fc2", "fc3"], path)
    with pytest.raises(ValueError, match="at least one"):
        utils.plot_frozen_by_rule({}, ["fc1"], path)
    assert plt.get_fignums() == []


def test_plot_run(tmp_path: Path) -> None:
    result = {
        "accuracy_matrix": [[0.8, 0.1, None], [0.9, 0.7, 0.2], [0.6, 0.5, 0.9]],
        "shapley": [
            {"phi": [0.01 * i for i in range(10)], "frozen_per_layer": [1, 0]},
            {"frozen_per_layer": [2, 1]},
            {"phi": [None] + [0.02] * 9, "frozen_per_layer": [3, 2]},
        ],
        "layer_sizes": [4, 6],
        "layer_names": ["fc1", "fc2"],
    }
    out = tmp_path / "figs"
    paths = utils.plot_run(result, out)
    assert sorted(p.name for p in paths) == ["accuracy_matrix.png", "capacity.png", "shapley_heatmap.png"]
    for p in paths:
        _assert_png(p)

    only_acc = utils.plot_run({"accuracy_matrix": result["accuracy_matrix"], "shapley": [{}]}, tmp_path / "b")
    assert [p.name for p in only_acc] == ["accuracy_matrix.png"]
    assert plt.get_fignums() == []
