"""Tests of the harness itself: the method and score registries (a toy score and a toy method plugged in from
here, without editing any other file), the module graph, the command line, and what a run leaves on disk."""
from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

import baselines
import report
import train
from baselines import Flag, Method, ScoreInput, register_method, register_score
from models import ContinualNet

HERE = Path(__file__).resolve().parent


def cli(out: Path, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--width", "8", "--epochs", "2", "--max-permutations", "3",
            "--shapley-eval-batches", "1", "--out-dir", str(out), "--seeds", "0", "--no-figures", *extra]


# ----------------------------------------------------------------------------- a toy score and a toy method

@pytest.fixture
def toys():
    """Registers the score `toy-mean` and the method `anchor` for one test, then removes them."""

    @register_score("toy-mean")
    def toy_mean(inp: ScoreInput) -> Tensor:
        """|mu|: the neurons with the largest mean activation matter most."""
        return inp.mu.abs().double().cpu()

    @register_method
    class Anchor(Method):
        """Fine-tuning with an L2 pull of every weight towards its value before the task."""

        name, label, help = "anchor", "Anchor (toy)", "toy: L2 pull towards the previous task's weights"
        flags = (Flag("--anchor-lambda", dict(type=float, default=0.1, help="anchor: penalty weight"), ">= 0"),)

        def before_task(self, task: int, model: ContinualNet) -> None:
            super().before_task(task, model)
            self.start = [p.detach().clone() for p in model.parameters()]

        def penalty(self, model: ContinualNet, x: Tensor, task: int) -> Tensor | float:
            return self.args.anchor_lambda * sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), self.start)
                                                 if p.shape == s.shape)

    try:
        yield Anchor
    finally:
        baselines.SCORES.pop("toy-mean")
        baselines.METHODS.pop("anchor")


def test_a_registered_score_and_method_run_end_to_end_and_reach_the_report(tmp_path, toys, capsys):
    parser_help = train.build_parser().format_help()
    assert "--anchor-lambda" in parser_help and "anchor: toy" in parser_help and "toy-mean" in parser_help
    root = tmp_path / "results"
    out = root / "compare" / "baselines" / "pmnist_task_il_anchor"
    assert train.main(cli(out, "--method", "anchor", "--anchor-lambda", "0.5")) == 0
    data = json.loads((out / "seed0.json").read_text())
    assert data["args"]["anchor_lambda"] == 0.5 and data["metrics"]["ACC"] is not None
    assert train.main(cli(tmp_path / "bad", "--method", "anchor", "--anchor-lambda", "-1")) == 2
    assert "--anchor-lambda must be >= 0, got -1.0" in capsys.readouterr().err
    snv = tmp_path / "snv"
    assert train.main(cli(snv, "--importance", "toy-mean")) == 0
    records = json.loads((snv / "seed0.json").read_text())["shapley"]
    assert [r["importance"] for r in records] == ["toy-mean"] * 3 and all(r["k"] == r["selected"] for r in records)
    assert train.main(cli(tmp_path / "bad2", "--method", "anchor", "--importance", "toy-mean")) == 2
    assert "--method anchor takes no --importance" in capsys.readouterr().err
    text = report.compare_section(root / "compare")
    row = next(line for line in text.splitlines() if line.startswith("| Anchor (toy) |"))
    assert f"{100 * data['metrics']['ACC']:.2f}" in row
    assert "| toy-mean |" in text  # the importance table lists every registered score


def test_registries_refuse_a_second_entry_of_the_same_name():
    with pytest.raises(ValueError, match="already registered"):
        register_score("shapley")(lambda inp: inp.mu)
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Again", (Method,), {"name": "snv"}))


def test_method_attributes_drive_the_loop_and_the_checks():
    assert baselines.METHODS["joint"](None, None, 0).data_tasks(3) == [0, 1, 2, 3]
    assert baselines.METHODS["snv"](None, None, 0).data_tasks(3) == [3]
    assert [n for n in baselines.METHODS if baselines.resumable(n, "none")] == ["joint", "sgd", "snv"]
    assert not baselines.resumable("snv", "gxd")
    assert baselines.METHODS["eidetic"].default_importance() == "taylor"
    assert baselines.METHODS["snv"].default_importance() == "shapley" and baselines.METHODS["sgd"].default_importance() is None


# ----------------------------------------------------------------------------- the module graph

def local_imports() -> dict[str, set[str]]:
    """module -> the repository's modules it imports (anywhere in the file, also inside functions)."""
    names = {p.stem for p in HERE.glob("*.py")}
    graph = {}
    for path in HERE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        graph[path.stem] = found & names - {path.stem}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_cycle_and_the_methods_never_import_train():
    graph = {m: deps for m, deps in local_imports().items() if not m.startswith("test_")}
    assert not [m for m in graph if m in reachable(graph, m)], "import cycle"
    assert "train" not in reachable(graph, "baselines")
    assert reachable({"a": {"b"}, "b": {"a"}}, "a") == {"a", "b"}  # the cycle check can fail


@pytest.mark.parametrize("module", ["baselines", "snv_core", "models", "datasets", "metrics", "utils", "report",
                                    "train", "rank_correlation"])
def test_each_module_imports_alone(module):
    code = f"import sys, {module}; print('train' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(module in ("train", "rank_correlation"))


# ----------------------------------------------------------------------------- command line and files

def test_help_lists_every_option_string_once():
    parser = train.build_parser()
    strings = [s for action in parser._actions for s in action.option_strings]
    assert len(strings) == len(set(strings))
    text = parser.format_help()
    assert "--lr LR, --lr LR" not in text and "--num-tasks NUM_TASKS, --num_tasks NUM_TASKS" in text


def test_results_are_readable_by_collaborators(tmp_path):
    old = os.umask(0o022)
    try:
        assert train.main(cli(tmp_path / "out", "--num-tasks", "2", "--epochs", "1")) == 0
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
        assert modes == {"seed0.json": 0o644, "summary.json": 0o644, "log_seed0.jsonl": 0o644}
        os.umask(0o027)
        train.write_json(tmp_path / "group.json", {})
        assert stat.S_IMODE((tmp_path / "group.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_every_epoch_is_logged_on_stdout_and_as_json_lines(tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(cli(out, "--num-tasks", "2", "--epochs", "2", "--mask-finetune-epochs", "1")) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if " epoch " in l]
    log = [json.loads(l) for l in (out / "log_seed0.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["task 1/2"] * 2 + ["task 1/2 (mask)"] + ["task 2/2"] * 2 + ["task 2/2 (mask)"]
    assert len(lines) == len(log) and lines[0].startswith("[seed 0] task 1/2 epoch 1: train loss ")
    assert all(r["train_loss"] > 0 and 0 <= r["val_accuracy"] <= 1 and r["seconds"] >= 0 for r in log)
    assert train.main(cli(out, "--num-tasks", "2", "--epochs", "2", "--mask-finetune-epochs", "1", "--overwrite")) == 0
    assert len((out / "log_seed0.jsonl").read_text().splitlines()) == len(log)  # a new run starts the file over


SYNC_METHODS = ("__bool__", "__float__", "__int__", "item", "tolist", "cpu", "numpy")
"""Tensor methods that make the host wait for the device."""


def count_syncs(monkeypatch, run) -> int:
    """How many times `run()` calls a Tensor method of SYNC_METHODS."""
    calls = []
    with monkeypatch.context() as m:
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            m.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: (calls.append(_n),
                                                                                     _f(self, *a, **k))[1])
        run()
    return len(calls)


def tiny_phase(tmp_path: Path, *extra: str):
    """(args, synthetic benchmark, 8-unit MLP with head 0, empty State) for calling train_phase / evaluate."""
    args = train.resolve_args(train.build_parser().parse_args(cli(tmp_path, *extra)))
    bench = train.datasets.get_benchmark("synthetic", 3, 0, None)
    torch.manual_seed(0)
    model = train.build_model("mlp", bench.input_shape, 8)
    model.add_head(2)
    return args, bench, model, train.State(torch.zeros(model.num_neurons, dtype=torch.bool))


def test_the_training_step_never_waits_for_the_device(tmp_path, monkeypatch):
    # The host-device synchronisations of one epoch must not grow with its number of steps.
    counts = []
    for batch_size in (48, 4):
        args, bench, model, state = tiny_phase(tmp_path / str(batch_size), "--batch-size", str(batch_size))
        counts.append(count_syncs(monkeypatch, lambda: train.train_phase(
            model, bench, 0, [0], 1, train.snv_core.Freezer(model, state.frozen, 0), state, args, torch.device("cpu"),
            torch.Generator().manual_seed(0), "task 1")))
    steps = [len(bench.tasks[0].train) // b for b in (48, 4)]
    assert steps[1] >= 5 * steps[0]  # not vacuous: ten times the steps
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("scenario", ["task_il", "class_il"])
def test_evaluation_never_waits_for_the_device_per_batch(tmp_path, monkeypatch, scenario):
    # evaluate's host-device synchronisations must not grow with the number of batches, and its numbers must not
    # depend on the batch size beyond the loss's float rounding.
    counts, results = [], []
    for batch_size in (200, 4):
        args, bench, model, state = tiny_phase(tmp_path / str(batch_size), "--eval-batch-size", str(batch_size),
                                               "--scenario", scenario)
        model.add_head(2)
        split = bench.tasks[1].train
        counts.append(count_syncs(monkeypatch, lambda: results.append(train.evaluate(
            model, split, 1, 1, args, state, torch.device("cpu"), bench.classes_per_task))))
    assert len(split) >= 10 * 4  # not vacuous: ten batches or more against one
    assert counts[0] == counts[1], counts
    assert results[0][0] == results[1][0] and results[0][1] == pytest.approx(results[1][1], rel=1e-6)


def test_evaluation_sums_as_python_did(tmp_path):
    # The device-side sums equal the former host-side ones: int(correct) per batch, float(loss) per batch in order.
    args, bench, model, state = tiny_phase(tmp_path, "--eval-batch-size", "7")
    split = bench.tasks[0].test
    correct, loss = 0, 0.0
    with torch.no_grad():
        for x, y in split.batches(7):
            out = model.heads[0](model.features(x))
            correct += int((out.argmax(1) == y).sum())
            loss += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
    model.eval()
    assert train.evaluate(model, split, 0, 0, args, state, torch.device("cpu"), 2) == (correct / len(split),
                                                                                        loss / len(split))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_training_step_has_no_hidden_device_sync_on_cuda(tmp_path, monkeypatch):
    # torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA call (implicit ones too: boolean
    # indexing, nonzero, blocking copies) made during the training steps. Allowed: loading the batches (host to
    # device copies) and the once-per-epoch reads and evaluation that the test above counts.
    args, bench, model, state = tiny_phase(tmp_path, "--batch-size", "4", "--device", "cuda")
    device = torch.device("cuda")
    model.to(device)

    def allowed(f):
        def run(*a, **k):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return f(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return run

    batches = train.datasets.Split.batches
    monkeypatch.setattr(train.datasets.Split, "batches", lambda self, *a, **k: iter(allowed(
        lambda: list(batches(self, *a, **k)))()))
    monkeypatch.setattr(train, "evaluate", allowed(train.evaluate))
    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, allowed(getattr(torch.Tensor, name)))
    frozen = torch.arange(model.num_neurons) % 3 == 0  # the freezer's masking and restoring run every step
    freezer = train.snv_core.Freezer(model, frozen.to(device), 0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        train.train_phase(model, bench, 0, [0], 1, freezer, state, args, device, torch.Generator().manual_seed(0),
                          "task 1")
    finally:
        torch.cuda.set_sync_debug_mode(0)


IMPORT_TO_DISTRIBUTION = {"PIL": "pillow"}
"""Import names whose distribution on PyPI has another name."""
OPTIONAL = {"torchvision"}
"""Imported lazily by a code path that says how to install it; the project does not need it."""


def test_requirements_cover_every_third_party_import():
    imported = set()
    for path in HERE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {p.stem for p in HERE.glob("*.py")} - OPTIONAL - {
        "__future__"}
    lines = (HERE / "requirements.txt").read_text().splitlines()
    required = {line.split("==")[0].split(">=")[0].strip().lower() for line in lines if line.strip()}
    assert "pillow" in {IMPORT_TO_DISTRIBUTION.get(m, m).lower() for m in third_party}  # datasets.py decodes JPEGs
    assert {IMPORT_TO_DISTRIBUTION.get(m, m).lower() for m in third_party} <= required
