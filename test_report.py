"""Tests of report.py (tables from fake results), run_experiments.sh (dry runs) and train.pruning_curve."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import report
import train
from models import build_model

HERE = Path(__file__).resolve().parent
DEVICE = "cpu (test-cpu)"


def fake_run(seed: int, acc: float, dataset: str = "cifar100", scenario: str = "task_il", tasks: int = 10,
             method: str = "snv", sparsity: float | None = None, **extra) -> dict:
    """A seed JSON with the fields report.py reads; ACC = `acc`, BWT = -acc / 100."""
    A = [[acc if j <= i + 1 else None for j in range(3)] for i in range(3)]
    return {"args": {"dataset": dataset, "scenario": scenario, "num_tasks": tasks, "method": method,
                     "sparsity": sparsity if sparsity is not None else 1 / tasks},
            "seed": seed, "device": DEVICE, "machine": {"host": "testhost", "cpus": 2, "torch": "x"},
            "accuracy_matrix": A, "layer_sizes": [2, 2], "layer_names": ["a", "b"],
            "shapley": [{"phi": [0.1, 0.2, 0.0, -0.1], "frozen_per_layer": [1, t]} for t in range(3)],
            "metrics": {"ACC": acc, "BWT": -acc / 100, "FWT": None, "AF": 0.0, "PS": 0.5, "P": 0.5, "S": 0.5,
                        "Intransigence": None, "AvgAcc": acc, "CAP": 0.1}, **extra}


def write_runs(folder: Path, runs: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for r in runs:
        (folder / f"seed{r['seed']}.json").write_text(json.dumps(r))


def row_after(text: str, title: str, label: str) -> list[str]:
    """The cells of the `ours` row labelled `label` and the next two (paper, gap) in the table titled `title`."""
    table = text.split(f"### {title}", 1)[1].split("\n### ", 1)[0]
    lines = table.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(f"| {label} | ours"))
    return [[c.strip() for c in lines[k].strip("|").split("|")] for k in range(i, i + 3)]


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A results tree: CIFAR-100 TIL-10 (2 seeds), a capacity point, an sgd bound with pruning in one of its 2 seeds,
    quick runs, a misfiled run."""
    root = tmp_path / "results"
    write_runs(root / "cifar100/snv_task_il_T10", [fake_run(42, 0.70), fake_run(43, 0.74)])
    write_runs(root / "capacity/cifar100_c0.03", [fake_run(42, 0.60, sparsity=0.03)])
    write_runs(root / "cifar100/snv_class_il_T10", [fake_run(42, 0.5, scenario="task_il")])
    pruning = {"rates": [0, 50, 90], "avg_accuracy": [0.8, 0.6, 0.2], "critical_percentage": 90}
    write_runs(root / "bounds/pmnist_sgd_task_il", [fake_run(42, 0.8, dataset="pmnist", method="sgd", pruning=pruning),
                                                    fake_run(43, 0.6, dataset="pmnist", method="sgd")])
    write_runs(root / "quick/cifar100/snv_task_il_T10", [fake_run(42, 0.30), fake_run(43, 0.30)])
    return root


def test_report_tables(tree: Path) -> None:
    text = report.report(tree)
    full, quick = text.split(f"## {report.QUICK_LABEL}")
    ours, paper, gap = row_after(full, "10 tasks, task-incremental (c = 0.1): SNV", "CIFAR-100")
    assert ours[2] == "72.00 ± 2.00" and paper[2] == "76.19" and gap[2] == "-4.19"
    assert ours[3] == "-0.72 ± 0.02" and paper[3] == "0.00" and gap[3] == "-0.72"
    assert ours[5] == report.UNDEFINED and gap[5] == report.NONE  # FWT undefined, no paper number
    ours, _, _ = row_after(full, "10 tasks, task-incremental (c = 0.1): SNV", "PMNIST")
    assert set(ours[2:]) == {report.NOT_RUN}
    ours, paper, gap = row_after(full, "ImageNet-1k, ResNet-18: ACC (%)", "SNV")
    assert set(ours[2:]) == {report.NOT_RUN} and paper[2] == "41.30" and set(gap[2:]) == {report.NONE}
    ours, paper, gap = row_after(full, "Table 3, CIFAR-100: task-incremental, 10 tasks, ACC (%) against capacity c",
                                 "c = 0.03")
    assert ours[2] == "60.00 (n=1)" and paper[2] == "71.74" and gap[2] == "-11.74" and ours[3] == "not run"
    ours, _, _ = row_after(full, "Table 3, CIFAR-100: task-incremental, 10 tasks, ACC (%) against capacity c",
                           "c = 0.1")
    assert ours[2] == "72.00 ± 2.00"  # c = 0.1 is the main TIL-10 run
    assert "n seeds: 1/2 per run" in full and DEVICE in full and "testhost" in full
    assert "| PMNIST TIL SGD (lower bound) | 90.0 | — | 80.00 | 60.00 | 20.00 | 1 |" in full
    assert "| PMNIST TIL SNV | not run |" in full
    assert "| PMNIST TIL T=10 SGD (lower bound) | 70.00 ± 10.00 |" in full  # both seeds in the bounds table
    assert "| CIFAR-100 TIL SNV | not run |" in full
    assert "`cifar100/snv_class_il_T10` holds" in full  # a folder with other settings is ignored, with a warning
    assert "30.00" not in full  # quick results never appear in the full tables
    ours, _, gap = row_after(quick, "QUICK: 10 tasks, task-incremental (c = 0.1): SNV", "CIFAR-100")
    assert ours[2] == "30.00 ± 0.00" and gap[2] == "-46.19"
    assert "### 10 tasks" not in quick
    assert "### Neuron scores against Monte Carlo Shapley (task 1; ours only)\n\nnot run." in full


def test_report_comparison_runs(tmp_path: Path) -> None:
    root = tmp_path / "results"
    write_runs(root / "baselines/pmnist_task_il_ewc-lambda100_T10",
               [fake_run(42, 0.5, dataset="pmnist", method="ewc"), fake_run(43, 0.7, dataset="pmnist", method="ewc")])
    write_runs(root / "baselines/cifar100_wsn_c0.03", [fake_run(42, 0.55, method="wsn", sparsity=0.03)])
    (root / "baselines/rc").mkdir(parents=True)
    for seed, rho in ((42, 0.2), (43, 0.4)):
        scores = {"shapley": {"seconds": 9.0}, "random": {"seconds": 0.0, "spearman_shapley": rho,
                                                          "spearman_removal": 0.0, "topk_overlap": 0.1}}
        (root / f"baselines/rc/rank_correlation_seed{seed}.json").write_text(json.dumps(
            {"seed": seed, "device": DEVICE, "args": {"dataset": "pmnist"}, "scores": scores}))
    text = report.report(root)
    assert "| `pmnist_task_il_ewc-lambda100_T10` | 60.00 ± 10.00 |" in text
    assert "| reference: PMNIST TIL SNV | not run |" in text
    assert "| random | 0.300 ± 0.100 | 0.000 ± 0.000 | 0.100 ± 0.000 | 0.000 ± 0.000 |" in text  # 2 seeds
    ours, paper, gap = row_after(text, "Table 3, CIFAR-100: task-incremental, 10 tasks, ACC (%) against capacity c",
                                 "c = 0.03")
    assert ours[3] == "55.00" and paper[3] == "59.65" and gap[3] == "-4.65"  # WSN found by its settings


def test_report_compare_section(tmp_path: Path) -> None:
    root = tmp_path / "results"
    runs = {"task_il_snv": ("snv", "task_il", "shapley", 0.9), "task_il_snv-random": ("snv", "task_il", "random", 0.8),
            "class_il_ewc": ("ewc", "class_il", "shapley", 0.3)}
    for name, (method, scenario, importance, acc) in runs.items():
        seeds = [fake_run(s, acc + (s - 42) / 100, dataset="pmnist", scenario=scenario, method=method) for s in (42, 43)]
        for r in seeds:
            r["args"].update(importance=importance, batch_size=64, epochs=5)
            r["metrics"]["Intransigence"] = 0.02 if r["seed"] == 42 else None  # a joint run for seed 42 only
        write_runs(root / f"compare/baselines/pmnist_{name}", seeds)
    text = report.report(root)
    full, compare = text.split(f"## {report.COMPARE_LABEL}")
    assert "| reference: PMNIST TIL SNV | not run |" in full and "pmnist_task_il_snv" not in full
    til, cil, importance = compare.split("\n### ")[1:4]
    assert "| SNV | 90.50 ± 0.50 |" in til and "| 2.00 (n=1) |" in til and "| EWC | not run |" in til and "batch_size=64" in til
    assert "| EWC | 30.50 ± 0.50 |" in cil and "| SNV | not run |" in cil and "WSN" not in cil
    assert importance.count("| random | not run | not run | not run | not run | 80.50 ± 0.50 |") == 1
    assert "| shapley | 1 (reference) | not run | 1 (reference) | not run | 90.50 ± 0.50 |" in importance


def test_compare_intransigence_against_the_joint_run_of_the_same_seed(tmp_path: Path) -> None:
    base = tmp_path / "compare/baselines"
    joint = [fake_run(s, 0.9, dataset="pmnist", scenario="class_il", method="joint") for s in (42, 43)]
    joint[1]["accuracy_matrix"] = [[0.95, None, None], [0.9, 0.85, None], [0.9, 0.9, 0.75]]
    ewc = [fake_run(s, 0.6, dataset="pmnist", scenario="class_il", method="ewc") for s in (42, 43, 44)]
    ewc[0]["metrics"]["Intransigence"] = 0.5  # written by train.py --joint-results: kept as it is
    write_runs(base / "pmnist_class_il_joint", joint)
    write_runs(base / "pmnist_class_il_ewc", ewc)
    cil = report.compare_section(tmp_path / "compare").split("\n### ")[1]
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[6] for line in cil.splitlines()
             if line.startswith("| ") and not line.startswith("| run")}
    # seed 43: mean of a*_k - A_kk = (0.35, 0.25, 0.15) -> 25 %; seed 44 has no joint run
    assert cells["EWC"] == "37.50 ± 12.50 (n=2)" and cells["Joint (upper bound)"] == "n/a"
    assert "against the joint run of the same seed" in cil


def test_main_tables_take_intransigence_from_the_joint_bound_of_the_same_seed(tmp_path: Path) -> None:
    root = tmp_path / "results"
    snv = [fake_run(s, 0.9, dataset="pmnist") for s in (42, 43)]
    joint = [fake_run(42, 0.95, dataset="pmnist", method="joint")]
    joint[0]["accuracy_matrix"] = [[0.95, None, None], [0.9, 0.85, None], [0.9, 0.9, 0.75]]
    write_runs(root / "pmnist/snv_task_il", snv)
    write_runs(root / "bounds/pmnist_joint_task_il", joint)
    text = report.report(root)
    ours = row_after(text, "10 tasks, task-incremental (c = 0.1): SNV", "PMNIST")[0]
    # seed 42: mean of a*_k - A_kk = (0.95 - 0.9, 0.85 - 0.9, 0.75 - 0.9) -> -5 %; seed 43 has no joint run
    assert ours[7] == "-5.00 (n=1)"
    seeds = text.split("### PMNIST, 10 tasks, the paper's protocol: every seed", 1)[1].split("\n### ", 1)[0]
    assert "| TIL SNV | 42 | 90.00 | 0 exactly | n/a | 0.00 | 0.500 | -5.00 | 0.100 |" in seeds
    assert "| TIL SNV | 43 | 90.00 | 0 exactly | n/a | 0.00 | 0.500 | n/a | 0.100 |" in seeds
    assert "| TIL Joint (upper bound) | 42 | 95.00 | -0.95 | n/a | 0.00 | 0.500 | n/a | 0.100 |" in seeds
    assert "| `pmnist/snv_task_il` (snv, pmnist, TIL, T=10, c=0.1) | 90.00 ± 0.00 | -0.90 ± 0.00 | n/a | 0.00 ± 0.00 " \
           "| 0.500 ± 0.000 | n/a |" in text  # the all-folders table shows the JSONs as recorded


def test_report_cli_and_figures(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tree), "--out", str(out)]) == 0
    assert out.read_text().startswith("# SNV reproduction")
    figs = tmp_path / "figures"
    assert report.main(["--results", str(tree), "--figures", "--figures-dir", str(figs)]) == 0
    for name in ("cifar100/snv_task_il_T10/seed42/accuracy_matrix.png", "cifar100/snv_task_il_T10/seed42/capacity.png",
                 "cifar100/snv_task_il_T10/seed42/shapley_heatmap.png", "capacity_sweep.png", "pruning_curves.png",
                 "quick/cifar100/snv_task_il_T10/seed42/accuracy_matrix.png"):
        assert (figs / name).is_file(), name
    write_runs(tree / "compare" / "baselines" / "pmnist_task_il_snv", [fake_run(42, 0.9, dataset="pmnist")])
    assert report.main(["--results", str(tree), "--figures", "--figures-dir", str(figs)]) == 0
    assert (figs / "compare" / "frozen_per_layer_by_selection.png").is_file()


def test_report_empty_tree(tmp_path: Path) -> None:
    text = report.report(tmp_path / "nothing")
    assert "not run" in text and "nothing in this table has been run yet" in text
    assert not re.search(r"\d+\.\d+ ±", text)


# ----------------------------------------------------------------------------- run_experiments.sh

def dry_run(tmp_path: Path, *flags: str) -> str:
    env = {**os.environ, "SNV_RESULTS_DIR": str(tmp_path / "res"), "PYTHON": "python"}
    proc = subprocess.run(["bash", "run_experiments.sh", "--dry-run", *flags], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "res").exists()  # a dry run writes nothing
    return proc.stdout


def commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("python train.py")]


def test_script_is_bash_clean() -> None:
    assert subprocess.run(["bash", "-n", "run_experiments.sh"], cwd=HERE).returncode == 0


def test_seeds_table_lists_every_pmnist_seed_and_only_exact_zero_bwt_as_exact(tmp_path: Path) -> None:
    root = tmp_path / "results"
    kept = [[0.9, None], [0.9, 0.8]]
    cancelled = [[0.9, None], [0.95, 0.8]]  # task 1 changed; BWT recorded as 0 would still not be "exact"
    runs = [dict(fake_run(seed, 0.85, dataset="pmnist", method=m), accuracy_matrix=A, seconds=600.0,
                 git_commit=f"{seed}abcdef0")
            for seed, m, A in ((42, "snv", kept), (43, "snv", cancelled))]
    for r in runs:
        r["metrics"]["BWT"] = 0.0
    write_runs(root / "pmnist/snv_task_il", runs)
    dense = fake_run(42, 0.5, dataset="pmnist")
    dense["args"]["inference"] = "dense"
    write_runs(root / "pmnist/snv_task_il_dense", [dense])
    write_runs(root / "pmnist/snv_class_il_dense", [fake_run(42, 0.1, dataset="pmnist", scenario="class_il")])
    res = report.Results(report.find_experiments(root))
    table = report.seeds_table(res)
    assert "| TIL SNV | 42 | 85.00 | 0 exactly | n/a | 0.00 | 0.500 | n/a | 0.100 | 10 | 42abcde |" in table
    assert "| TIL SNV | 43 | 85.00 | 0.00 | n/a |" in table
    assert "| TIL SNV, paper-literal (--inference dense) | 42 | 50.00 | 0 exactly |" in table
    assert "| TIL SNV, re-run with the lean step (issue 21) | — | not run |" in table
    # a folder whose runs are not what its name says is left out, with a warning
    assert "| CIL SNV, paper-literal (--inference dense) | — | not run |" in table
    assert any("pmnist/snv_class_il_dense" in w for w in res.warnings)
    assert "| CIL Joint (upper bound) | — | not run |" in table and "machine: testhost" in table
    assert "Nothing run yet." in report.seeds_table(report.Results({}))


def test_splitmnist_table_reads_its_settings_from_the_results(tmp_path: Path) -> None:
    root = tmp_path / "results"
    profile = {"width": 8, "epochs": 10, "batch_size": 64, "shapley_eval_batches": 2, "max_permutations": 30}
    snv = fake_run(42, 0.9, dataset="splitmnist", tasks=5)
    snv["args"].update(profile)
    sgd = fake_run(42, 0.6, dataset="splitmnist", tasks=5, method="sgd")
    sgd["args"].update(profile, width=None)
    write_runs(root / "splitmnist/snv_task_il", [snv])
    write_runs(root / "splitmnist/sgd_task_il", [sgd])
    table = report.splitmnist_table(report.Results(report.find_experiments(root)))
    assert ("Protocol read from the results: width=8/None, epochs=10, batch_size=64, lr=None, optimizer=None, "
            "max_permutations=30, shapley_eval_batches=2 (**the runs differ in a setting**).") in table
    assert "| TIL SNV | 90.00 |" in table and "| CIL SNV | not run |" in table
    assert report.splitmnist_table(report.Results({})).count("Protocol read") == 0


def test_dry_run_lists_every_group(tmp_path: Path) -> None:
    text = dry_run(tmp_path)
    cmds = commands(text)
    res = tmp_path / "res"
    for group in ("bounds", "pmnist", "splitmnist", "cifar100", "tinyimagenet", "imagenet1k", "capacity",
                  "pruning", "baselines"):
        assert f"## group {group}" in text
    expected = [f"{ds}/snv_{sc}{sfx}" for sc in ("task_il", "class_il") for ds, sfx in
                [("pmnist", ""), ("cifar100", "_T10"), ("cifar100", "_T20"), ("tinyimagenet", "_T10"),
                 ("tinyimagenet", "_T20"), ("imagenet1k", "_T10"), ("imagenet1k", "_T20"), ("imagenet1k", "_T50")]]
    expected += [f"bounds/cifar100_{m}_class_il_T20" for m in ("sgd", "joint")]
    expected += ["splitmnist/snv_class_il", "splitmnist/sgd_task_il"]
    for folder in expected:
        mine = [c for c in cmds if c.split("--out-dir ")[1].split()[0] == f"{res}/{folder}"]
        assert len(mine) == 11, folder  # one call per seed, then one --resume call writing the summary
        assert mine[-1].endswith("--seeds 42 43 44 45 46 47 48 49 50 51 --resume")
    assert any("--num-tasks 50" in c and "imagenet1k" in c for c in cmds)
    main_runs = [c for c in cmds if "/capacity/" not in c and "/baselines/" not in c and "--sparsity 0.1" not in c]
    assert main_runs and all("--sparsity" not in c for c in main_runs)  # c = 1/T, train.py's default
    for c in ("0.03", "0.05", "0.3", "0.5"):
        assert any(f"--sparsity {c}" in x and f"capacity/tinyimagenet_c{c}" in x for x in cmds), c
    assert all("--prune-analysis" in c for c in cmds if " train.py " in c)  # Fig. 4 from every run
    assert all("--width 8 --epochs 10 --shapley-eval-batches 2 --max-permutations 30" in c
               for c in cmds if "splitmnist" in c)
    assert not any("/quick/" in c for c in cmds)


def test_dry_run_only_capacity(tmp_path: Path) -> None:
    cmds = commands(dry_run(tmp_path, "--only", "capacity"))
    folders = {c.split("--out-dir ")[1].split()[0] for c in cmds}
    assert folders == {str(tmp_path / "res" / f) for f in
                       ["cifar100/snv_task_il_T10", "tinyimagenet/snv_task_il_T10"]
                       + [f"capacity/{d}_c{c}" for d in ("cifar100", "tinyimagenet") for c in ("0.03", "0.05", "0.3", "0.5")]}
    for c in ("0.03", "0.05", "0.1", "0.3", "0.5"):
        assert any(f"--sparsity {c} " in x for x in cmds), c


def test_quick_dry_run_writes_under_quick(tmp_path: Path) -> None:
    text = dry_run(tmp_path, "--quick", "--only", "pmnist,cifar100")
    cmds = commands(text)
    assert "QUICK mode" in text and cmds
    assert all(f"--out-dir {tmp_path / 'res' / 'quick'}/" in c for c in cmds)
    assert all("--epochs" in c and "--max-permutations 5" in c for c in cmds)
    assert all("--width 16" in c for c in cmds if "cifar100" in c)
    assert all(c.endswith(("--seeds 42", "--seeds 43", "--seeds 42 43 --resume")) for c in cmds)


def test_dry_run_resumes_and_skips(tmp_path: Path) -> None:
    res = tmp_path / "res"
    done = res / "pmnist/snv_task_il"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"runs": list(range(42, 52))}))
    partial = res / "pmnist/snv_class_il"
    partial.mkdir(parents=True)
    (partial / "seed42.json").write_text("{}")
    (partial / "checkpoint_seed43.pt").write_text("")
    joint = res / "bounds/pmnist_joint_class_il"
    joint.mkdir(parents=True)
    (joint / "seed44.json").write_text("{}")
    env = {**os.environ, "SNV_RESULTS_DIR": str(res)}
    proc = subprocess.run(["bash", "run_experiments.sh", "--dry-run", "--only", "pmnist"], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    dense = [c for c in commands(proc.stdout) if "_dense " in c]
    cmds = [c for c in commands(proc.stdout) if c not in dense]
    assert len(dense) == 2 * 10 + 2 and all("--inference dense" in c for c in dense)  # every seed + a summary each
    assert f"# skipped: {done}/summary.json" in proc.stdout
    assert not any(f"{done} " in c for c in cmds)
    seeds = {c.split("--seeds ")[1] for c in cmds}
    assert "42" not in seeds and "43 --resume" in seeds and f"44 --joint-results {joint}/seed44.json" in seeds
    assert "45" in seeds and "42 43 44 45 46 47 48 49 50 51 --resume" in seeds


def test_dry_run_baselines_file(tmp_path: Path) -> None:
    listing = tmp_path / "baselines.txt"
    listing.write_text("# comment\n\n"
                       "python rank_correlation.py --dataset pmnist --seeds 42 43 --out-dir results/rc\n"
                       "python train.py --dataset pmnist --scenario task_il --method ewc --ewc-lambda 100 "
                       "--seeds 42 43 44 --out-dir results/pmnist_task_il_ewc-lambda100_T10\n"
                       "python train.py --dataset pmnist --scenario class_il --method snv --importance random "
                       "--seeds 42 43 --out-dir results/pmnist_class_il_snv-random_T10\n"
                       "python train.py --dataset pmnist --method snv --reset gxd --seeds 42 --out-dir results/g\n"
                       "python train.py --dataset pmnist --method snv --reset none --seeds 42 --out-dir results/n\n")
    res = tmp_path / "res"
    (res / "bounds/pmnist_joint_class_il").mkdir(parents=True)
    (res / "bounds/pmnist_joint_class_il/seed43.json").write_text("{}")
    (res / "baselines/pmnist_task_il_ewc-lambda100_T10").mkdir(parents=True)
    (res / "baselines/pmnist_task_il_ewc-lambda100_T10/checkpoint_seed42.pt").write_text("")  # interrupted
    for name in ("g", "n"):
        (res / f"baselines/{name}").mkdir()
        (res / f"baselines/{name}/checkpoint_seed42.pt").write_text("")
    env = {**os.environ, "SNV_RESULTS_DIR": str(res), "SNV_BASELINES_FILE": str(listing)}
    proc = subprocess.run(["bash", "run_experiments.sh", "--dry-run", "--only", "baselines"], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"python rank_correlation.py --dataset pmnist --out-dir {res}/baselines/rc --seeds 42 43" in lines
    ewc = [x for x in commands(proc.stdout) if "ewc-lambda100" in x]
    assert ewc[0] == (f"python train.py --dataset pmnist --scenario task_il --method ewc --ewc-lambda 100 --prune-analysis "
                      f"--out-dir {res}/baselines/pmnist_task_il_ewc-lambda100_T10 --seeds 42 --overwrite")  # not continued
    assert [x.split("--seeds ")[1] for x in ewc[1:]] == ["43", "44", "42 43 44 --resume"]
    for name, first in (("g", "42 --overwrite"), ("n", "42 --resume")):  # a reset's checkpoint is not continued
        assert [x.split("--seeds ")[1] for x in commands(proc.stdout) if f"baselines/{name} " in x] == [
            first, "42 --resume"]
    snv = [x for x in commands(proc.stdout) if "snv-random" in x]
    assert [x.split("--seeds ")[1] for x in snv] == [
        "42", f"43 --joint-results {res}/bounds/pmnist_joint_class_il/seed43.json", "42 43 --resume"]
    assert any("bounds/pmnist_joint_task_il" in x for x in lines)  # the bounds come with the baselines group


def test_compare_dry_run(tmp_path: Path) -> None:
    text = dry_run(tmp_path, "--compare")
    cmds = [c for c in text.splitlines() if c.startswith("python ")]
    res = tmp_path / "res" / "compare" / "baselines"
    assert "COMPARE mode" in text and "## group bounds" not in text
    listed = [x for x in (HERE / "run_experiments_compare.txt").read_text().splitlines() if x.startswith("python ")]
    folders = {x.split("--out-dir results/")[1] for x in listed}
    assert {c.split("--out-dir ")[1].split()[0] for c in cmds} == {f"{res}/{f}" for f in folders}
    for method in ("snv", "sgd", "joint", "ewc", "si", "lwf", "packnet", "wsn", "eidetic"):
        for scenario in ("task_il",) + (("class_il",) if method != "wsn" else ()):
            assert f"pmnist_{scenario}_{method}" in folders, (method, scenario)
    assert all("--batch-size 64 --epochs 5" in c and "--dataset pmnist" in c for c in cmds)
    assert all(c.split("--seeds ")[1].split(" --")[0] in ("42", "43", "44", "42 43 44") for c in cmds)


@pytest.mark.parametrize("flags", [["--compare", "--quick"], ["--compare", "--only", "pmnist"]])
def test_compare_refuses_other_campaigns(flags: list[str]) -> None:
    proc = subprocess.run(["bash", "run_experiments.sh", "--dry-run", *flags], cwd=HERE,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error:" in proc.stderr


def test_bad_group_is_refused() -> None:
    proc = subprocess.run(["bash", "run_experiments.sh", "--dry-run", "--only", "nope"], cwd=HERE,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown group nope" in proc.stderr


# ----------------------------------------------------------------------------- Fig. 4 pruning analysis

def test_pruning_analysis(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--width", "32", "--epochs", "3", "--mask-finetune-epochs", "1",
            "--max-permutations", "4", "--shapley-eval-batches", "1", "--seeds", "0", "--no-figures",
            "--no-progress", "--prune-analysis", "--out-dir", str(out)]
    assert train.main(argv) == 0
    result = json.loads((out / "seed0.json").read_text())
    curve = result["pruning"]
    assert curve["rates"] == list(range(0, 95, 5)) and len(curve["avg_accuracy"]) == 19
    assert curve["avg_accuracy"][0] == pytest.approx(result["metrics"]["ACC"], abs=1e-12)
    assert curve["avg_accuracy"][-1] != curve["avg_accuracy"][0]
    half = curve["avg_accuracy"][0] / 2
    expected = next((r for r, a in zip(curve["rates"], curve["avg_accuracy"]) if a < half), None)
    assert curve["critical_percentage"] == expected


def test_pruning_curve_restores_weights_and_prunes_backbone_only(tmp_path: Path) -> None:
    bench = train.datasets.get_benchmark("synthetic", 2, 0, None)
    args = train.resolve_args(train.build_parser().parse_args(
        ["--dataset", "synthetic", "--num-tasks", "2", "--out-dir", str(tmp_path), "--device", "cpu"]))
    torch.manual_seed(0)
    model = build_model("mlp", bench.input_shape, 16)
    for _ in range(2):
        model.add_head(bench.classes_per_task)
    state = train.State(torch.zeros(model.num_neurons, dtype=torch.bool))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[float] = []
    heads = [h.weight for h in model.heads]
    original_evaluate = train.evaluate

    def spy(model_, split, task, upto, *rest):
        """Record the fraction of zero backbone weights; heads stay untouched."""
        w = torch.cat([layer.producer.weight.flatten() for layer in model_.layers])
        seen.append(float((w == 0).float().mean()))
        assert all(torch.equal(h, before[f"heads.{i}.weight"]) for i, h in enumerate(heads))
        assert upto == 1
        return original_evaluate(model_, split, task, upto, *rest)

    train.evaluate = spy
    try:
        curve = train.pruning_curve(model, bench, state, args, torch.device("cpu"))
    finally:
        train.evaluate = original_evaluate
    assert len(curve["avg_accuracy"]) == 19
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(0.9, abs=1e-3)  # 2 tasks per rate
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ----------------------------------------------------------------------------- the committed report

def test_committed_results_md_is_the_report_of_the_committed_results(monkeypatch) -> None:
    monkeypatch.chdir(HERE)
    assert report.report(Path("results")) == (HERE / "RESULTS.md").read_text(), \
        "RESULTS.md is stale: run python report.py --results results --out RESULTS.md"


DOCS = ["README.md", *sorted(p.relative_to(HERE).as_posix() for p in HERE.glob("docs/*.md"))]


def test_generated_blocks_of_the_docs_are_up_to_date(monkeypatch) -> None:
    """Every number of a generated block in README.md and docs/ is what report.py writes from the committed
    results, and every block of report.DOC_BLOCKS appears somewhere."""
    monkeypatch.chdir(HERE)
    docs = report.DocResults(Path("results"))
    for doc in DOCS:
        text = (HERE / doc).read_text()
        assert report.fill_blocks(text, docs) == text, \
            f"{doc}'s generated blocks are stale: run python report.py --docs {' '.join(DOCS)}"
    names = {m.group(2) for doc in DOCS for m in report.BLOCK.finditer((HERE / doc).read_text())}
    assert names == set(report.DOC_BLOCKS), "every generated block is used in the docs"


def test_fill_blocks_rewrites_only_the_blocks_and_refuses_unknown_or_unclosed_ones(tmp_path: Path) -> None:
    docs = report.DocResults(tmp_path)  # an empty results tree: every block lacks its runs
    text = "# Title\nkept\n<!-- generated: readings-table -->\nold\n<!-- end generated -->\nkept too\n"
    filled = report.fill_blocks(text, docs)
    assert filled.startswith("# Title\nkept\n<!-- generated: readings-table -->\n")
    assert filled.endswith("\n<!-- end generated -->\nkept too\n") and "old" not in filled
    assert report.fill_blocks(text.replace("readings-table", "ablations"), docs).count("Not generated: the results lack")
    mention = "Put `<!-- generated: NAME -->` and `<!-- end generated -->` lines around a block.\n"
    assert report.fill_blocks(mention, docs) == mention  # prose about the markers is not a block
    with pytest.raises(ValueError, match="unknown generated block 'nope'"):
        report.fill_blocks(text.replace("readings-table", "nope"), docs)
    with pytest.raises(ValueError, match="no matching"):
        report.fill_blocks(text.replace("<!-- end generated -->\n", ""), docs)
    doc = tmp_path / "doc.md"
    doc.write_text(text.replace("readings-table", "nope"))
    assert report.main(["--results", str(tmp_path), "--docs", str(doc)]) == 2
    assert doc.read_text() == text.replace("readings-table", "nope")


def test_missing_seeds_lists_the_comparison_runs_without_their_seed_files(tmp_path: Path) -> None:
    commands = tmp_path / "commands.txt"
    commands.write_text("# a comment\n"
                        "python train.py --method snv --seeds 42 43 44 --out-dir results/pmnist_task_il_snv\n"
                        "python train.py --seeds 42 --method sgd --out-dir results/pmnist_task_il_sgd\n"
                        "python rank_correlation.py --seeds 42 43 --out-dir results/rank\n")
    (tmp_path / "compare" / "baselines" / "rank").mkdir(parents=True)
    (tmp_path / "compare" / "baselines" / "rank" / "rank_correlation_seed42.json").write_text("{}")
    write_runs(tmp_path / "compare" / "baselines" / "pmnist_task_il_snv", [fake_run(43, 0.9)])
    assert report.missing_seeds(tmp_path, commands) == "`task_il_snv` (seeds 42, 44), `task_il_sgd` (seed 42), " \
                                                       "`rank` (seed 43)"
    write_runs(tmp_path / "compare" / "baselines" / "pmnist_task_il_snv", [fake_run(s, 0.9) for s in (42, 44)])
    write_runs(tmp_path / "compare" / "baselines" / "pmnist_task_il_sgd", [fake_run(42, 0.9)])
    (tmp_path / "compare" / "baselines" / "rank" / "rank_correlation_seed43.json").write_text("{}")
    assert report.missing_seeds(tmp_path, commands) == ""
    assert "has run for all its seeds" in report.not_run_yet("")


def test_reflow_fills_paragraphs_and_list_items_and_keeps_tables() -> None:
    table = "| a | b |\n|---|---|\n| " + "x " * 80 + "| 1 |"
    text = "word " * 40 + "\n\n- item " + "y " * 60 + "\n- short\n\n" + table + "\n"
    out = report.reflow(text, width=50)
    prose, items, kept = out.split("\n\n")
    assert all(len(line) <= 50 for line in prose.splitlines() + items.splitlines())
    assert " ".join(prose.split()) == " ".join(("word " * 40).split())
    assert items.startswith("- item y") and items.endswith("\n- short")
    assert all(line.startswith(("- ", "  ")) for line in items.splitlines())
    assert kept == table + "\n"


def table_blocks(lines: list[str]) -> list[tuple[list[str], str]]:
    """Each Markdown table of `lines` with the first non-blank line after it."""
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        after = next((x for x in lines[j:] if x.strip()), "")
        blocks.append((lines[i:j], after))
        i = j
    return blocks


def copied_tables(markdown: str) -> list[list[str]]:
    """The tables of `markdown` copied from RESULTS.md: with mean ± std cells, or followed by "(From RESULTS.md"
    or by report.py's "n seeds:" line."""
    return [rows for rows, after in table_blocks(markdown.splitlines())
            if after.startswith(("(From RESULTS.md", "n seeds:")) or any("±" in r for r in rows)]


@pytest.mark.parametrize("doc", DOCS)
def test_tables_copied_from_results_md_match_it(doc: str) -> None:
    """Every table that README.md or a docs/ page copies from RESULTS.md is verbatim in RESULTS.md; README.md and
    docs/results.md have such tables."""
    generated = set((HERE / "RESULTS.md").read_text().splitlines())
    copied = copied_tables((HERE / doc).read_text())
    assert copied or doc not in ("README.md", "docs/results.md"), f"{doc} has no table copied from RESULTS.md"
    stale = [r for rows in copied for r in rows if r not in generated]
    assert not stale, f"{doc} rows not in RESULTS.md (copy them again from it): {stale}"


@pytest.mark.parametrize("doc", [d for d in DOCS if d != "docs/paper.md"])  # paper.md quotes the papers' numbers
def test_every_mean_and_std_in_the_docs_is_one_of_results_md(doc: str) -> None:
    """A "mean ± std" typed into prose goes stale when a seed is added; each must still be in RESULTS.md (the
    generated blocks, which hold paired differences too, are checked against report.py by their own test)."""
    generated = (HERE / "RESULTS.md").read_text()
    typed = report.BLOCK.sub("", (HERE / doc).read_text())
    stale = [m for m in re.findall(r"\d+\.\d+ ± \d+\.\d+", typed) if m not in generated]
    assert not stale, f"{doc}: {stale} are not in RESULTS.md; update them from it (or use a generated block)"


def test_copied_tables_are_recognised() -> None:
    """A table counts as copied when it has ± cells or is followed by report.py's "(From RESULTS.md" or "n seeds:"."""
    rows = ["| run | ACC (%) |", "|---|---|", "| SNV | 93.07 ± 0.21 |"]
    assert copied_tables("\n".join(rows) + "\n") == [rows]
    assert copied_tables("\n".join(rows[:2] + ["| SNV | 93.07 |"]) + "\n\n(From RESULTS.md, written by report.py)\n")
    assert copied_tables("\n".join(rows[:2] + ["| SNV | 93.07 |"]) + "\nn seeds: 1 per run\n")
    assert not copied_tables("\n".join(rows[:2] + ["| SNV | 93.07 |"]) + "\n\nsome text\n")


def test_ablation_tables_pair_each_variant_with_the_default_of_the_same_seed(tmp_path: Path) -> None:
    root = tmp_path / "compare"
    base = root / "baselines"
    write_runs(base / "pmnist_task_il_snv", [fake_run(s, a, dataset="pmnist") for s, a in ((42, 0.90), (43, 0.80))])
    # seeds 42 and 44: only 42 is paired; 0.95 - 0.90 = +5 points. frozen per layer: [1, 2] of [2, 2] -> 50/100
    write_runs(base / "pmnist_task_il_snv-c0.2", [fake_run(s, a, dataset="pmnist", sparsity=0.2)
                                                  for s, a in ((42, 0.95), (44, 0.70))])
    text = report.compare_section(root)
    table = text.split("#### Capacity c", 1)[1].split("####", 1)[0]
    row = next(line for line in table.splitlines() if line.startswith("| TIL c = 0.2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "82.50 ± 12.50" and cells[6] == "+5.00 (n=1)" and cells[7] == "50/100" and cells[8] == "2"
    default = next(line for line in table.splitlines() if line.startswith("| TIL default |"))
    assert "| — | 50/100 | 2 |" in default
    assert "| TIL c = 0.05 | not run |" in table
    two = [fake_run(s, a, dataset="pmnist", sparsity=0.2) for s, a in ((42, 0.95), (43, 0.70))]
    diff = report.paired_difference(report.Experiment("x", two), report.load_experiment(base / "pmnist_task_il_snv", "d"))
    assert diff == "-2.50 ± 7.50 (n=2)"  # +5 and -10 points: the spread is unsigned


def test_best_til_variant_needs_every_seed_of_the_default_and_zero_bwt(tmp_path: Path) -> None:
    base = tmp_path / "compare" / "baselines"

    def runs(acc: float, seeds=(42, 43), bwt: float = 0.0, **args) -> list[dict]:
        out = [fake_run(s, acc, dataset="pmnist") for s in seeds]
        for r in out:
            r["args"].update({"mask_finetune_epochs": 1, "out_dir": "x", "overwrite": False, "progress": True, **args})
            r["metrics"]["BWT"] = bwt if r["seed"] == 43 else 0.0
        return out

    write_runs(base / "pmnist_task_il_snv", runs(0.90))
    res = report.Results(report.find_experiments(tmp_path / "compare"))
    assert report.best_til_variant(res)[0] == "the default"
    # the default predates --candidates: it counts at its registered default, "all"
    write_runs(base / "pmnist_task_il_snv-mft5", runs(0.95, mask_finetune_epochs=5, out_dir="y", candidates="free",
                                                      overwrite=True, progress=False))  # bookkeeping: not flags
    write_runs(base / "pmnist_task_il_snv-mft10", runs(0.99, seeds=(42,), mask_finetune_epochs=10))  # seed 43 missing
    write_runs(base / "pmnist_task_il_snv-c0.2", runs(0.99, bwt=-0.01, sparsity=0.2))  # forgets on seed 43
    write_runs(base / "pmnist_task_il_snv-dense", runs(0.50, bwt=-0.4, inference="dense"))
    res = report.Results(report.find_experiments(tmp_path / "compare"))
    flags, best = report.best_til_variant(res)
    assert flags == "--candidates free --mask-finetune-epochs 5" and best.folder.endswith("snv-mft5")
    table = report.readings_table(res)
    assert "| SNV, best with BWT 0 (--candidates free --mask-finetune-epochs 5) | 95.00 ± 0.00 |" in table
    assert "| SNV, paper-literal (--inference dense) | 50.00 ± 0.00 |" in table


FAKE_TRAIN = '''
import json, sys, time
from pathlib import Path
args = sys.argv[2:]  # after "train.py"
out, seeds = Path(args[args.index("--out-dir") + 1]), []
for a in args[args.index("--seeds") + 1:]:
    if a.startswith("--"):
        break
    seeds.append(int(a))
start = time.time()
if "--resume" not in args:
    time.sleep(1.0)
with open(sys.argv[1], "a") as log:
    log.write(json.dumps({"out": out.name, "seeds": seeds, "summary": "--resume" in args, "start": start,
                          "end": time.time()}) + "\\n")
if seeds == [13]:
    sys.exit(3)  # this seed fails
out.mkdir(parents=True, exist_ok=True)
name = "summary.json" if "--resume" in args else f"seed{seeds[0]}.json"
(out / name).write_text(json.dumps({"runs": seeds}))
'''


def real_run(tmp_path: Path, jobs: str, seeds: tuple[str, str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """run_experiments.sh --compare on two fake experiments, train.py replaced by a script logging its runs."""
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    log = tmp_path / "runs.jsonl"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\n[[ $1 == -c ]] && exec {sys.executable} "$@"\n'
                    f'exec {sys.executable} {tmp_path / "fake_train.py"} {log} "$@"\n')
    fake.chmod(0o755)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"python train.py --dataset pmnist --method sgd --seeds {s} --out-dir results/e{i}\n"
                               for i, s in enumerate(seeds)))
    env = {**os.environ, "SNV_RESULTS_DIR": str(tmp_path / "res"), "SNV_BASELINES_FILE": str(listing),
           "PYTHON": str(fake)}
    proc = subprocess.run(["bash", "run_experiments.sh", "--compare", "--jobs", jobs], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, [json.loads(line) for line in log.read_text().splitlines()]


def most_at_once(runs: list[dict]) -> int:
    return max(sum(r["start"] <= q["start"] < r["end"] for r in runs) for q in runs)


@pytest.mark.parametrize("jobs", ["1", "3"])
def test_run_experiments_runs_seeds_in_parallel_and_summarises_after_them(tmp_path: Path, jobs: str) -> None:
    proc, runs = real_run(tmp_path, jobs, ("1 2", "3 4"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seeds = [r for r in runs if not r["summary"]]
    assert len(seeds) == 4 and most_at_once(seeds) == int(jobs)
    for name in ("e0", "e1"):
        summary = next(r for r in runs if r["summary"] and r["out"] == name)
        assert summary["start"] >= max(r["end"] for r in seeds if r["out"] == name)
        assert json.loads((tmp_path / "res/compare/baselines" / name / "summary.json").read_text())["runs"] == [
            int(s) for s in ("1 2" if name == "e0" else "3 4").split()]


def test_run_experiments_reports_a_failed_seed_and_skips_only_its_summary(tmp_path: Path) -> None:
    proc, runs = real_run(tmp_path, "2", ("13 14", "3 4"))
    assert proc.returncode == 1 and "FAILED (1): baselines/e0" in proc.stderr
    assert not (tmp_path / "res/compare/baselines/e0/summary.json").exists()
    assert (tmp_path / "res/compare/baselines/e1/summary.json").exists()
    assert (tmp_path / "res/compare/baselines/e0/seed14.json").exists()  # the other seed still ran


def test_run_experiments_refuses_a_bad_jobs_value(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", "run_experiments.sh", "--jobs", "0", "--dry-run"], cwd=HERE, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--jobs needs a whole number >= 1" in proc.stderr
