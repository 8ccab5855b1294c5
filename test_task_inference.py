"""Tests of class-incremental task inference from the frozen subnetworks (task_inference.py, --task-inference)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import baselines
import datasets
import task_inference
import train
from baselines import State
from models import MLP
from task_inference import RULES, Outputs, TaskStats


def cli(tmp_path: Path, *extra: str) -> list[str]:
    """A small synthetic class-incremental run."""
    return ["--dataset", "synthetic", "--width", "16", "--epochs", "2", "--max-permutations", "4",
            "--shapley-eval-batches", "1", "--mask-finetune-epochs", "1", "--eidetic-step", "0.25",
            "--eidetic-recovery-epochs", "1", "--eidetic-router-epochs", "1", "--scenario", "class_il",
            "--out-dir", str(tmp_path / "out"), "--seeds", "0", "--no-figures", *extra]


def run(tmp_path: Path, *extra: str, on_task_end=None) -> dict:
    args = train.resolve_args(train.build_parser().parse_args(cli(tmp_path, *extra)))
    return train.run_seed(args, 0, torch.device("cpu"), on_task_end=on_task_end)


# ----------------------------------------------------------------------------- the rules on a constructed case

def own_stats(out: Outputs, task: int) -> TaskStats:
    """Task `task`'s statistics as Recorder.task_end computes them, from `out` standing for its own validation data."""
    stats = TaskStats()
    for name, rule in RULES.items():
        if rule.standardised:
            raw = rule.raw(Outputs(out.logits[task:task + 1], out.without[task:task + 1]))[:, 0].double()
            stats.score_mean[name], stats.score_std[name] = float(raw.mean()), float(raw.std(correction=0))
    return stats


def constructed(true: int, K: int = 3, B: int = 64, C: int = 4) -> Outputs:
    """K tasks' outputs on B samples of task `true`: its head is confident and loses that confidence without its own
    part of the network; the other heads are flat with or without theirs."""
    g = torch.Generator().manual_seed(true)
    logits = torch.randn(K, B, C, generator=g) * 0.1
    without = logits + torch.randn(K, B, C, generator=g) * 0.1
    logits[true, torch.arange(B), torch.arange(B) % C] += 6.0
    return Outputs(logits, without)


def test_every_rule_picks_the_known_task():
    K = 3
    stats = [own_stats(constructed(k), k) for k in range(K)]
    for true in range(K):
        out = constructed(true)
        for name in RULES:
            pick = task_inference.scores(name, out, stats).argmax(1)
            assert bool((pick == true).all()), (name, true, pick)


def test_calibrated_and_marginal_undo_an_over_confident_later_task():
    """Task 1's head has twice task 0's logit scale everywhere, also on task 0's inputs, where that confidence does
    not come from task 1's own neurons: heads, maxprob and entropy pick task 1 for task 0's images; standardising
    by each task's own validation statistics (calibrated) and task 1's own neurons' contribution (marginal) pick
    task 0."""
    g = torch.Generator().manual_seed(0)
    B, C = 256, 4
    labels = torch.arange(B) % C

    def outputs_on(true: int) -> Outputs:
        logits = torch.randn(2, B, C, generator=g) * 0.1
        logits[0, torch.arange(B), labels] += 3.0 if true == 0 else 1.0
        logits[1, torch.arange(B), labels] += 6.0 if true == 1 else 5.0
        without = logits.clone()
        without[0, torch.arange(B), labels] -= 2.0 if true == 0 else 0.5
        without[1, torch.arange(B), labels] -= 4.0 if true == 1 else 0.5
        return Outputs(logits, without)

    stats = [own_stats(outputs_on(k), k) for k in range(2)]
    out = outputs_on(0)
    for name in ("heads", "maxprob", "entropy"):
        assert float((task_inference.scores(name, out, stats).argmax(1) == 1).float().mean()) > 0.9, name
    for name in ("calibrated", "marginal"):
        assert float((task_inference.scores(name, out, stats).argmax(1) == 0).float().mean()) > 0.9, name


def test_a_standardised_rule_never_picks_a_task_without_statistics():
    out = constructed(2)
    stats = [own_stats(constructed(k), k) for k in range(2)] + [None]
    for name, rule in RULES.items():
        s = task_inference.scores(name, out, stats)
        assert bool(torch.isneginf(s[:, 2]).all()) == rule.standardised, name


# ----------------------------------------------------------------------------- the stacked forward

def test_stacked_gates_with_their_own_constants_equal_one_forward_each():
    torch.manual_seed(0)
    model = MLP(20, 16, 3).eval()
    model.add_head(3)
    x = torch.randn(5, 20)
    keep = torch.rand(4, model.num_neurons) < 0.5
    const = torch.randn(4, model.num_neurons)
    with torch.no_grad(), model.gated(keep, const):
        stacked = model(x.repeat(4, 1), 0).view(4, 5, 3)
    for k in range(4):
        with torch.no_grad(), model.gated(keep[k], const[k]):
            assert torch.allclose(stacked[k], model(x, 0), atol=1e-6)


@pytest.mark.parametrize("method", ["snv", "packnet", "eidetic"])
def test_outputs_are_each_tasks_own_logits(tmp_path, method):
    """outputs(): task k's stacked logits equal its TIL logits (task_logits) for every finished task, and without
    its own part they equal a forward through task k-1's part of the network with head k."""
    seen = []

    def check(t, model, state):
        x = torch.randn(7, 3, 8, 8)
        out = task_inference.outputs(model, x, range(t + 1), state, max_rows=10)
        assert out.logits.shape == out.without.shape == (t + 1, 7, model.heads[0].out_features)
        for k in range(t + 1):
            assert torch.allclose(out.logits[k], train.frozen_logits(model, x, k, state), atol=1e-5)
            if method == "packnet":
                earlier = {n: model.get_parameter(n) * state.method.masks[k - 1][n] if k else
                           torch.zeros_like(model.get_parameter(n)) for n in state.method.names}
                expected = torch.func.functional_call(model, earlier | state.method.norms[k], (x, k))
            else:
                keep, mu = state.subnets[k]
                with torch.no_grad(), model.gated(keep & ~task_inference.own_neurons(state, k), mu):
                    expected = model(x, k)
            assert torch.allclose(out.without[k], expected, atol=1e-5)
        seen.append(t)

    run(tmp_path, "--method", method, on_task_end=check)
    assert seen == [0, 1, 2]


# ----------------------------------------------------------------------------- runs

def test_heads_is_unchanged_and_recording_changes_nothing(tmp_path, monkeypatch):
    """--task-inference heads: the accuracy matrix is the concatenated-head argmax's, and recording every rule
    beside it changes no result and no weight (a run with the recording switched off is bit-identical)."""
    models = []
    recorded = run(tmp_path, on_task_end=lambda t, model, state: models.append(copy.deepcopy(model.state_dict())))
    monkeypatch.setattr(baselines.SNV, "infers_tasks", classmethod(lambda cls, args: False))
    plain_models = []
    plain = run(tmp_path, on_task_end=lambda t, model, state: plain_models.append(copy.deepcopy(model.state_dict())))
    assert "task_inference" not in plain and recorded["accuracy_matrix"] == plain["accuracy_matrix"]
    assert recorded["metrics"] == plain["metrics"]
    for a, b in zip(models, plain_models):
        assert all(torch.equal(a[k], b[k]) for k in a)
    ti = recorded["task_inference"]
    assert ti["selected"] == "heads" and set(ti["rules"]) == set(RULES)
    assert ti["rules"]["heads"]["accuracy_matrix"] == recorded["accuracy_matrix"]
    for rule in ti["rules"].values():
        T = len(rule["task_id_matrix"])
        assert all(rule["task_id_matrix"][i][j] is not None for i in range(T) for j in range(min(i + 2, T)))
        assert all(a <= t + 1e-12 for row_a, row_t in zip(rule["accuracy_matrix"], rule["task_id_matrix"])
                   for a, t in zip(row_a, row_t) if a is not None)


@pytest.mark.parametrize("method", ["snv", "packnet", "wsn", "eidetic"])
def test_a_rule_gives_the_accuracy_matrix(tmp_path, method):
    result = run(tmp_path, "--method", method, "--task-inference", "marginal")
    ti = result["task_inference"]
    assert ti["selected"] == "marginal" and result["accuracy_matrix"] == ti["rules"]["marginal"]["accuracy_matrix"]
    assert result["metrics"] == ti["rules"]["marginal"]["metrics"]
    assert [s["task"] for s in ti["statistics"]] == [1, 2, 3]


class SplitWatch:
    """Records every access to a split: (tasks finished so far, task, kind)."""

    def __init__(self, monkeypatch) -> None:
        self.finished, self.log, self.kinds = 0, [], {}
        get, batches = datasets.get_benchmark, datasets.Split.batches
        watch = self

        def get_benchmark(*a, **kw):
            bench = get(*a, **kw)
            watch.kinds = {id(getattr(task, kind)): (task.index, kind) for task in bench.tasks
                           for kind in ("train", "val", "test")}
            return bench

        def watched(split, *a, **kw):
            watch.log.append((watch.finished, *watch.kinds[id(split)]))
            return batches(split, *a, **kw)

        monkeypatch.setattr(datasets, "get_benchmark", get_benchmark)
        monkeypatch.setattr(datasets.Split, "batches", watched)

    def task_end(self, t: int, model, state) -> None:
        self.finished = t + 1


@pytest.mark.parametrize("method", ["snv", "packnet"])
def test_nothing_of_an_earlier_tasks_data_is_kept(tmp_path, monkeypatch, method):
    """Past its task, a task's train and val splits are never read again (test splits only by evaluation), and what
    the method, the state and the recorder keep has no sample dimension: model-shaped tensors, [N] vectors, scalars."""
    watch = SplitWatch(monkeypatch)
    recorders = []
    original = task_inference.Recorder

    class Kept(original):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            recorders.append(self)

    monkeypatch.setattr(task_inference, "Recorder", Kept)
    states = []
    run(tmp_path, "--method", method, on_task_end=lambda t, model, state: (watch.task_end(t, model, state),
                                                                           states.append((model, state))))
    late = [(done, task, kind) for done, task, kind in watch.log if kind != "test" and task < done]
    assert late == []
    model, state = states[-1]
    allowed = {tuple(t.shape) for t in [*model.parameters(), *model.buffers()]} | {(model.num_neurons,), ()}
    kept: list[torch.Tensor] = []

    def walk(obj, depth=0) -> None:
        if isinstance(obj, torch.Tensor):
            kept.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and depth < 3 and not isinstance(obj, (torch.nn.Module, type)):
            walk({k: v for k, v in vars(obj).items() if k != "args"}, depth + 1)

    walk([state.frozen, state.subnets, state.method, recorders[0].stats])
    assert kept and all(tuple(t.shape) in allowed for t in kept), sorted({tuple(t.shape) for t in kept})
    stats = recorders[0].stats
    assert len(stats) == 3 and all(isinstance(v, float) for s in stats for v in [*s.score_mean.values(),
                                                                                   *s.score_std.values()])


def test_resumed_run_records_the_same_task_inference(tmp_path, monkeypatch):
    """A run stopped after its second task's checkpoint and resumed records every rule as an uninterrupted run."""
    reference = run(tmp_path / "ref")
    save = train.save_checkpoint

    def save_then_stop(path, args, seed, model, state, gen, progress):
        save(path, args, seed, model, state, gen, progress)
        assert progress["tasks_done"] < 2

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(AssertionError):
        train.main(cli(tmp_path / "run"))
    monkeypatch.undo()
    assert train.main(cli(tmp_path / "run", "--resume")) == 0
    resumed = json.loads((tmp_path / "run" / "out" / "seed0.json").read_text())
    assert resumed["task_inference"]["rules"] == reference["task_inference"]["rules"]


@pytest.mark.parametrize("extra, needle", [
    (["--scenario", "task_il", "--task-inference", "entropy"], "needs --scenario class_il"),
    (["--method", "sgd", "--task-inference", "entropy"], "needs --scenario class_il and a method"),
    (["--inference", "dense", "--task-inference", "calibrated"], "--inference masked"),
    (["--method", "wsn"], "class_il only with a --task-inference rule other than heads"),
])
def test_impossible_task_inference_exits_2(tmp_path, capsys, extra, needle):
    assert train.main(cli(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err, err
    assert not list((tmp_path / "out").glob("seed*.json"))


def test_every_rule_is_a_cli_choice_and_names_its_folder():
    args = train.build_parser().parse_args(["--scenario", "class_il", "--task-inference", "marginal"])
    args.world_size = 1
    assert all(ok for ok, _ in baselines.resolve_args(args)) and baselines.run_name(args) == "snv@marginal"
    for name in RULES:
        assert train.build_parser().parse_args(["--task-inference", name]).task_inference == name
    assert next(iter(RULES)) == "heads" and train.build_parser().parse_args([]).task_inference == "heads"


def test_report_table_reads_every_rule_from_the_runs(tmp_path):
    import report

    def seed(s: int, acc: float) -> dict:
        rules = {name: {"metrics": {"ACC": acc + i / 10 + (s - 42) / 100, "BWT": -0.1, "AF": 0.1},
                        "task_id_final": 0.5 + i / 10} for i, name in enumerate(RULES)}
        return {"seed": s, "args": {"method": "snv", "scenario": "class_il", "num_tasks": 10},
                "metrics": {"ACC": 0.1, "BWT": -0.9, "AF": 0.9}, "task_inference": {"rules": rules}}

    folder = tmp_path / "compare" / "baselines" / "pmnist_class_il_snv-taskinf"
    folder.mkdir(parents=True)
    for s in (42, 43):
        (folder / f"seed{s}.json").write_text(json.dumps(seed(s, 0.1)))
    text = report.compare_section(tmp_path / "compare")
    table = text.split("### Class-incremental without replay")[1]
    last = len(RULES) - 1
    assert f"| SNV, {list(RULES)[last]} | {10 + 10 * last + 0.5:.2f} ± 0.50 | {50 + 10 * last:.2f} ± 0.00 |" in table
    assert "| SNV, heads | 10.50 ± 0.50 | 50.00 ± 0.00 |" in table
    assert "| Eidetic (with its replay-trained router) | not run |" in table
    assert "| Eidetic (subnetworks only), heads | not run |" in table and "| Joint (upper bound) | not run |" in table
