"""Markdown tables (ours next to the paper's numbers) and figures from the results folders of run_experiments.sh.

    python report.py --results results --out RESULTS.md     # the tables
    python report.py --figures                              # figures/ from the committed results
    python report.py --docs README.md docs/*.md             # their generated blocks (DOC_BLOCKS)

Ours = mean ± std (population, as in summary.json) over the seed JSONs of a folder, in % (a single seed: its
value alone); gap = ours - paper in points. A folder with no seed JSON is "not run"; results/quick (CPU
smoke-test settings) is reported in its own, separately labelled tables and figures/quick.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import metrics
import task_inference
import utils
from baselines import METHODS, SCENARIOS, SCORES

PAPER_REPORTED: dict = {
    "imagenet1k": {
        "SNV": {("class_il", 10): 41.30, ("class_il", 20): 34.20, ("class_il", 50): 25.60,
                ("task_il", 10): 57.82, ("task_il", 20): 50.45, ("task_il", 50): 40.18},
        "NFL+": {("class_il", 10): 38.42, ("class_il", 20): 31.50, ("class_il", 50): 22.40,
                 ("task_il", 10): 51.36, ("task_il", 20): 45.80, ("task_il", 50): 37.20},
        "DCNet": {("class_il", 10): 37.80, ("class_il", 20): 30.10, ("class_il", 50): 20.80,
                  ("task_il", 10): 50.15, ("task_il", 20): 44.30, ("task_il", 50): 35.80},
        "WSN": {("task_il", 10): 48.73, ("task_il", 20): 43.20, ("task_il", 50): 35.40},
        "DyTox (20k buffer)": {("class_il", 10): 40.15, ("class_il", 20): 33.20, ("class_il", 50): 24.50,
                               ("task_il", 10): 59.40, ("task_il", 20): 52.10, ("task_il", 50): 42.80},
    },
    "ten_tasks": {
        ("pmnist", "task_il"): {"ACC": 97.45, "BWT": 0.0},
        ("cifar100", "task_il"): {"ACC": 76.19, "BWT": 0.0},
        ("tinyimagenet", "task_il"): {"ACC": 74.73, "BWT": 0.0},
        ("pmnist", "class_il"): {"ACC": 93.45, "BWT": -0.06, "PS": 0.96},
        ("cifar100", "class_il"): {"ACC": 54.70, "BWT": -0.04, "PS": 0.69},
        ("tinyimagenet", "class_il"): {"ACC": 45.70, "BWT": -0.05, "PS": 0.62},
    },
    "twenty_tasks": {
        ("cifar100", "class_il"): 44.85, ("tinyimagenet", "class_il"): 37.47,
        ("cifar100", "task_il"): 71.93, ("tinyimagenet", "task_il"): 67.95,
    },
    "capacity": {
        "cifar100": {"0.03": (71.74, 59.65), "0.05": (74.52, 60.19), "0.1": (76.19, 61.22),
                     "0.3": (77.89, 63.15), "0.5": (79.76, 64.00)},
        "tinyimagenet": {"0.03": (69.89, 60.72), "0.05": (73.24, 63.22), "0.1": (74.73, 61.96),
                         "0.3": (74.38, 62.92), "0.5": (74.82, 61.06)},
    },
}
"""The paper's reported values, transcribed from docs/paper.md section 4 (ACC and BWT in %, PS as a fraction;
capacity: (SNV, WSN) ACC in %). Fig. 4's critical percentages are shown only in a figure, not as numbers."""

CAPACITIES = ("0.03", "0.05", "0.1", "0.3", "0.5")
"""Table 3's c values, spelled as in run_experiments.sh's folder names."""
MAIN_SETTINGS = (("pmnist", 10), ("cifar100", 10), ("cifar100", 20), ("tinyimagenet", 10), ("tinyimagenet", 20),
                 ("imagenet1k", 10), ("imagenet1k", 20), ("imagenet1k", 50))
DATASETS = {"pmnist": "PMNIST", "splitmnist": "Split-MNIST", "cifar100": "CIFAR-100",
            "tinyimagenet": "TinyImageNet", "imagenet1k": "ImageNet-1k"}
SHORT = {"task_il": "TIL", "class_il": "CIL"}
NOT_RUN = "not run"
NONE = "—"
UNDEFINED = "n/a"
ALL_METRICS = ("ACC", "BWT", "FWT", "AF", "PS", "Intransigence", "CAP")
NOT_FULL_PROTOCOL = ("quick", "compare", "rehearsal")
"""Subtrees of results/ kept out of the full-protocol tables and figures (rehearsal: random-pixel stand-in runs)."""
FRACTIONS = frozenset({"PS", "P", "S", "CAP"})
"""Metrics shown as fractions (3 decimals); the others are accuracies shown in % (2 decimals)."""


def task_suffix(dataset: str, tasks: int) -> str:
    """The folder-name suffix of run_experiments.sh: _T<T> for datasets run with several task counts."""
    return "" if dataset in ("pmnist", "splitmnist") else f"_T{tasks}"


def main_folder(dataset: str, scenario: str, tasks: int, method: str = "snv") -> str:
    """A main-table run's folder: <dataset>/snv_<scenario>[_T<T>], bounds/<dataset>_<method>_<scenario>[_T<T>]."""
    if method == "snv":
        return f"{dataset}/snv_{scenario}{task_suffix(dataset, tasks)}"
    return f"bounds/{dataset}_{method}_{scenario}{task_suffix(dataset, tasks)}"


def capacity_folder(dataset: str, c: str) -> str:
    """Table 3's folder; c = 0.1 = 1/T is the 10-task TIL main run."""
    return main_folder(dataset, "task_il", 10) if c == "0.1" else f"capacity/{dataset}_c{c}"


# ----------------------------------------------------------------------------- results

@dataclass
class Experiment:
    """One results folder: its seed JSONs (sorted by seed)."""

    folder: str
    runs: list[dict]

    @property
    def args(self) -> dict:
        return self.runs[0]["args"]

    @property
    def n(self) -> int:
        return len(self.runs)

    def values(self, key: str) -> list[float]:
        """The metric `key` of every seed where it is defined."""
        return [float(r["metrics"][key]) for r in self.runs if r.get("metrics", {}).get(key) is not None]

    def matches(self, expect: dict) -> bool:
        """True if every expected argument equals this folder's (sparsity compared as a number)."""
        return all(abs(float(self.args.get(k, "nan")) - float(v)) < 1e-9 if k == "sparsity"
                   else self.args.get(k) == v for k, v in expect.items())


def load_experiment(folder: Path, name: str) -> Experiment | None:
    """The seed*.json files of `folder` (None if it has none)."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("seed*.json"))]
    return Experiment(name, sorted(runs, key=lambda r: r["seed"])) if runs else None


def excluded(rel: str, exclude: tuple[str, ...]) -> bool:
    """True if the relative path `rel` lies in one of the subtrees `exclude`."""
    return any(rel == e or rel.startswith(e + "/") for e in exclude)


def find_experiments(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, Experiment]:
    """Every folder below `root` holding seed JSONs, by path relative to `root` (the subtrees `exclude` left out)."""
    found: dict[str, Experiment] = {}
    for folder in sorted({p.parent for p in root.rglob("seed*.json")}):
        rel = folder.relative_to(root).as_posix()
        if excluded(rel, exclude):
            continue
        if (exp := load_experiment(folder, rel)) is not None:
            found[rel] = exp
    return found


@dataclass
class Results:
    """The experiments of one results tree, looked up by folder with a check of their settings."""

    experiments: dict[str, Experiment]
    warnings: list[str] = field(default_factory=list)

    def get(self, folder: str, **expect) -> Experiment | None:
        """The experiment in `folder` if its settings match `expect`; otherwise None and a warning."""
        exp = self.experiments.get(folder)
        if exp is not None and not exp.matches(expect):
            found = {k: exp.args.get(k) for k in expect}
            self.warnings.append(f"`{folder}` holds {found}, expected {expect}: ignored")
            return None
        return exp

    def main(self, dataset: str, scenario: str, tasks: int, method: str = "snv") -> Experiment | None:
        """A main-table run; except for the joint bound itself, Intransigence against the joint bound's same seed."""
        expect = dict(dataset=dataset, scenario=scenario, num_tasks=tasks)
        exp = self.get(main_folder(dataset, scenario, tasks, method), method=method, **expect)
        if method == "joint":
            return exp
        return with_intransigence(exp, self.get(main_folder(dataset, scenario, tasks, "joint"), method="joint",
                                                **expect))

    def baseline(self, method: str, dataset: str, scenario: str, tasks: int, **extra) -> Experiment | None:
        """A comparison run under baselines/ with these settings (the one with the most seeds)."""
        expect = dict(method=method, dataset=dataset, scenario=scenario, num_tasks=tasks, **extra)
        hits = [e for f, e in self.experiments.items() if f.startswith("baselines/") and e.matches(expect)]
        return max(hits, key=lambda e: e.n, default=None)


# ----------------------------------------------------------------------------- cells and tables

def is_fraction(key: str) -> bool:
    return key in FRACTIONS


def column(key: str) -> str:
    """A metric's column heading with its unit: 'ACC (%)', 'PS (fraction)'."""
    return f"{key} ({'fraction' if is_fraction(key) else '%'})"


def scaled(key: str, value: float) -> float:
    """A metric as displayed: accuracies in %, fractions as they are."""
    return value if is_fraction(key) else 100.0 * value


def number(key: str, value: float, signed: bool = False) -> str:
    digits = 3 if is_fraction(key) else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def stats(values: list[float]) -> tuple[float, float]:
    """(mean, std) with metrics.summarize's convention (population std)."""
    s = metrics.summarize([{"v": v} for v in values])["v"]
    return s["mean"], s["std"]


def mean_std(values: list[float], fmt: Callable[[float], str]) -> str:
    """"mean ± std" of `values`, each written by `fmt`; a single value has no spread and is written alone."""
    mean, std = stats(values)
    return fmt(mean) if len(values) == 1 else f"{fmt(mean)} ± {fmt(std)}"


@dataclass
class Cell:
    """One measured quantity: a metric of an experiment (None = not run), with the paper's value if any."""

    exp: Experiment | None
    key: str = "ACC"
    paper: float | None = None

    def mean(self) -> float | None:
        values = self.exp.values(self.key) if self.exp is not None else []
        return scaled(self.key, stats(values)[0]) if values else None

    def ours(self, n_table: int) -> str:
        if self.exp is None:
            return NOT_RUN
        values = self.exp.values(self.key)
        if not values:
            return UNDEFINED
        text = mean_std(values, lambda v: number(self.key, scaled(self.key, v)))
        return text + (f" (n={len(values)})" if len(values) != n_table else "")

    def paper_text(self) -> str:
        return NONE if self.paper is None else number(self.key, self.paper)

    def gap(self) -> str:
        mean = self.mean()
        return NONE if mean is None or self.paper is None else number(self.key, mean - self.paper, signed=True)


def provenance(exps: Iterable[Experiment | None]) -> tuple[int, str]:
    """(the most common seed count, a line naming n seeds, devices and machines of these experiments)."""
    exps = [e for e in exps if e is not None]
    if not exps:
        return 0, "n seeds: 0 (nothing in this table has been run yet)."
    counts = sorted({e.n for e in exps})
    n = max(counts, key=lambda k: (sum(e.n == k for e in exps), k))
    seeds = "/".join(str(k) for k in counts)
    return n, f"n seeds: {seeds} per run (cells with another n say so); {machines_line(exps)}"


def machines_line(exps: list[Experiment]) -> str:
    """'device: ...; machine: ...' of every run of these experiments."""
    devices = sorted({r.get("device", "unknown") for e in exps for r in e.runs})
    machines = sorted({f"{r.get('machine', {}).get('host', 'unknown')} ({r.get('machine', {}).get('cpus', '?')} CPUs, "
                       f"torch {r.get('machine', {}).get('torch', '?')})" for e in exps for r in e.runs})
    return f"device: {', '.join(devices)}; machine: {', '.join(machines)}."


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def comparison_table(title: str, columns: list[str], rows: list[tuple[str, list[Cell]]], note: str = "") -> str:
    """Each row label gives three lines: ours (mean ± std), the paper's value, and the gap ours - paper."""
    n, prov = provenance(c.exp for _, cells in rows for c in cells)
    body = []
    for label, cells in rows:
        body.append([label, "ours"] + [c.ours(n) for c in cells])
        body.append(["", "paper"] + [c.paper_text() for c in cells])
        body.append(["", "gap"] + [c.gap() for c in cells])
    return "\n\n".join(x for x in (f"### {title}", note, markdown(["", ""] + columns, body), prov) if x)


def runs_table(title: str, exps: list[tuple[str, Experiment | None]], note: str = "") -> str:
    """Ours only: every metric of each experiment (no paper number exists for these)."""
    n, prov = provenance(e for _, e in exps)
    header = ["run"] + [column(k) for k in ALL_METRICS] + ["n"]
    body = [[label] + [Cell(e, k).ours(n) for k in ALL_METRICS] + [str(e.n) if e else NONE] for label, e in exps]
    return "\n\n".join(x for x in (f"### {title}", note, markdown(header, body), prov) if x)


# ----------------------------------------------------------------------------- the paper's tables

def imagenet_table(res: Results) -> str:
    settings = [(s, t) for s in ("class_il", "task_il") for t in (10, 20, 50)]
    columns = [f"{SHORT[s]} {t}" for s, t in settings]
    paper = PAPER_REPORTED["imagenet1k"]
    rows = [("SNV", [Cell(res.main("imagenet1k", s, t), paper=paper["SNV"][(s, t)]) for s, t in settings])]
    for method, key in (("NFL+", None), ("DCNet", None), ("WSN", "wsn"), ("DyTox (20k buffer)", None)):
        rows.append((method, [Cell(res.baseline(key, "imagenet1k", s, t) if key else None,
                                   paper=paper[method].get((s, t))) for s, t in settings]))
    for method in ("sgd", "joint"):
        rows.append((METHODS[method].label, [Cell(res.main("imagenet1k", s, t, method)) for s, t in settings]))
    return comparison_table("ImageNet-1k, ResNet-18: ACC (%)", columns, rows,
                            "NFL+, DCNet and DyTox are not implemented here (ours stays \"not run\"); WSN comes "
                            "from a baselines/ run with the same settings if there is one.")


def ten_task_table(res: Results, scenario: str) -> str:
    keys = ("ACC", "BWT", "PS", "FWT", "AF", "Intransigence", "CAP")
    columns = [column(k) for k in keys]
    rows = []
    for dataset in ("pmnist", "cifar100", "tinyimagenet"):
        paper = PAPER_REPORTED["ten_tasks"][(dataset, scenario)]
        exp = res.main(dataset, scenario, 10)
        rows.append((DATASETS[dataset], [Cell(exp, k, paper.get(k)) for k in keys]))
    label = "task-incremental (c = 0.1)" if scenario == "task_il" else "class-incremental (c = 0.1)"
    return comparison_table(f"10 tasks, {label}: SNV", columns, rows,
                            "The paper's BWT unit is not stated; it is read here as percentage points. "
                            "Intransigence: against the joint bound (`bounds/`) of the same seed.")


def twenty_task_table(res: Results) -> str:
    columns = [f"{SHORT[s]} {column(k)}" for s in SCENARIOS
               for k in ("ACC", "BWT", "PS")]
    rows = []
    for dataset in ("cifar100", "tinyimagenet"):
        cells = []
        for s in SCENARIOS:
            exp = res.main(dataset, s, 20)
            cells += [Cell(exp, "ACC", PAPER_REPORTED["twenty_tasks"][(dataset, s)]), Cell(exp, "BWT"), Cell(exp, "PS")]
        rows.append((DATASETS[dataset], cells))
    return comparison_table("20 tasks (c = 0.05): SNV", columns, rows)


def capacity_tables(res: Results) -> str:
    out = []
    for dataset in ("cifar100", "tinyimagenet"):
        paper = PAPER_REPORTED["capacity"][dataset]
        rows = []
        for c in CAPACITIES:
            snv = res.get(capacity_folder(dataset, c), dataset=dataset, scenario="task_il", num_tasks=10,
                          method="snv", sparsity=float(c))
            wsn = res.baseline("wsn", dataset, "task_il", 10, sparsity=float(c))
            rows.append((f"c = {c}", [Cell(snv, paper=paper[c][0]), Cell(wsn, paper=paper[c][1])]))
        out.append(comparison_table(f"Table 3, {DATASETS[dataset]}: task-incremental, 10 tasks, ACC (%) against "
                                    "capacity c", ["SNV", "WSN"], rows,
                                    "c = 0.1 is the 10-task TIL main run; WSN comes from a baselines/ run with "
                                    "the same --sparsity if there is one."))
    return "\n\n".join(out)


def pruning_experiments(res: Results) -> list[tuple[str, Experiment | None]]:
    """Fig. 4's runs, labelled: the 10-task main runs and sgd bounds, keeping the seeds run with --prune-analysis."""
    out = []
    for dataset in ("pmnist", "cifar100"):
        for method in ("snv", "sgd"):
            for s in SCENARIOS:
                exp = res.main(dataset, s, 10, method)
                runs = [r for r in exp.runs if "pruning" in r] if exp is not None else []
                out.append((f"{DATASETS[dataset]} {SHORT[s]} {METHODS[method].label}",
                            Experiment(exp.folder, runs) if runs else None))
    return out


def critical_text(exp: Experiment | None) -> str:
    """Mean ± std of the critical percentage over seeds; seeds never falling below half are counted apart."""
    if exp is None:
        return NOT_RUN
    crit = [r["pruning"]["critical_percentage"] for r in exp.runs]
    reached = [float(c) for c in crit if c is not None]
    if not reached:
        return f"never (n={len(crit)})"
    never = len(crit) - len(reached)
    return mean_std(reached, "{:.1f}".format) + (f" (never in {never} of {len(crit)})" if never else "")


def curve_at(exp: Experiment | None, rate: int) -> str:
    """Mean ± std over seeds of the average accuracy (%) at pruning `rate`."""
    if exp is None:
        return NOT_RUN
    values = [r["pruning"]["avg_accuracy"][r["pruning"]["rates"].index(rate)] for r in exp.runs]
    return mean_std(values, lambda v: f"{100 * v:.2f}")


def pruning_table(res: Results) -> str:
    exps = pruning_experiments(res)
    n, prov = provenance(e for _, e in exps)
    body = [[label, critical_text(e), NONE, curve_at(e, 0), curve_at(e, 50), curve_at(e, 90),
             str(e.n) if e else NONE] for label, e in exps]
    header = ["run", "critical % (ours)", "critical % (paper)", "avg acc 0% pruned", "50% pruned", "90% pruned", "n"]
    note = ("Measured after the 10-task main runs and sgd bounds run with --prune-analysis (n counts those seeds). "
            "Backbone weights (Linear/Conv2d producers, not heads) pruned globally by magnitude at 0, 5, ..., 90%; "
            "critical % = first rate whose average accuracy is below half the unpruned one. The paper shows Fig. 4 "
            "only as a figure, so it has no number to compare (\"—\"); see figures/pruning_curves.png.")
    return "\n\n".join(["### Fig. 4: pruning robustness", note, markdown(header, body), prov])


# ----------------------------------------------------------------------------- what only we run

def bounds_table(res: Results) -> str:
    exps = [(f"{DATASETS[d]} {SHORT[s]} T={t} {METHODS[m].label}", res.main(d, s, t, m))
            for d, t in MAIN_SETTINGS for s in SCENARIOS for m in ("sgd", "joint")]
    return runs_table("Bounds: SGD (fine-tuning) and Joint, every main-table setting (ours only)", exps,
                      "Intransigence of the SGD bound: against the joint bound of the same seed.")


SEED_METRICS = ("ACC", "BWT", "FWT", "AF", "PS", "Intransigence", "CAP")
"""The per-seed columns of seeds_table."""


DENSE_LABEL = "SNV, paper-literal (--inference dense)"
"""The row label of SNV's dense reading, in the seeds table and the readings table alike."""

PAPER_PROTOCOL_EXTRAS = (  # (scenario, folder, row label, expected arguments)
    ("task_il", "pmnist/snv_task_il_dense", DENSE_LABEL, {"inference": "dense"}),
    ("task_il", "pmnist/snv_task_il_rerun", "SNV, re-run with the lean step (issue 21)", {"inference": "masked"}),
    ("task_il", "pmnist/snv_task_il_rerun2", "SNV, re-run with FusedAdam (issue 21)", {"inference": "masked"}),
    ("class_il", "pmnist/snv_class_il_dense", DENSE_LABEL, {"inference": "dense"}),
)
"""The seeds table's extra PMNIST rows next to the main SNV row: run_experiments.sh's dense reading, and the
default run repeated at later commits to time the training step."""


def paper_protocol_rows(res: Results, s: str) -> list[tuple[str, Experiment | None]]:
    """(label, experiment) of the seeds table for scenario s: SNV, its extra rows, the bounds."""
    expect = dict(dataset="pmnist", scenario=s, num_tasks=10, method="snv")
    joint = res.main("pmnist", s, 10, "joint")
    extras = [(f"{SHORT[s]} {label}", with_intransigence(res.get(folder, **args, **expect), joint))
              for scenario, folder, label, args in PAPER_PROTOCOL_EXTRAS if scenario == s]
    bounds = [(f"{SHORT[s]} {METHODS[m].label}", res.main("pmnist", s, 10, m)) for m in ("sgd", "joint")]
    return [(f"{SHORT[s]} {METHODS['snv'].label}", res.main("pmnist", s, 10))] + extras + bounds


def seeds_table(res: Results) -> str:
    """PMNIST at the paper's protocol, one row per seed: SNV, its dense reading and re-run, and the bounds, with
    each run's time and commit."""
    header = (["run", "seed"] + [column(k) for k in SEED_METRICS]
              + ["wall time (min)", "commit"])
    body, exps = [], []
    for s in SCENARIOS:
        for label, exp in paper_protocol_rows(res, s):
            if exp is None:
                body.append([label, NONE] + [NOT_RUN] * len(SEED_METRICS) + [NONE, NONE])
                continue
            exps.append(exp)
            for r in exp.runs:
                body.append([label, str(r["seed"])] + [seed_cell(r, k) for k in SEED_METRICS]
                            + [f"{r['seconds'] / 60:.0f}" if "seconds" in r else NONE, r.get("git_commit", NONE)[:7]])
    note = ("Every seed of `pmnist/snv_*` and `bounds/pmnist_{sgd,joint}_*`; \"0 exactly\" = no test accuracy of "
            "an old task changed at all; Intransigence is against the joint bound of the same seed. Wall time is the "
            "run's own record: a run resumed from a checkpoint adds its parts, and runs sharing a core take longer. "
            "The re-run repeats the default TIL command at a later commit (the MLP's hand-written backward, "
            "bit-identical gradients) to time it against the earlier seeds.")
    return "\n\n".join(["### PMNIST, 10 tasks, the paper's protocol: every seed (ours only)", note,
                         markdown(header, body), machines_line(exps) if exps else "Nothing run yet."])


def forgets_nothing(run: dict) -> bool:
    """True when the last row of the accuracy matrix A equals its diagonal: no old task's accuracy changed."""
    A = run["accuracy_matrix"]
    return all(A[-1][j] == A[j][j] for j in range(len(A)))


def seed_cell(run: dict, key: str) -> str:
    """One seed's metric as displayed; BWT is "0 exactly" when forgets_nothing(run)."""
    value = run["metrics"].get(key)
    if value is None:
        return UNDEFINED
    if key == "BWT" and forgets_nothing(run):
        return "0 exactly"
    return number(key, scaled(key, value))


def splitmnist_table(res: Results) -> str:
    exps = [(f"{SHORT[s]} {METHODS[m].label}", res.get(f"splitmnist/{m}_{s}", dataset="splitmnist", method=m,
                                                       scenario=s)) for m in ("snv", "sgd") for s in SCENARIOS]
    inferred = res.get(f"splitmnist/snv_class_il{TASK_INFERENCE_SUFFIX}", dataset="splitmnist", method="snv",
                       scenario="class_il")
    return "\n\n".join([
        runs_table("Split-MNIST, 5 tasks, ResNet-18 at a CPU profile (ours only)", exps,
                   protocol_line((e for _, e in exps), ("width",) + PROTOCOL_KEYS[2:])),
        task_id_table("Split-MNIST, class-incremental without replay", rule_rows(METHODS["snv"].label, inferred),
                      "Split-MNIST, 5 tasks, ResNet-18 at the CPU profile above")])


def comparison_runs_table(res: Results) -> str:
    """The runs of run_experiments_baselines.txt (baselines/), after SNV and the bounds on PMNIST as references."""
    refs = [(f"reference: PMNIST {SHORT[s]} {METHODS[m].label}", res.main("pmnist", s, 10, m))
            for s in SCENARIOS for m in ("snv", "sgd", "joint")]
    exps = [(f"`{f.removeprefix('baselines/')}`", e) for f, e in sorted(res.experiments.items())
            if f.startswith("baselines/")]
    return runs_table("Comparison runs (run_experiments_baselines.txt; ours only)", refs + exps,
                      "Every grid point is listed: the harness records test accuracy only, so picking the best "
                      "point by it would be optimistic.")


SCORE_KEYS = ("spearman_shapley", "spearman_removal", "topk_overlap", "seconds")
"""What `rank_correlation.py` records per score."""


def score_cell(runs: list[dict], kind: str, key: str) -> str:
    """Mean ± std over rank-correlation files of score `kind`'s `key` ("—" where none records it)."""
    values = [float(r["scores"][kind][key]) for r in runs if r["scores"].get(kind, {}).get(key) is not None]
    return mean_std(values, "{:.3f}".format) if values else NONE


def rank_correlation_runs(root: Path, exclude: tuple[str, ...] = ()) -> list[dict]:
    """Every rank_correlation_seed*.json below `root` (rank_correlation.py), the subtrees `exclude` left out."""
    return [json.loads(p.read_text()) for p in sorted(root.rglob("rank_correlation_seed*.json"))
            if not excluded(p.relative_to(root).as_posix(), exclude)]


def rank_correlation_table(root: Path, exclude: tuple[str, ...]) -> str:
    """Spearman of each cheap neuron score with Monte Carlo Shapley (rank_correlation.py), over seeds."""
    runs = rank_correlation_runs(root, exclude)
    title = "### Neuron scores against Monte Carlo Shapley (task 1; ours only)"
    if not runs:
        return f"{title}\n\n{NOT_RUN}."
    body = [[kind] + [score_cell(runs, kind, key) for key in SCORE_KEYS] for kind in runs[0]["scores"]]
    header = ["score", "Spearman with Shapley", "Spearman with removal effect", "top-k overlap", "seconds"]
    prov = f"n seeds: {len(runs)}; device: {', '.join(sorted({r['device'] for r in runs}))}; dataset: " \
           f"{', '.join(sorted({r['args']['dataset'] for r in runs}))}."
    return "\n\n".join([title, markdown(header, body), prov])


def all_runs_table(res: Results) -> str:
    exps = [(f"`{f}` ({e.args.get('method')}, {e.args.get('dataset')}, {SHORT.get(e.args.get('scenario'), '?')}, "
             f"T={e.args.get('num_tasks')}, c={e.args.get('sparsity', float('nan')):.3g})", e)
            for f, e in sorted(res.experiments.items())]
    if not exps:
        return "### Every results folder\n\nNo results yet."
    return runs_table("Every results folder", exps,
                      "Metrics as each seed JSON records them: Intransigence only where the run was given "
                      "--joint-results.")


def section(root: Path, label: str, exclude: tuple[str, ...]) -> str:
    """All tables of one results tree."""
    res = Results(find_experiments(root, exclude) if root.is_dir() else {})
    parts = [imagenet_table(res), ten_task_table(res, "task_il"), ten_task_table(res, "class_il"),
             twenty_task_table(res), capacity_tables(res), pruning_table(res), bounds_table(res),
             seeds_table(res), splitmnist_table(res), comparison_runs_table(res), rank_correlation_table(root, exclude),
             all_runs_table(res)]
    if label:
        parts = [p.replace("### ", f"### {label}: ") for p in parts]
    if res.warnings:
        parts.append("### Warnings\n\n" + "\n".join(f"- {w}" for w in sorted(set(res.warnings))))
    return "\n\n".join(parts)


GXD_VARIANTS = ("snv",)
"""Methods whose comparison has a row with --reset gxd (folder <method>+gxd) under their own."""
COMPARE_LABEL = "PMNIST method comparison (CPU protocol of `run_experiments.sh --compare`, not the paper's)"


def compare_folder(scenario: str, name: str) -> str:
    """A comparison run's folder: baselines/pmnist_<scenario>_<name> (run_experiments_compare.txt)."""
    return f"baselines/pmnist_{scenario}_{name}"


def compare_snv(res: Results, scenario: str, name: str) -> Experiment | None:
    """The comparison's SNV run in folder compare_folder(scenario, name) (the default SNV row or a variant)."""
    return res.get(compare_folder(scenario, name), scenario=scenario, method="snv")


PROTOCOL_KEYS = ("num_tasks", "arch", "epochs", "batch_size", "lr", "optimizer", "max_permutations",
                 "shapley_eval_batches")
"""The settings protocol_line reports by default."""


def protocol_line(exps: Iterable[Experiment | None], keys: tuple[str, ...] = PROTOCOL_KEYS) -> str:
    """The settings `keys` shared by these runs (a warning in the text if they differ)."""
    exps = [e for e in exps if e is not None]
    if not exps:
        return ""
    found = {k: sorted({str(e.args.get(k)) for e in exps}) for k in keys}
    return "Protocol read from the results: " + ", ".join(f"{k}={'/'.join(v) or '?'}" for k, v in found.items()) + \
        ("" if all(len(v) <= 1 for v in found.values()) else " (**the runs differ in a setting**)") + "."


def importance_table(res: Results, root: Path) -> str:
    """Each neuron score: rank agreement with Monte Carlo Shapley and its cost (task 1), final TIL ACC when
    it drives SNV's freeze pipeline."""
    runs = rank_correlation_runs(root)
    exps = {kind: res.get(compare_folder("task_il", "snv" if kind == "shapley" else f"snv-{kind}"),
                          method="snv", importance=kind) for kind in SCORES}
    n, _ = provenance(exps.values())
    body = []
    for kind, exp in exps.items():
        cells = ["1 (reference)" if kind == "shapley" and key in ("spearman_shapley", "topk_overlap")
                 else score_cell(runs, kind, key) if runs else NOT_RUN for key in SCORE_KEYS]
        body.append([kind] + cells + [Cell(exp).ours(n)])
    header = ["score", "Spearman with Shapley", "Spearman with removal effect", "top-k overlap",
              "seconds to score task 1", "final ACC, TIL (%)"]
    prov = (f"Rank columns: `rank_correlation.py`, n seeds: {len(runs)}. Final ACC: n seeds {n}. Shapley "
            "there is 200 Monte Carlo orderings without the bandit; final ACC is SNV's pipeline with "
            "`--importance <score>`.")
    return "\n\n".join(["### Neuron scores: agreement with Shapley, cost, and final accuracy", markdown(header, body),
                         prov])


ABLATIONS = (
    ("The paper-literal reading: a dense forward pass (no subnetwork at inference, no training through the mask)",
     (("task_il", "snv-dense", "TIL dense"), ("class_il", "snv-dense", "CIL dense"))),
    ("Selection: the top k over the whole network (the paper) or per layer in proportion to its size",
     (("task_il", "snv-perlayer", "TIL per-layer"),)),
    ("Training through the mask after selection (the default: 1 epoch at 5 epochs per task)",
     (("task_il", "snv-mft0", "TIL 0 epochs"), ("task_il", "snv-mft3", "TIL 3 epochs"),
      ("task_il", "snv-mft5", "TIL 5 epochs"), ("task_il", "snv-mft10", "TIL 10 epochs"))),
    ("Capacity c (the default 0.1 = 1/T)", (("task_il", "snv-c0.05", "TIL c = 0.05"), ("task_il", "snv-c0.2", "TIL c = 0.2"))),
    ("Reuse: task t's subnetwork B_{t-1} u S_t (the default) or S_t alone",
     (("task_il", "snv-noreuse", "TIL S_t alone"),)),
    ("Candidates: S_t among every neuron (the paper) or only among neurons not yet in B_{t-1}",
     (("task_il", "snv-free", "TIL free only"),
      ("task_il", "snv-free-mft5", "TIL free only + 5 mask epochs"),
      ("task_il", "snv-free-mft10", "TIL free only + 10 mask epochs"),
      ("task_il", "snv-free-perlayer-mft10", "TIL free only per layer + 10 mask epochs"),
      ("task_il", "snv-free-perlayer-mft10-noreuse", "TIL free only per layer + 10 mask epochs, S_t alone"),
      ("task_il", "snv-free-perlayer-mft10-noreuse-reset",
       "TIL free only per layer + 10 mask epochs, S_t alone, plastic neurons re-initialised"),
      ("task_il", "snv-free-perlayer-mft10-reset", "TIL free only per layer + 10 mask epochs, plastic neurons re-initialised"),
      ("task_il", "snv-free-perlayer-mft10-reset-rate0.25",
       "TIL free only per layer + 10 mask epochs, plastic neurons re-initialised, front-loaded (rho 0.25)"))),
)
"""The SNV ablations of run_experiments_compare.txt: (question, rows (scenario, folder name, label)); each row is
compared with the default SNV row of its scenario, seed by seed."""
ABLATION_METRICS = ("ACC", "BWT", "AF", "FWT", "CAP")


def frozen_fractions(run: dict) -> list[list[float]]:
    """[T, L]: the share of each layer in B_t after each task t, from a run's SNV records."""
    return [[f / n for f, n in zip(entry["frozen_per_layer"], run["layer_sizes"])] for entry in run["shapley"]]


def frozen_per_layer(exp: Experiment | None) -> str:
    """The mean share of each layer frozen after the last task, in %, e.g. '100/98/40/14' (— without SNV records)."""
    rows = [frozen_fractions(r)[-1] for r in (exp.runs if exp else []) if r.get("shapley")]
    return "/".join(f"{100 * v:.0f}" for v in np.mean(rows, axis=0)) if rows else NONE


def paired_diffs(exp: Experiment, default: Experiment, key: str = "ACC") -> list[float]:
    """exp's metric minus default's, seed by seed over the seeds both ran (in exp's order), scaled (ACC: points)."""
    base = {r["seed"]: r["metrics"].get(key) for r in default.runs}
    return [scaled(key, r["metrics"][key] - base[r["seed"]]) for r in exp.runs
            if r["metrics"].get(key) is not None and base.get(r["seed"]) is not None]


def paired_difference(exp: Experiment | None, default: Experiment | None, key: str = "ACC") -> str:
    """mean ± std over the seeds both ran of exp's metric minus default's, in points (n noted)."""
    if exp is None or default is None:
        return NOT_RUN if exp is None else NONE
    diffs = paired_diffs(exp, default, key)
    if not diffs:
        return NONE
    mean, std = stats(diffs)
    spread = f" ± {number(key, std)}" if len(diffs) > 1 else ""
    return f"{number(key, mean, signed=True)}{spread} (n={len(diffs)})"


RUN_BOOKKEEPING = ("out_dir", "seeds", "joint_results", "prune_analysis", "resume", "overwrite", "data_dir", "progress",
                   "no_figures")
"""Arguments that say where a run writes or what it records besides, never what it computes."""


def changed_flags(exp: Experiment, default: Experiment) -> str:
    """The settings in which `exp` differs from `default`, as CLI flags ('--mask-finetune-epochs 5'). A method
    flag that `default` predates counts at its registered default; RUN_BOOKKEEPING and other arguments one of
    them lacks are left out."""
    method = METHODS[exp.args["method"]]
    base = {f.dest: f.kwargs.get("default") for f in method.flags} | default.args
    mine = exp.args
    return " ".join(f"--{k.replace('_', '-')} {mine[k]}" for k in sorted(mine)
                    if k in base and k not in RUN_BOOKKEEPING and mine[k] != base[k])


def best_til_variant(res: Results) -> tuple[str, Experiment] | None:
    """The TIL SNV run of highest mean ACC among the default and its ablation variants that ran every seed of the
    default with BWT exactly 0 on each: (its flags, the run); None without a default TIL run."""
    default = compare_snv(res, "task_il", "snv")
    if default is None:
        return None
    seeds = {r["seed"] for r in default.runs}
    found = [compare_snv(res, s, name)
             for _, rows in ABLATIONS for s, name, _ in rows if s == "task_il"]
    eligible = [e for e in [default, *found] if e is not None and seeds <= {r["seed"] for r in e.runs}
                and all(r["metrics"].get("BWT") == 0.0 for r in e.runs)]
    best = max(eligible, key=lambda e: float(np.mean(e.values("ACC"))), default=default)
    return changed_flags(best, default) or "the default", best


def readings_table(res: Results) -> str:
    """TIL: the paper-literal dense SNV, the masked default and the best variant with BWT 0, next to PackNet (also
    with the epochs of training after selection its packnet-mft10 run took) and joint."""
    default = compare_snv(res, "task_il", "snv")
    joint = res.get(compare_folder("task_il", "joint"), scenario="task_il")
    best = best_til_variant(res)
    rows = [(DENSE_LABEL, compare_snv(res, "task_il", "snv-dense")),
            ("SNV, masked (the default)", default),
            (f"SNV, best with BWT 0 ({best[0]})" if best else "SNV, best with BWT 0", best[1] if best else None),
            (METHODS["packnet"].label, res.get(compare_folder("task_il", "packnet"), scenario="task_il"))]
    retrained = res.get(compare_folder("task_il", "packnet-mft10"), scenario="task_il")
    epochs = retrained.args["mask_finetune_epochs"] if retrained else "N"
    rows += [(f"{METHODS['packnet'].label}, {epochs} retraining epochs (--mask-finetune-epochs {epochs})", retrained),
             (METHODS["joint"].label, joint)]
    note = ("Best with BWT 0: the highest mean ACC among the default and its TIL ablation variants below that ran "
            "every seed of the default with BWT exactly 0 on each. It is chosen on these test accuracies, so it is "
            "a selection, not a held-out result. Intransigence: against the joint run of the same seed.")
    return runs_table("PMNIST, 10 tasks, TIL: SNV's readings against PackNet and joint (ours only)",
                      [(label, with_intransigence(e, joint)) for label, e in rows], note)


def ablation_tables(res: Results) -> str:
    """One table per SNV ablation question: the default SNV rows, each variant, and its paired ACC difference."""
    parts = ["### SNV ablations on PMNIST (comparison protocol; ours only)",
             "Each variant changes the settings its label names (one, except in the last table's combinations); "
             "Δ ACC is the variant minus the default SNV run of the same seed (mean ± std over the seeds both ran). "
             "Frozen per layer: the share of each layer in B_T."]
    for question, rows in ABLATIONS:
        scenarios = sorted({s for s, _, _ in rows}, key=SCENARIOS.index)
        defaults = {s: compare_snv(res, s, "snv") for s in scenarios}
        exps = [(f"{SHORT[s]} default", defaults[s], defaults[s]) for s in scenarios] + [
            (label, compare_snv(res, s, name), defaults[s]) for s, name, label in rows]
        n, prov = provenance(e for _, e, _ in exps)
        header = ["run"] + [column(k) for k in ABLATION_METRICS] + ["Δ ACC (points)", "frozen per layer (%)", "n"]
        body = [[label] + [Cell(e, k).ours(n) for k in ABLATION_METRICS]
                + [NONE if e is d else paired_difference(e, d), frozen_per_layer(e), str(e.n) if e else NONE]
                for label, e, d in exps]
        parts += [f"#### {question}", markdown(header, body), prov]
    return "\n\n".join(parts)


def with_intransigence(exp: Experiment | None, joint: Experiment | None) -> Experiment | None:
    """`exp` with Intransigence computed against `joint`'s run of the same seed wherever its seed JSON has none
    (the runs made without --joint-results); the joint run itself and seeds joint lacks stay as they are."""
    if exp is None or joint is None or exp is joint:
        return exp
    diag = {r["seed"]: np.diag(np.asarray(r["accuracy_matrix"], dtype=float)) for r in joint.runs}  # None -> nan
    runs = []
    for run in exp.runs:
        A = np.asarray(run["accuracy_matrix"], dtype=float)
        if run["metrics"].get("Intransigence") is None and diag.get(run["seed"], np.empty(0)).shape == A.shape[:1]:
            run = {**run, "metrics": {**run["metrics"], "Intransigence": metrics.intransigence(A, diag[run["seed"]])}}
        runs.append(run)
    return Experiment(exp.folder, runs)


TASK_INFERENCE_SUFFIX = "-taskinf"
"""The comparison's class-incremental runs that record every --task-inference rule: <method>-taskinf."""
TASK_ID = "task identified"
"""The column of the final task-identification accuracy (mean of the last row of the task-identification matrix)."""


def by_rule(exp: Experiment | None, rule: str) -> Experiment | None:
    """`exp` with each seed's metrics replaced by the rule's (task_inference in the seed JSON) and its final
    task-identification accuracy; None where a seed did not record the rule."""
    if exp is None or any(rule not in r.get("task_inference", {}).get("rules", {}) for r in exp.runs):
        return None
    runs = [{**r, "metrics": {**r["task_inference"]["rules"][rule]["metrics"],
                              TASK_ID: r["task_inference"]["rules"][rule]["task_id_final"]}} for r in exp.runs]
    return Experiment(exp.folder, runs)


def rule_rows(label: str, exp: Experiment | None) -> list[tuple[str, Experiment | None]]:
    """One row per --task-inference rule of a class_il run that recorded them all."""
    return [(f"{label}, {rule}", by_rule(exp, rule)) for rule in task_inference.RULES]


def task_id_table(title: str, rows: list[tuple[str, Experiment | None]], what: str) -> str:
    """ACC, task identification, BWT and AF of CIL runs; `what` opens the note (data, tasks)."""
    keys = ("ACC", TASK_ID, "BWT", "AF")
    n, prov = provenance(e for _, e in rows)
    body = [[label] + [Cell(e, k).ours(n) if e is not None and (k != TASK_ID or e.values(k)) else
                       NOT_RUN if e is None else NONE for k in keys] for label, e in rows]
    note = (f"{what}, CIL. One run per method and seed records every rule (`task_inference` in its seed JSON); the "
            "rule picks the task, that task's head the class. *task identified*: fraction of the test images whose "
            "task the rule picks, after the last task, mean over tasks. " + protocol_line(e for _, e in rows))
    return "\n\n".join([f"### {title}", note, markdown(["run"] + [column(k) for k in keys], body), prov])


def task_inference_table(res: Results) -> str:
    """Class-incremental without replay: each mask-based method's accuracy and task identification per
    --task-inference rule (all rules from the same runs), beside Eidetic with its replay-trained router and joint."""
    rows: list[tuple[str, Experiment | None]] = []
    for name, m in METHODS.items():
        if not m.task_inference:
            continue
        exp = res.get(compare_folder("class_il", name + TASK_INFERENCE_SUFFIX), method=name, scenario="class_il")
        if name == "eidetic":  # the method comparison's run: training as here, the router's accuracy matrix
            rows.append((f"{m.label} (with its replay-trained router)",
                         res.get(compare_folder("class_il", name), method=name, scenario="class_il")))
        rows += rule_rows(f"{m.label} (subnetworks only)" if name == "eidetic" else m.label, exp)
    rows.append((METHODS["joint"].label, res.get(compare_folder("class_il", "joint"), method="joint")))
    return task_id_table("Class-incremental without replay: task inference from the frozen subnetworks", rows,
                         "PMNIST, 10 tasks")


def compare_section(root: Path) -> str:
    """The comparison of every method in one harness, TIL and CIL, and the importance table."""
    res = Results(find_experiments(root))
    parts = []
    rows = [row for name, m in METHODS.items()
            for row in [(name, m.label, m)] + ([(f"{name}+gxd", f"{m.label} + GXD resets", m)]
                                               if name in GXD_VARIANTS else [])]
    for scenario in SCENARIOS:
        found = [(name, label, res.get(compare_folder(scenario, name), scenario=scenario))
                 for name, label, m in rows if scenario in m.scenarios]
        joint = next(e for name, _, e in found if name == "joint")
        exps = [(label, with_intransigence(e, joint)) for _, label, e in found]
        note = protocol_line(e for _, e in exps)
        note += " Intransigence: against the joint run of the same seed." if note else ""
        parts.append(runs_table(f"PMNIST, 10 tasks, {SHORT[scenario]}: every method (ours only)", exps, note))
    parts.append(importance_table(res, root))
    parts.append(readings_table(res))
    parts.append(ablation_tables(res))
    parts.append(task_inference_table(res))
    if res.warnings:
        parts.append("### Warnings\n\n" + "\n".join(f"- {w}" for w in sorted(set(res.warnings))))
    return "\n\n".join(parts)


QUICK_LABEL = "QUICK (CPU smoke test, not the paper's protocol)"


def report(results: Path) -> str:
    """The whole Markdown report of a results tree: the full protocol, then results/quick on its own."""
    head = ["# SNV reproduction: results against the paper", "",
            f"Generated by `python report.py --results {results}` from the seed JSONs under `{results}/`.",
            "*paper* = the paper's reported values (docs/paper.md section 4, `PAPER_REPORTED` in report.py); *ours* = "
            "mean ± std (population) over seeds, or the value alone where one seed ran; accuracies, BWT, FWT, AF "
            "and intransigence in %, PS and CAP as fractions; *gap* = ours mean - paper. \"not run\" = no results on "
            "this machine, \"n/a\" = the metric is undefined for these runs (e.g. intransigence without a joint run), "
            "\"—\" = no number to compare."]
    body = ["## Full protocol (seeds 42..51)", section(results, "", NOT_FULL_PROTOCOL)]
    quick = results / "quick"
    if quick.is_dir():
        body += [f"## {QUICK_LABEL}", f"CPU-sized settings from `run_experiments.sh --quick` (`{quick}/`): "
                 "few epochs and seeds, narrow ResNet, few Shapley orderings. Never compare these to the paper.",
                 section(quick, "QUICK", ())]
    compare = results / "compare"
    if compare.is_dir():
        body += [f"## {COMPARE_LABEL}", compare_section(compare)]
    return "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n"


# ----------------------------------------------------------------------------- generated blocks of the docs

class MissingRuns(Exception):
    """A generated block needs runs that the results tree does not have."""


def need(exp: Experiment | None, folder: str) -> Experiment:
    if exp is None:
        raise MissingRuns(folder)
    return exp


@dataclass
class DocResults:
    """The results a generated block reads: the paper-protocol tree and the comparison's, loaded once."""

    root: Path

    def __post_init__(self) -> None:
        self.full = Results(find_experiments(self.root, NOT_FULL_PROTOCOL))
        self.compare = Results(find_experiments(self.root / "compare"))

    def snv(self, name: str, scenario: str = "task_il") -> Experiment:
        """The comparison's SNV run `name` (a folder name of run_experiments_compare.txt without its prefix)."""
        return need(compare_snv(self.compare, scenario, name), compare_folder(scenario, name))

    def method(self, name: str, scenario: str = "task_il", variant: str = "") -> Experiment:
        """The comparison's run of method `name`, or of its `variant` folder (e.g. packnet-mft10)."""
        folder = compare_folder(scenario, variant or name)
        return need(self.compare.get(folder, scenario=scenario, method=name), folder)

    def paper(self, scenario: str, folder: str = "") -> Experiment:
        """A paper-protocol PMNIST SNV run: the main row, or `folder` under results/."""
        exp = self.full.main("pmnist", scenario, 10) if not folder else self.full.get(folder, scenario=scenario)
        return need(exp, folder or main_folder("pmnist", scenario, 10))


def pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def acc_text(exp: Experiment) -> str:
    """'95.92 ± 0.10 % (seeds 42, 43, 44)' or '92.78 % (seed 42)'."""
    seeds = ", ".join(str(r["seed"]) for r in exp.runs)
    return f"{mean_std(exp.values('ACC'), pct)} % (seed{'s' if exp.n > 1 else ''} {seeds})"


def acc_by_seed(exp: Experiment) -> dict[int, float]:
    """Each seed's ACC, in %."""
    return {r["seed"]: 100 * r["metrics"]["ACC"] for r in exp.runs}


def mean_acc(exp: Experiment) -> float:
    """Mean ACC over the seeds, in %."""
    return 100 * float(np.mean(exp.values("ACC")))


def on_seeds(default: Experiment, exp: Experiment) -> str:
    """default's mean ACC on the seeds exp ran: '92.90 % on seed 42' or '93.07 % on seeds 42, 43'."""
    seeds = [r["seed"] for r in exp.runs]
    base = acc_by_seed(default)
    if not set(seeds) <= set(base):
        raise MissingRuns(f"{default.folder} seeds {seeds}")
    acc = float(np.mean([base[s] for s in seeds]))
    return f"{acc:.2f} % on seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def seed_run(exp: Experiment, seed: int = 42) -> dict:
    run = next((r for r in exp.runs if r["seed"] == seed), None)
    if run is None:
        raise MissingRuns(f"{exp.folder} seed {seed}")
    return run


def final_accs(run: dict) -> list[float]:
    """Each task's test accuracy after the last task, in %."""
    return [100 * a for a in run["accuracy_matrix"][-1]]


def span(values: Iterable[float], digits: int = 1) -> str:
    """'93.9 to 95.1': the smallest and largest value."""
    values = list(values)
    return f"{min(values):.{digits}f} to {max(values):.{digits}f}"


def paired(exp: Experiment, base: Experiment) -> str:
    """exp's ACC minus base's on the seeds both ran, mean ± std in points with a sign: '+0.25 ± 0.04'."""
    diffs = paired_diffs(exp, base)
    if not diffs:
        raise MissingRuns(f"{base.folder}: a seed of {exp.folder}")
    return f"{diffs[0]:+.2f}" if len(diffs) == 1 else f"{float(np.mean(diffs)):+.2f} ± {float(np.std(diffs)):.2f}"


def shift_text(exp: Experiment, base: Experiment) -> str:
    """Which tasks gain and which lose, in final accuracy, from base to exp (mean over the seeds both ran)."""
    mine, theirs = ({r["seed"]: final_accs(r) for r in e.runs} for e in (exp, base))
    seeds = sorted(set(mine) & set(theirs))
    diff = np.mean([np.subtract(mine[s], theirs[s]) for s in seeds], axis=0)
    parts = []
    for verb, tasks in (("gain", [t for t, x in enumerate(diff) if x > 0]),
                        ("lose", [t for t, x in enumerate(diff) if x <= 0])):
        if tasks:
            names = (f"tasks {tasks[0] + 1} to {tasks[-1] + 1}" if tasks == list(range(tasks[0], tasks[-1] + 1))
                     else "tasks " + ", ".join(str(t + 1) for t in tasks))
            parts.append(f"{names} {verb} {abs(float(np.mean(diff[tasks]))):.2f} points on average")
    return " and ".join(parts)


def bwt_text(run: dict) -> str:
    return "BWT 0" if run["metrics"]["BWT"] == 0 else f"BWT {pct(run['metrics']['BWT'])}"


def new_neurons(run: dict) -> list[int]:
    """How many neurons each task added to B_t."""
    return [entry["newly_frozen"] for entry in run["shapley"]]


def full_after(run: dict, layer: int = 0) -> int | None:
    """The first task (from 1) after which `layer` is entirely in B_t, or None."""
    size = run["layer_sizes"][layer]
    return next((t + 1 for t, entry in enumerate(run["shapley"]) if entry["frozen_per_layer"][layer] == size), None)


def layer_quota(run: dict) -> list[int]:
    """k spread over the layers in proportion to their sizes: the per-layer selection's new neurons per task."""
    k, n = run["shapley"][0]["k"], run["num_neurons"]
    return [round(k * size / n) for size in run["layer_sizes"]]


def platforms(exps: Iterable[Experiment]) -> list[str]:
    return sorted({r["machine"].get("platform", "unknown") for e in exps for r in e.runs})


def in_short(d: DocResults) -> str:
    """README's summary: the paper-protocol rows against the paper, and the best zero-forgetting variant."""
    til, cil = d.paper("task_il"), d.paper("class_il")
    paper = PAPER_REPORTED["ten_tasks"]
    exact = all(forgets_nothing(r) for r in til.runs)
    best = best_til_variant(d.compare)
    default, packnet = d.snv("snv"), d.method("packnet")
    if best is None or best[1] is default:
        raise MissingRuns("an SNV ablation variant with BWT 0 on every seed")
    flags, exp = best
    pk10 = d.method("packnet", variant="packnet-mft10")
    gain, gap, gap10 = (mean_acc(exp) - mean_acc(e) for e in (default, packnet, pk10))
    versus = f"stays {-gap:.2f} below PackNet" if gap < 0 else f"is {gap:.2f} above PackNet"
    versus += (f" ({abs(gap10):.2f} {'below' if gap10 < 0 else 'above'} it when PackNet too trains "
               f"{epochs(pk10.args['mask_finetune_epochs'])} after selection)")
    return reflow(
        f"In short: task-incremental SNV {'forgets nothing, checked bit for bit, and ' if exact else ''}reaches "
        f"{mean_acc(til):.2f} % on PMNIST against the paper's {paper[('pmnist', 'task_il')]['ACC']:.2f} %. "
        f"Class-incremental SNV as the paper describes it reaches {mean_acc(cil):.2f} % against "
        f"{paper[('pmnist', 'class_il')]['ACC']:.2f} %: it collapses to the newest task; we report that as "
        f"measured. [docs/results.md](docs/results.md) explains both. The best zero-forgetting variant we found "
        f"(`{flags}`) gains {gain:.2f} points over the default at our CPU protocol and {versus}.")


def epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def reflow(text: str, width: int = 115) -> str:
    """Markdown prose re-wrapped to `width` columns: each paragraph and list item filled, tables left as they are."""
    out = []
    for block in text.strip("\n").split("\n\n"):
        if block.startswith("|"):
            out.append(block)
            continue
        items = re.split(r"\n(?=- )", block)
        out.append("\n".join(textwrap.fill(" ".join(item.split()), width, break_long_words=False,
                                            break_on_hyphens=False, subsequent_indent="  " if item.startswith("- ") else "")
                             for item in items))
    return "\n\n".join(out) + "\n"


def table_lines(markdown_text: str) -> str:
    """The table rows of a report.py section."""
    return "\n".join(line for line in markdown_text.splitlines() if line.startswith("|"))


def not_run_yet(missing: str) -> str:
    """The sentence on the comparison runs still missing seeds (`missing_seeds`)."""
    if not missing:
        return "Every command of `run_experiments_compare.txt` has run for all its seeds."
    return ("Not run yet (commands of `run_experiments_compare.txt`; `bash run_experiments.sh --compare --jobs 2` runs "
            f"the missing seeds): {missing}.")


def missing_seeds(root: Path, commands: Path) -> str:
    """The comparison runs of `commands` (run_experiments_compare.txt) with seeds missing under root/compare ("" if
    none)."""
    missing = []
    for line in commands.read_text().splitlines():
        if not line.startswith("python ") or "--out-dir" not in line:
            continue
        words = line.split()
        name = Path(words[words.index("--out-dir") + 1]).name
        seeds = words[words.index("--seeds") + 1:]
        seeds = [s for s in seeds[:next((i for i, w in enumerate(seeds) if w.startswith("--")), len(seeds))]
                 if not any((root / "compare" / "baselines" / name).glob(f"*seed{s}.json"))]
        if seeds:
            missing.append(f"`{name.removeprefix('pmnist_')}` (seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)})")
    return ", ".join(missing)


def ablation_findings(d: DocResults) -> str:
    """docs/results.md's "SNV ablations" text: what each of SNV's choices costs, every number read from the runs."""
    default, packnet = d.snv("snv"), d.method("packnet")
    d42, dflt, pk = seed_run(default), mean_acc(default), mean_acc(packnet)
    dense, dense_cil = d.snv("snv-dense"), d.snv("snv-dense", "class_il")
    mft0, mft3, mft5, mft10 = (d.snv(f"snv-mft{n}") for n in (0, 3, 5, 10))
    free, free5, free10 = d.snv("snv-free"), d.snv("snv-free-mft5"), d.snv("snv-free-mft10")
    perlayer, fpl = d.snv("snv-perlayer"), d.snv("snv-free-perlayer-mft10")
    fplr, noreuse = d.snv("snv-free-perlayer-mft10-reset"), d.snv("snv-noreuse")
    nore, nore_reset = d.snv("snv-free-perlayer-mft10-noreuse"), d.snv("snv-free-perlayer-mft10-noreuse-reset")
    c005, c02 = d.snv("snv-c0.05"), d.snv("snv-c0.2")
    til, cil = d.paper("task_il"), d.paper("class_il")
    til_dense, cil_dense = (d.paper(s, f"pmnist/snv_{s}_dense") for s in SCENARIOS)
    T = len(d42["accuracy_matrix"])
    k, quota = d42["shapley"][0]["k"], layer_quota(d42)
    gains, below = paired_diffs(fplr, fpl), [-x for x in paired_diffs(fplr, packnet)]
    best, top = mean_acc(fplr), best_til_variant(d.compare)
    top_acc = mean_acc(top[1]) if top else best
    rank = "the best variant measured" if top and top[1].folder == fplr.folder else "not the best variant measured"

    rate, pk10 = d.snv("snv-free-perlayer-mft10-reset-rate0.25"), d.method("packnet", variant="packnet-mft10")
    rate_run = rate.runs[0]
    variants = [e for _, rows in ABLATIONS for s, name, _ in rows
                if (e := compare_snv(d.compare, s, name)) is not None]
    old, new = platforms([default, compare_snv(d.compare, "class_il", "snv") or default]), platforms(variants)
    caveat = ""
    if old != new:
        pk_cil, pk_again = (seed_run(d.method("packnet", "class_il")),
                            seed_run(need(d.compare.get(compare_folder("class_il", "packnet" + TASK_INFERENCE_SUFFIX)),
                                          "packnet" + TASK_INFERENCE_SUFFIX)))
        caveat = (f" One caveat on those differences: the default SNV rows ran on {', '.join(f'`{p}`' for p in old)}, "
                  f"the variants on {', '.join(f'`{p}`' for p in new)} (their results' `machine`), and the same code "
                  f"and seed give other floats on another build: PackNet's CIL seed 42 run twice with the same "
                  f"training (`pmnist_class_il_packnet` and, for the task-inference table, "
                  f"`pmnist_class_il_packnet{TASK_INFERENCE_SUFFIX}`), on `{pk_cil['machine']['platform']}` and "
                  f"`{pk_again['machine']['platform']}`, has task 1 at {pct(pk_cil['accuracy_matrix'][0][0])} and "
                  f"{pct(pk_again['accuracy_matrix'][0][0])} % after training on it. Differences of a few tenths of a "
                  "point are within this effect; the ones discussed below are larger.")

    new_after_1 = [n for r in default.runs for n in new_neurons(r)[1:]]
    cap = float(np.mean(default.values("CAP")))
    f10 = seed_run(free10)
    fc1_full = full_after(f10)
    names = d42["layer_names"]
    if fc1_full is None:
        raise MissingRuns(f"{free10.folder}: {names[0]} never fills up")
    fpl_last = [final_accs(r) for r in fpl.runs]
    pl42 = seed_run(perlayer)
    fc1_growth = np.diff([0] + [e["frozen_per_layer"][0] for e in pl42["shapley"]])
    steady = next((t for t, g in enumerate(fc1_growth) if g != quota[0]), T)
    silent = seed_run(nore)["silent_units"]
    c42 = seed_run(c02)
    c_full, c_new = full_after(c42), new_neurons(c42)
    if c_full is None:
        raise MissingRuns(f"{c02.folder}: {names[0]} never fills up")
    worst = {r["seed"]: int(np.argmin(final_accs(r))) for r in nore.runs}
    nore_txt = "; ".join(f"seed {r['seed']}: {pct(r['metrics']['ACC'])} %, task {worst[r['seed']] + 1} at "
                         f"{final_accs(r)[worst[r['seed']]]:.1f} %, the others at "
                         f"{span(a for t, a in enumerate(final_accs(r)) if t != worst[r['seed']])} %" for r in nore.runs)
    late = all(t >= T - 3 for t in worst.values())
    lowest = (f"the lowest task is {'a late one' if late else 'not always a late one'} (task "
              f"{', '.join(str(t + 1) for t in worst.values())} on seed{'s' if len(worst) > 1 else ''} "
              f"{', '.join(map(str, worst))})" + (", which suggests that the leftovers are largely silent" if late else ""))
    reset_txt = "; ".join(f"seed {r['seed']}: {pct(r['metrics']['ACC'])} %, tasks {T - 2} to {T} at "
                          + ", ".join(f"{a:.1f}" for a in final_accs(r)[-3:])
                          + f" %, {names[-1]}'s silent units {span((u[-1] for u in r['silent_units']), 0)}"
                          for r in nore_reset.runs)
    c_more = "".join(f" Seed {r['seed']} gives {pct(r['metrics']['ACC'])} % ({bwt_text(r)}), tasks {T - 2} to {T} at "
                     f"{span(final_accs(r)[-3:])} %." for r in c02.runs if r["seed"] != 42)
    verdict = ("No configuration measured here beats PackNet." if top_acc < pk else
               "A configuration measured here is above PackNet.")
    return reflow(f"""\
Which of SNV's choices costs what, and whether a configuration that keeps exact zero forgetting reaches PackNet.
PMNIST, {T} tasks, at the comparison protocol (the "SNV ablations" block of `run_experiments_compare.txt`).
RESULTS.md, "SNV ablations on PMNIST", has one table per question, with each variant's ACC difference to the
default SNV run of the same seed, and the frozen share of each layer at the end.{caveat}

The paper-literal reading, the masked default and the best variant with BWT exactly 0 on every seed, next to
PackNet and joint:

{table_lines(readings_table(d.compare))}

(From RESULTS.md, written by `report.py`.)

**The paper-literal dense forward pass forgets.** With `--inference dense` (no subnetwork at inference, no
training through the mask), task-incremental ACC is {acc_text(dense)}, BWT
{mean_std(dense.values('BWT'), pct)}. Freezing a neuron's incoming weights does not protect an old task once
the plastic neurons it reads keep changing. In CIL, the dense reading gives {acc_text(dense_cil)} against the
masked default's {mean_acc(d.snv('snv', 'class_il')):.2f} %; both collapse to the newest task. At the paper's
protocol (seed 42; 20 epochs at batch 10 move the shared layers further), dense TIL gives
{pct(seed_run(til_dense)['metrics']['ACC'])} % ({bwt_text(seed_run(til_dense))}) against the masked
{pct(seed_run(til)['metrics']['ACC'])} %, and dense CIL {pct(seed_run(cil_dense)['metrics']['ACC'])} % against
{pct(seed_run(cil)['metrics']['ACC'])} %.

**Each task trains few neurons.** The paper picks S_t as the top k over every neuron, members of B_{{t-1}}
included. After task 1, only {np.mean(new_after_1):.0f} of the k = {k} selected neurons are new on average
({min(new_after_1)} to {max(new_after_1)} over tasks 2 to {T} and seeds
{', '.join(str(r['seed']) for r in default.runs)}); the others are already frozen. Task t then trains through a
subnetwork in which only those new neurons and its head can change, and {100 * (1 - cap):.0f} % of the network
is never used by any task (CAP {cap:.3f}). Three changes give each task more trainable neurons; each keeps BWT
exactly 0 (`test_snv.py` checks old tasks' logits bit for bit with `--candidates free` and several epochs
through the mask):
- **More epochs through the mask** (`--mask-finetune-epochs`; the default at this protocol is
  {epochs(d42['args']['mask_finetune_epochs'])}). Seed 42 goes from {pct(d42['metrics']['ACC'])} % to
  {pct(seed_run(mft3)['metrics']['ACC'])} % with 3 epochs, {pct(seed_run(mft5)['metrics']['ACC'])} % with 5 and
  {pct(seed_run(mft10)['metrics']['ACC'])} % with 10; 5 epochs give {acc_text(mft5)}, 10 give {acc_text(mft10)}. Without it (`--mask-finetune-epochs 0`, the paper's procedure read
  literally) ACC is {acc_text(mft0)}: a task's subnetwork keeps the weights it had in the dense network, and task
  1's subnetwork scores {100 * seed_run(mft0)['shapley'][0]['v_members']:.1f} % on validation right after
  selection.
- **Only free candidates** (`--candidates free`). Every task adds exactly k new neurons, and the network is full
  after task {T}. With the global top k this fills {names[0]} first: at seed 42 with 10 epochs through the mask,
  {names[0]} is full after task {fc1_full}, tasks {fc1_full + 1} to {T} get no new {names[0]} neuron, and they end
  at {', '.join(f'{a:.1f}' for a in final_accs(f10)[fc1_full:])} % ({pct(f10['metrics']['ACC'])} % overall;
  {pct(seed_run(free5)['metrics']['ACC'])} % with 5 epochs). Tasks 1 to {fc1_full - 1} reach
  {span(final_accs(f10)[:fc1_full - 1])} %. Over all its seeds, 10 epochs give {acc_text(free10)}. With the default's {epochs(d42['args']['mask_finetune_epochs'])} through the mask,
  free candidates alone give {acc_text(free)} against the default's {on_seeds(default, free)}.
- **Per-layer quotas alone** (`--selection per-layer`, every neuron a candidate) change little:
  {acc_text(perlayer)} against the default's {on_seeds(default, perlayer)}, and on seed 42
  {names[0]} to {names[-1]} end {frozen_per_layer(Experiment(perlayer.folder, [pl42]))} % frozen against
  {frozen_per_layer(Experiment(default.folder, [d42]))} %. In {names[0]} the top
  {quota[0]} of each task are new neurons ({names[0]} grows by {quota[0]} per task through task {steady}), so
  {names[0]} fills up either way.
- **Free candidates with per-layer quotas** (`--candidates free --selection per-layer`). Every task adds
  {'/'.join(map(str, quota))} new neurons to {'/'.join(names)}. With 10 epochs through the mask this gives
  {acc_text(fpl)}: {mean_acc(fpl) - dflt:.2f} points above the default and {pk - mean_acc(fpl):.2f} below
  PackNet's {pk:.2f} %.
- **The same with every plastic neuron re-initialised before each task** (`--reset gxd --reset-rate 1.0`,
  reuse on): {acc_text(fplr)}, {rank}. It is {span(gains, 2)} points above the
  same run without resets on each seed, {best - dflt:.2f} above the default, and {pk - best:.2f} below PackNet
  ({min(below):.2f} to {max(below):.2f} below it on each seed). Every task reaches
  {span(a for r in fplr.runs for a in final_accs(r))} % after task {T}.

[The frozen share of each layer after each task](../figures/compare/frozen_per_layer_by_selection.png) (mean
over seeds) shows the three rules: the paper's global top k, free candidates (global), and free candidates
per layer.

**Late tasks get the leftovers.** With free candidates per layer, tasks 1 to 5 reach
{np.mean([a for row in fpl_last for a in row[:5]]):.1f} % on average and tasks {T - 2} to {T} only
{span(a for row in fpl_last for a in row[-3:])} %, although each task gets the same quota of new neurons per
layer. Reuse of earlier frozen neurons is not what costs them. With `--reuse off` (each task through its own S_t
alone): {nore_txt}. The neurons left for the last tasks are the ones no earlier task selected. Many neurons stop
firing as training goes on: on each task's validation data, {names[-1]} has {silent[0][-1]} silent units after
task 1 and {silent[-1][-1]} after task {T} (`silent_units`, seed 42). Task {T} then has exactly the last
{quota[-1]} free neurons of each layer. Through S_t alone, {lowest}. With reuse on, the frozen neurons a late task also reads make up for them.
Re-initialising every plastic neuron before each task (`--reset gxd --reset-rate 1.0`, still S_t alone) brings
the late tasks back: {reset_txt}. So most of what the late tasks lose is plasticity, not capacity. With reuse on
and the same resets (the best variant above), tasks {T - 2} to {T} reach
{span(a for r in fplr.runs for a in final_accs(r)[-3:])} %, and {names[-1]} has at most
{max(r['silent_units'][-1][-1] for r in fplr.runs)} silent units after task {T}.

**Reuse is forward transfer.** At the paper's selection, a task that runs through its own S_t alone
(`--reuse off`) gives {acc_text(noreuse)} against the default's {on_seeds(default, noreuse)};
reading earlier tasks' frozen neurons is worth about
{-float(np.mean(paired_diffs(noreuse, default))):.1f}
points there.

**A larger capacity trades late tasks for early ones.** With c = {c42['args']['sparsity']} (seed 42), ACC is
{pct(c42['metrics']['ACC'])} % ({bwt_text(c42)}). Tasks 1 to 3 reach {span(final_accs(c42)[:3])} % through their
subnetworks, but the network fills up: {names[0]} is fully frozen after task {c_full} and
{100 * c42['shapley'][-1]['frozen_total'] / c42['num_neurons']:.0f} % of all neurons by task {T}. Tasks
{c_full} to {T} get {', '.join(map(str, c_new[c_full - 1:]))} new neurons, and tasks {T - 2} to {T} end at
{span(final_accs(c42)[-3:])} %.{c_more} A smaller capacity starves every task instead: with c =
{c005.args['sparsity']}, each task selects {c005.runs[0]['shapley'][0]['k']} neurons, ACC is {acc_text(c005)}
with BWT {mean_std(c005.values('BWT'), pct)}, and its tasks end at
{span(a for r in c005.runs for a in final_accs(r))} %.

**{verdict}** The variant with free candidates, per-layer quotas, 10 epochs through the mask and resets is
{abs(pk - best):.2f} points {'below' if best < pk else 'above'} PackNet over {fplr.n} seeds (PackNet minus it, seed by
seed: {min(below):.2f} to {max(below):.2f} points). Given the same {epochs(pk10.args['mask_finetune_epochs'])}
of training after selection (`--mask-finetune-epochs`; the PackNet row retrains
{epochs(packnet.args['mask_finetune_epochs'])}), PackNet reaches {acc_text(pk10)}, {paired(pk10, packnet)}
points over its row on the same seeds.

These runs point to the number of neurons as SNV's limit here. Neuron-level freezing at c = {d42['args']['sparsity']} gives each
task {'/'.join(map(str, quota))} new neurons in {'/'.join(names)} (plus read access to the frozen neurons of earlier
tasks). Task 1, which has nothing to read from, reaches {span(final_accs(r)[0] for r in fplr.runs)} % with 10 epochs
through the mask and resets. PackNet keeps {100 * (1 - seed_run(packnet)['args']['packnet_prune']):.0f} % of the
free weights of the full layers for each task, so its first tasks get far more: tasks 1 to 4 reach
{span(a for r in packnet.runs for a in final_accs(r)[:4])} % and tasks {T - 2} to {T}
{span(a for r in packnet.runs for a in final_accs(r)[-3:])} %. Front-loading SNV's new neurons the same way
(`--capacity-rate {rate.args['capacity_rate']}`, PackNet's share, fixed before the run; no other value was tried:
task t takes k_t = max(rho F_t, F_t / (T - t + 1)) of the F_t free neurons, here {', '.join(str(e['k']) for e in rate_run['shapley'])})
gives {acc_text(rate)}, {paired(rate, fplr)} points against the same run with k = {k} for every task, on the
same seeds. It takes PackNet's profile: tasks 1 to 4 reach {span(a for r in rate.runs for a in final_accs(r)[:4])} %
and tasks {T - 2} to {T} {span(a for r in rate.runs for a in final_accs(r)[-3:])} %. Per task, against k = {k}:
{shift_text(rate, fplr)}. A task does gain from more neurons, but {rate_run['num_neurons']} are not enough to give the early tasks more
without taking it from the late ones.

{not_run_yet(missing_seeds(d.root, Path(__file__).resolve().parent / 'run_experiments_compare.txt'))}
""")


SCORE_NAMES = {"taylor": "Taylor", "gxd": "GXD", "activation": "activation"}
"""The one-backward-pass scores as importance_findings names them."""


def importance_findings(d: DocResults) -> str:
    """docs/results.md's bullets on the neuron scores: what each costs SNV, and how it ranks against Shapley."""
    default = d.snv("snv")
    base = acc_by_seed(default)
    exps = {kind: d.snv(f"snv-{kind}") for kind in SCORES if kind != "shapley"}
    ranks = rank_correlation_runs(d.root / "compare")
    if not ranks:
        raise MissingRuns("rank_correlation_seed*.json")
    cheap = sorted(SCORE_NAMES, key=lambda kind: -mean_acc(exps[kind]))
    seed_sets = {kind: [r["seed"] for r in exps[kind].runs] for kind in cheap}
    costs = [-float(np.mean(paired_diffs(exps[kind], default))) for kind in cheap]
    seeds = sorted({s for kind in cheap for s in seed_sets[kind]})
    same = all(seed_sets[kind] == seeds for kind in cheap)
    shapley_acc = float(np.mean([base[s] for s in seeds]))

    def rank(kind: str, key: str) -> float:
        return float(np.mean([r["scores"][kind][key] for r in ranks]))

    task_secs = [e["seconds"] for r in default.runs for e in r["shapley"]]
    mag = exps["magnitude"]
    per_layer = {tuple(e["selected_per_layer"]) for r in mag.runs for e in r["shapley"]}
    per_layer |= {tuple(r["scores"]["magnitude"]["topk_per_layer"]) for r in ranks}
    names = default.runs[0]["layer_names"]
    on = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    if len(per_layer) == 1 and list(per_layer)[0][1:] == (0,) * (len(names) - 1):
        magnitude = (f"Global top-k on raw weight-row L1 norms takes all {list(per_layer)[0][0]} neurons from "
                     f"{names[0]}, whose rows have 784 inputs against 200 for the other layers. The per-layer counts "
                     f"are {list(list(per_layer)[0])} in every ablation run and rank-correlation file. So "
                     f"{names[1]}–{names[-1]} of each subnetwork hold only constants, and its output does not depend "
                     "on the input.")
    else:
        magnitude = f"Its per-layer counts: {sorted(per_layer)}."
    taylor = rank("taylor", "spearman_removal")
    return reflow(f"""\
- **Importance.** Swapping Shapley for a one-backward-pass score costs {min(costs):.1f}–{max(costs):.1f} points of
  final TIL ACC ({on}): {', '.join(f'{SCORE_NAMES[k]} {mean_acc(exps[k]):.2f}' + ('' if same else f' (n={exps[k].n})')
                           for k in cheap)}, against Shapley's {shapley_acc:.2f} on
  {('the same seed' + ('s' if len(seeds) > 1 else '')) if same else 'these seeds (each difference taken on the seeds its score ran)'}. The cheap scores cost at
  most {max(r['scores'][k]['seconds'] for r in ranks for k in cheap):.2f} s on task 1; 200 Monte Carlo orderings
  for every neuron cost {np.mean([r['scores']['shapley']['seconds'] for r in ranks]):.0f} s (rank-correlation
  files, {len(ranks)} seed{'s' if len(ranks) > 1 else ''}). Inside SNV the bandit drops settled neurons from the
  walks, so a task's estimate takes {min(task_secs):.0f}–{max(task_secs):.0f} s
  (`results/compare/baselines/pmnist_task_il_snv`). Random selection gives {acc_text(exps['random'])}.
- **Magnitude fails completely:** {acc_text(mag)}. {magnitude}
- **Agreement with Shapley is moderate.** Every cheap score's Spearman correlation with Shapley is at most
  {max(rank(k, 'spearman_shapley') for k in exps):.2f} (mean over the rank-correlation files). Taylor instead
  matches the measured single-neuron removal effect{' almost perfectly' if taylor > 0.95 else ''} ({taylor:.2f}).
  Shapley's ranking is not the removal effect (Spearman {rank('shapley', 'spearman_removal'):.2f}): it credits
  neurons for what they add inside coalitions, not only alone.
""")


STANDIN_INPUTS = {"cifar100": "CIFAR-100 (32×32)", "tinyimagenet": "TinyImageNet (64×64)",
                  "imagenet1k": "ImageNet-1k (224×224 crops of JPEGs)"}
"""rehearse_standins.sh's stand-ins and the input each is read as."""


def rehearsal_table(d: DocResults) -> str:
    """Every run of results/rehearsal (rehearse_standins.sh): the stand-in, its scale, its time and BWT."""
    header = ["stand-in (input)", "width (N neurons)", "score", "orderings per task (cap)", "processes",
              "threads each", "wall time (s)", "scoring per task (s)", "V(S) evaluations per task", "A after task 2 (%)", "BWT"]
    body = []
    for folder, exp in sorted(find_experiments(d.root / "rehearsal").items(),
                              key=lambda kv: (list(STANDIN_INPUTS).index(kv[1].args["dataset"]), kv[0])):
        for r in exp.runs:
            a = r["args"]
            shapley = a.get("importance", "shapley") == "shapley"
            body.append([STANDIN_INPUTS[a["dataset"]], f"{a['width']} ({r['num_neurons']})", a.get("importance", "shapley"),
                         str(a["max_permutations"]) if shapley else NONE,
                         "2" if folder.endswith("torchrun2") else "1", str(r["machine"].get("threads", "?")),
                         f"{r['seconds']:.1f}",
                         ", ".join(f"{e['seconds']:.1f}" for e in r["shapley"]),
                         ", ".join(str(e["evaluations"]) for e in r["shapley"]) if shapley else NONE,
                         ", ".join(f"{100 * v:.2f}" for v in r["accuracy_matrix"][-1]), seed_cell(r, "BWT")])
    if not body:
        raise MissingRuns("rehearsal")
    return markdown(header, body)


DOC_BLOCKS: dict[str, Callable[[DocResults], str]] = {
    "in-short": in_short,
    "readings-table": lambda d: table_lines(readings_table(d.compare)),
    "seeds-table": lambda d: table_lines(seeds_table(d.full)),
    "ablations": ablation_findings,
    "importance": importance_findings,
    "importance-table": lambda d: importance_table(d.compare, d.root / "compare").split("\n\n", 1)[1],
    "rehearsal-table": rehearsal_table,
}
"""The generated blocks of README.md and docs/: a block <!-- generated: NAME --> ... <!-- end generated --> holds
what DOC_BLOCKS[NAME] writes from the results tree (`python report.py --docs FILE ...` rewrites them)."""
BLOCK = re.compile(r"^(<!-- generated: (\S+) -->\n)(.*?)^(<!-- end generated -->)$", re.S | re.M)
"""A generated block: its opening and closing lines, each a line of its own."""
OPEN, CLOSE = re.compile(r"^<!-- generated: ", re.M), re.compile(r"^<!-- end generated -->$", re.M)


def fill_blocks(text: str, docs: DocResults) -> str:
    """`text` with each generated block rewritten from the results; ValueError on an unknown or unclosed block."""
    opened = len(OPEN.findall(text))
    if opened != len(BLOCK.findall(text)) or opened != len(CLOSE.findall(text)):
        raise ValueError("a '<!-- generated: NAME -->' line has no matching '<!-- end generated -->'")

    def one(m: re.Match) -> str:
        name = m.group(2)
        if name not in DOC_BLOCKS:
            raise ValueError(f"unknown generated block {name!r}; known: {', '.join(DOC_BLOCKS)}")
        try:
            body = DOC_BLOCKS[name](docs)
        except MissingRuns as e:
            body = f"(Not generated: the results lack `{e}`; run its command of run_experiments.sh, then " \
                   "`python report.py --docs` again.)"
        return m.group(1) + body.rstrip("\n") + "\n" + m.group(4)

    return BLOCK.sub(one, text)


# ----------------------------------------------------------------------------- figures

def run_figures(exp: Experiment, out: Path) -> list[Path]:
    """Accuracy matrix, Shapley heatmap and capacity per layer of the experiment's first seed."""
    run = exp.runs[0]
    return utils.plot_run(run, out / exp.folder / f"seed{run['seed']}")


def capacity_figure(res: Results, path: Path) -> None:
    series: dict[str, tuple[list[float], list[float], list[float] | None]] = {}
    for dataset in ("cifar100", "tinyimagenet"):
        for method in ("snv", "wsn"):
            cs, means, stds = [], [], []
            for c in CAPACITIES:
                exp = (res.get(capacity_folder(dataset, c), dataset=dataset, method="snv", sparsity=float(c))
                       if method == "snv" else res.baseline("wsn", dataset, "task_il", 10, sparsity=float(c)))
                if exp is not None and exp.values("ACC"):
                    mean, std = stats(exp.values("ACC"))
                    cs.append(float(c))
                    means.append(100 * mean)
                    stds.append(100 * std)
            if cs:
                series[f"{DATASETS[dataset]} {method.upper()} (ours)"] = (cs, means, stds)
        paper = PAPER_REPORTED["capacity"][dataset]
        for i, method in enumerate(("SNV", "WSN")):
            series[f"{DATASETS[dataset]} {method} (paper)"] = ([float(c) for c in CAPACITIES],
                                                                [paper[c][i] for c in CAPACITIES], None)
    utils.plot_capacity_sweep(series, path)


def pruning_figure(res: Results, path: Path) -> bool:
    """Fig. 4's curves (mean ± std over seeds); False if no pruning run exists."""
    curves = {}
    for label, exp in pruning_experiments(res):
        if exp is None:
            continue
        runs = [r["pruning"] for r in exp.runs]
        columns = list(zip(*(p["avg_accuracy"] for p in runs)))
        mean_std = [stats([100 * a for a in col]) for col in columns]
        curves[label] = (runs[0]["rates"], [m for m, _ in mean_std], [s for _, s in mean_std])
    if curves:
        utils.plot_pruning_curves(curves, path)
    return bool(curves)


SELECTION_RULES = (("global top k (the paper)", "snv"), ("per-layer quotas", "snv-perlayer"),
                   ("global, free candidates, 10 mask epochs", "snv-free-mft10"),
                   ("per-layer, free candidates, 10 mask epochs", "snv-free-perlayer-mft10"))
"""The TIL comparison runs whose frozen fraction per layer frozen_by_rule_figure draws: (title, folder name)."""


def frozen_by_rule_figure(res: Results, path: Path) -> bool:
    """The frozen fraction of each layer after each task, mean over seeds, one panel per run of SELECTION_RULES;
    False if none of them exists."""
    series, names = {}, None
    for title, name in SELECTION_RULES:
        exp = compare_snv(res, "task_il", name)
        if exp is None:
            continue
        names = exp.runs[0]["layer_names"]
        series[f"{title}, n={exp.n}"] = np.mean([frozen_fractions(r) for r in exp.runs], axis=0)
    if series:
        utils.plot_frozen_by_rule(series, names, path)
    return bool(series)


def figures(results: Path, out: Path) -> list[Path]:
    """Every figure of the full tree into `out`, of results/quick into `out`/quick; returns the paths written."""
    written: list[Path] = []
    for root, dest, exclude in ((results, out, NOT_FULL_PROTOCOL), (results / "quick", out / "quick", ())):
        if not root.is_dir():
            continue
        res = Results(find_experiments(root, exclude))
        for exp in res.experiments.values():
            written += run_figures(exp, dest)
        if res.experiments:
            capacity_figure(res, dest / "capacity_sweep.png")
            written.append(dest / "capacity_sweep.png")
        if pruning_figure(res, dest / "pruning_curves.png"):
            written.append(dest / "pruning_curves.png")
    path = out / "compare" / "frozen_per_layer_by_selection.png"
    if (results / "compare").is_dir() and frozen_by_rule_figure(Results(find_experiments(results / "compare")), path):
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"), help="the results tree of run_experiments.sh")
    p.add_argument("--out", type=Path, default=None, help="Markdown file (default RESULTS.md unless --figures)")
    p.add_argument("--figures", action="store_true", help="draw the figures into --figures-dir")
    p.add_argument("--figures-dir", type=Path, default=Path("figures"))
    p.add_argument("--docs", type=Path, nargs="+", default=[], metavar="FILE",
                   help="rewrite the generated blocks (<!-- generated: NAME -->) of these Markdown files")
    args = p.parse_args(argv)
    if args.out is None and not args.figures and not args.docs:
        args.out = Path("RESULTS.md")
    if args.out is not None:
        args.out.write_text(report(args.results))
        print(f"wrote {args.out}")
    if args.figures:
        print(f"wrote {len(figures(args.results, args.figures_dir))} figures under {args.figures_dir}")
    if args.docs:
        docs = DocResults(args.results)
        filled = {}
        for path in args.docs:
            try:
                filled[path] = fill_blocks(path.read_text(), docs)
            except (OSError, ValueError) as e:
                print(f"error: {path}: {e}; nothing was written", file=sys.stderr)
                return 2
        for path, text in filled.items():
            path.write_text(text)
            print(f"{path}: {len(BLOCK.findall(text))} generated block(s) written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
