"""Figures for one SNV run: accuracy matrix, Shapley values per layer, frozen capacity.

All plots use the non-interactive Agg backend, label tasks 1-based (as in the
paper) and close their figure after saving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

ANNOTATE_MAX_TASKS = 25
"""Accuracy-matrix cells are annotated with their value only up to this many tasks."""

DPI = 120


def _tick_positions(n: int, max_ticks: int = 25) -> np.ndarray:
    """Evenly spaced 0-based tick positions, at most ``max_ticks`` of them."""
    step = max(1, int(np.ceil(n / max_ticks)))
    return np.arange(0, n, step)


def _save(fig: plt.Figure, path: str | Path) -> None:
    """Save ``fig`` to ``path`` (creating parent folders) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)


def _check_layers(layer_sizes: Sequence[int], layer_names: Sequence[str]) -> None:
    """Raise ValueError if layer sizes and names disagree or a size is not positive."""
    if len(layer_sizes) != len(layer_names):
        raise ValueError(f"{len(layer_sizes)} layer sizes but {len(layer_names)} layer names")
    if len(layer_sizes) == 0 or any(int(s) <= 0 for s in layer_sizes):
        raise ValueError(f"layer sizes must be a non-empty list of positive ints, got {list(layer_sizes)}")


def plot_accuracy_matrix(A: np.ndarray, path: str | Path, title: str = "") -> None:
    """Heatmap of the accuracy matrix A[i, j] (NaN cells blank), cells annotated in %, 1-based task labels."""
    A = np.asarray(A, dtype=float)
    if A.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D, got shape {A.shape}")
    n_rows, n_cols = A.shape
    size = min(4.0 + 0.45 * max(n_rows, n_cols), 16.0)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(100.0 * A), cmap=cmap, vmin=0.0, vmax=100.0, aspect="equal")
    if max(n_rows, n_cols) <= ANNOTATE_MAX_TASKS:
        fontsize = max(5.0, 11.0 - 0.25 * max(n_rows, n_cols))
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(A[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{100.0 * A[i, j]:.1f}",
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color="black" if A[i, j] > 0.6 else "white",
                    )
    rows, cols = _tick_positions(n_rows), _tick_positions(n_cols)
    ax.set_yticks(rows, [str(i + 1) for i in rows])
    ax.set_xticks(cols, [str(j + 1) for j in cols])
    ax.set_ylabel("after training task i")
    ax.set_xlabel("evaluated on task j")
    ax.set_title(title or "Accuracy matrix A[i, j] (%)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="test accuracy (%)")
    _save(fig, path)


def _layer_means(phi: np.ndarray, layer_sizes: Sequence[int]) -> np.ndarray:
    """Mean of the finite entries of each layer's block of columns of phi [T, N] -> [T, L] (NaN if none)."""
    bounds = np.concatenate([[0], np.cumsum(layer_sizes)])
    out = np.full((phi.shape[0], len(layer_sizes)), np.nan)
    for layer in range(len(layer_sizes)):
        block = phi[:, bounds[layer] : bounds[layer + 1]]
        finite = np.isfinite(block)
        counts = finite.sum(axis=1)
        sums = np.where(finite, block, 0.0).sum(axis=1)
        out[:, layer] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return out


def _symmetric_norm(values: np.ndarray, percentile: float = 100.0) -> TwoSlopeNorm:
    """Diverging colour norm centred at 0 spanning +-(percentile of |finite values|)."""
    finite = np.abs(values[np.isfinite(values)])
    limit = float(np.percentile(finite, percentile)) if finite.size else 0.0
    if limit <= 0.0:
        limit = 1e-12
    return TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)


def _spaced_indices(positions: np.ndarray, min_gap: float) -> list[int]:
    """Greedily pick indices of increasing ``positions`` at least ``min_gap`` apart (first always kept)."""
    picked: list[int] = []
    for i, pos in enumerate(positions):
        if not picked or pos - positions[picked[-1]] >= min_gap:
            picked.append(i)
    return picked


def plot_shapley_heatmap(
    phi: Sequence[np.ndarray],
    layer_sizes: Sequence[int],
    layer_names: Sequence[str],
    path: str | Path,
) -> None:
    """Two panels: task x layer mean Shapley value, and task x neuron phi with layer boundaries marked.

    ``phi[t]`` has shape ``[N]`` with ``N = sum(layer_sizes)``; NaN entries (e.g.
    neurons never evaluated) are left blank and ignored in the layer means.  The
    neuron panel names only layers wide enough to leave room for the label, and its
    colour range is clipped at the 99th percentile of |phi| so that a few large
    values do not wash out the rest.
    """
    _check_layers(layer_sizes, layer_names)
    n_neurons = int(sum(layer_sizes))
    if len(phi) == 0:
        raise ValueError("phi must contain at least one task")
    mat = np.stack([np.asarray(p, dtype=float).reshape(-1) for p in phi])
    if mat.shape[1] != n_neurons:
        raise ValueError(f"phi has {mat.shape[1]} neurons per task but layer sizes sum to {n_neurons}")
    n_tasks, n_layers = mat.shape[0], len(layer_sizes)
    means = _layer_means(mat, layer_sizes)

    height = min(3.0 + 0.3 * n_tasks, 14.0)
    width_layers = min(4.0 + 0.45 * n_layers, 14.0)
    fig, (ax_l, ax_n) = plt.subplots(
        1,
        2,
        figsize=(width_layers + 10.0, height),
        gridspec_kw={"width_ratios": [width_layers, 10.0]},
    )
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")
    task_ticks = _tick_positions(n_tasks)

    im_l = ax_l.imshow(np.ma.masked_invalid(means), cmap=cmap, norm=_symmetric_norm(means), aspect="auto")
    ax_l.set_xticks(np.arange(n_layers), list(layer_names), rotation=60, ha="right", fontsize=8)
    ax_l.set_yticks(task_ticks, [str(t + 1) for t in task_ticks])
    ax_l.set_xlabel("layer")
    ax_l.set_ylabel("after training task")
    ax_l.set_title("Mean Shapley value per layer")
    fig.colorbar(im_l, ax=ax_l, label="mean phi")

    im_n = ax_n.imshow(
        np.ma.masked_invalid(mat),
        cmap=cmap,
        norm=_symmetric_norm(mat, percentile=99.0),
        aspect="auto",
        interpolation="nearest",
    )
    bounds = np.cumsum(layer_sizes)
    for b in bounds[:-1]:
        ax_n.axvline(b - 0.5, color="black", linewidth=0.6)
    centres = bounds - np.asarray(layer_sizes) / 2.0 - 0.5
    shown = _spaced_indices(centres, min_gap=n_neurons / 30.0)
    ax_n.set_xticks(centres[shown], [layer_names[i] for i in shown], rotation=60, ha="right", fontsize=7)
    ax_n.set_yticks(task_ticks, [str(t + 1) for t in task_ticks])
    ax_n.set_xlabel(f"neuron index (N = {n_neurons}), grouped by layer")
    ax_n.set_ylabel("after training task")
    ax_n.set_title("Shapley value of every neuron")
    fig.colorbar(im_n, ax=ax_n, label="phi (clipped at 99th pct of |phi|)")
    _save(fig, path)


def plot_capacity(
    frozen_per_layer: np.ndarray,
    layer_sizes: Sequence[int],
    layer_names: Sequence[str],
    path: str | Path,
) -> None:
    """Fraction of neurons frozen per layer after each task: line plot (plus whole network) and task x layer heatmap."""
    _check_layers(layer_sizes, layer_names)
    frozen = np.asarray(frozen_per_layer, dtype=float)
    if frozen.ndim == 1:
        frozen = frozen[None, :]
    sizes = np.asarray(layer_sizes, dtype=float)
    if frozen.ndim != 2 or frozen.shape[1] != sizes.size:
        raise ValueError(f"frozen_per_layer must have shape [T, {sizes.size}], got {frozen.shape}")
    n_tasks, n_layers = frozen.shape
    frac = frozen / sizes[None, :]
    overall = frozen.sum(axis=1) / sizes.sum()
    tasks = np.arange(1, n_tasks + 1)

    fig, (ax_line, ax_map) = plt.subplots(1, 2, figsize=(15.0, 5.5), gridspec_kw={"width_ratios": [1.2, 1.0]})
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.95, n_layers))
    for layer in range(n_layers):
        ax_line.plot(tasks, frac[:, layer], color=colours[layer], linewidth=1.0, marker=".", label=layer_names[layer])
    ax_line.plot(tasks, overall, color="red", linewidth=2.5, linestyle="--", label="whole network")
    ax_line.set_xlabel("after training task")
    ax_line.set_ylabel("fraction of neurons frozen")
    ax_line.set_ylim(-0.02, 1.02)
    ax_line.set_xticks(tasks[_tick_positions(n_tasks)])
    ax_line.grid(alpha=0.3)
    ax_line.set_title("Frozen capacity per layer")
    ax_line.legend(fontsize=7, ncol=1 + n_layers // 12, loc="center left", bbox_to_anchor=(1.0, 0.5))

    im = ax_map.imshow(frac, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax_map.set_xticks(np.arange(n_layers), list(layer_names), rotation=60, ha="right", fontsize=8)
    task_ticks = _tick_positions(n_tasks)
    ax_map.set_yticks(task_ticks, [str(t + 1) for t in task_ticks])
    ax_map.set_xlabel("layer")
    ax_map.set_ylabel("after training task")
    ax_map.set_title(f"Fraction frozen (final CAP = {overall[-1]:.3f})")
    fig.colorbar(im, ax=ax_map, label="fraction frozen")
    fig.tight_layout()
    _save(fig, path)


def plot_frozen_by_rule(
    series: Mapping[str, np.ndarray],
    layer_names: Sequence[str],
    path: str | Path,
) -> None:
    """Fraction of each layer frozen after each task, one panel per selection rule, on shared axes.

    ``series[label]`` is a [T, L] array of fractions in [0, 1] (e.g. the mean over seeds).
    """
    if not series:
        raise ValueError("plot_frozen_by_rule needs at least one series")
    for label, frac in series.items():
        if np.ndim(frac) != 2 or np.shape(frac)[1] != len(layer_names):
            raise ValueError(f"{label}: frozen fractions must have shape [T, {len(layer_names)}], got {np.shape(frac)}")
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.2), sharey=True, squeeze=False)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.95, len(layer_names)))
    for ax, (label, frac) in zip(axes[0], series.items()):
        tasks = np.arange(1, len(frac) + 1)
        for layer, name in enumerate(layer_names):
            ax.plot(tasks, np.asarray(frac)[:, layer], color=colours[layer], marker=".", label=name)
        ax.set_xticks(tasks[_tick_positions(len(tasks))])
        ax.set_xlabel("after training task")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(label)
    axes[0][0].set_ylabel("fraction of the layer frozen")
    axes[0][-1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def _nested_to_matrix(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Convert a (possibly ragged) nested list with None entries to a square float array padded with NaN."""
    n = max(len(rows), max((len(r) for r in rows), default=0))
    out = np.full((n, n), np.nan)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if value is not None:
                out[i, j] = float(value)
    return out


def plot_run(result: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write accuracy_matrix.png, shapley_heatmap.png and capacity.png for one run where the data exists.

    ``result`` keys used: ``accuracy_matrix`` (T x T nested list, None above the
    superdiagonal), ``shapley`` (per-task dicts; tasks without ``"phi"`` become NaN
    rows; their ``"frozen_per_layer"`` [L] counts give the capacity plot), ``layer_sizes`` and
    ``layer_names`` (default ``layer1..layerL``).  Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    rows = result.get("accuracy_matrix")
    if rows:
        path = out_dir / "accuracy_matrix.png"
        plot_accuracy_matrix(_nested_to_matrix(rows), path)
        written.append(path)

    layer_sizes = result.get("layer_sizes")
    if not layer_sizes:
        return written
    layer_names = result.get("layer_names") or [f"layer{i + 1}" for i in range(len(layer_sizes))]
    n_neurons = int(sum(layer_sizes))

    shapley = result.get("shapley") or []
    if any(isinstance(s, Mapping) and s.get("phi") is not None for s in shapley):
        phi = [
            np.asarray(s["phi"], dtype=float)
            if isinstance(s, Mapping) and s.get("phi") is not None
            else np.full(n_neurons, np.nan)
            for s in shapley
        ]
        path = out_dir / "shapley_heatmap.png"
        plot_shapley_heatmap(phi, layer_sizes, layer_names, path)
        written.append(path)

    frozen = [s["frozen_per_layer"] for s in shapley if isinstance(s, Mapping) and "frozen_per_layer" in s]
    if frozen:
        path = out_dir / "capacity.png"
        plot_capacity(np.asarray(frozen, dtype=float), layer_sizes, layer_names, path)
        written.append(path)
    return written


def plot_capacity_sweep(
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
    path: str | Path,
    title: str = "",
) -> None:
    """Table 3: accuracy (%) against capacity c, one line per label.

    ``series[label] = (c values, accuracies in %, stds in % or None)``; a series with stds is drawn with
    error bars (our runs), one without as a dashed line (the paper's reported values).
    """
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for label, (cs, acc, std) in series.items():
        if len(cs) == 0:
            continue
        if std is None:
            ax.plot(cs, acc, linestyle="--", marker="x", label=label)
        else:
            ax.errorbar(cs, acc, yerr=std, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.minorticks_off()
    ticks = sorted({float(c) for cs, _, _ in series.values() for c in cs})
    ax.set_xticks(ticks, [f"{c:g}" for c in ticks])
    ax.set_xlabel("capacity c (fraction of neurons frozen per task)")
    ax.set_ylabel("ACC after the last task (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Capacity sweep (task-incremental, 10 tasks)")
    _save(fig, path)


def plot_pruning_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str = "",
) -> None:
    """Fig. 4: average accuracy (%) against the global magnitude-pruning rate (%), one line per label.

    ``curves[label] = (rates, mean accuracies, stds)``; the first rate below half the unpruned mean (the
    critical percentage) is marked with a star.
    """
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for label, (rates, mean, std) in curves.items():
        rates, mean, std = (np.asarray(v, dtype=float) for v in (rates, mean, std))
        (line,) = ax.plot(rates, mean, marker=".", label=label)
        ax.fill_between(rates, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        below = np.nonzero(mean < mean[0] / 2)[0]
        if below.size:
            ax.plot(rates[below[0]], mean[below[0]], marker="*", markersize=12, color=line.get_color())
    ax.set_xlabel("backbone weights pruned by magnitude (%)")
    ax.set_ylabel("average accuracy over all tasks (%)")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Pruning robustness (star: critical percentage)")
    _save(fig, path)
