"""Tests of the baselines and ablations: importances, GXD, resets, Eidetic, PackNet, WSN, EWC, SI, LwF."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import baselines
import rank_correlation
import snv_core
import train
from test_snv import LogitRecorder
from models import build_model

SYNTHETIC = (3, 8, 8)


def run_args(tmp_path, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--width", "8", "--epochs", "2", "--mask-finetune-epochs", "1",
            "--eidetic-step", "0.25", "--eidetic-recovery-epochs", "1", "--eidetic-router-epochs", "1",
            "--out-dir", str(tmp_path / "out"), "--seeds", "0", "--no-figures", *extra]


def small_model(arch: str, width: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(arch, SYNTHETIC, width)
    model.add_head(3)
    return model


def data(n: int = 24, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SYNTHETIC, generator=g), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------- importances

def test_importances_match_a_manual_mlp_computation():
    model = small_model("mlp", 6)
    x, y = data()
    mu = snv_core.mean_activations(model, [(x, y)])
    h, acts = x.flatten(1), []
    for lin in model.linears:
        a = lin(h)
        a.retain_grad()
        acts.append(a)
        h = F.relu(a)
    F.cross_entropy(model.heads[0](h), y, reduction="sum").backward()
    a, g = torch.cat([t.detach() for t in acts], 1), torch.cat([t.grad for t in acts], 1)
    expected = {"activation": F.relu(a).mean(0), "taylor": (a * g).abs().mean(0), "gxd": ((a - mu) * g).abs().mean(0),
                "magnitude": torch.cat([lin.weight.abs().sum(1) for lin in model.linears])}
    for kind, want in expected.items():
        got = baselines.importance(kind, model, 0, x, y, mu)
        assert got.shape == (model.num_neurons,) and got.dtype == torch.float64
        assert torch.allclose(got, want.double(), rtol=1e-5, atol=1e-7), kind
    l2 = baselines.importance("magnitude", model, 0, x, y, args=argparse.Namespace(magnitude_norm=2))
    assert torch.allclose(l2, torch.cat([lin.weight.norm(dim=1) for lin in model.linears]).double())
    with torch.no_grad():  # a neuron that never fires: large |a|, but no output
        model.linears[0].bias[0] = -1e3
    assert baselines.importance("activation", model, 0, x, y)[0] == 0
    rand = baselines.importance("random", model, 0, x, y, seed=3)
    assert torch.equal(rand, baselines.importance("random", model, 0, x, y, seed=3))
    assert not torch.equal(rand, baselines.importance("random", model, 0, x, y, seed=4))


def test_importances_on_resnet_have_shape_n_and_are_deterministic():
    model = small_model("resnet18", 4)
    x, y = data(4)
    mu = snv_core.mean_activations(model, [(x, y)])
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    for kind in list(baselines.SCORES)[1:]:
        first = baselines.importance(kind, model, 0, x, y, mu)
        assert first.shape == (model.num_neurons,) and bool(torch.isfinite(first).all())
        assert torch.equal(first, baselines.importance(kind, model, 0, x, y, mu)), kind
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())  # eval mode, no BN update
    assert all(p.grad is None for p in model.parameters())


def test_select_neurons_uses_the_chosen_importance(tmp_path):
    args = train.resolve_args(train.build_parser().parse_args(run_args(tmp_path, "--max-permutations", "4",
                                                                       "--shapley-eval-batches", "1")))
    bench = train.datasets.get_benchmark("synthetic", 3, 0, None)
    model = build_model("mlp", bench.input_shape, 8)
    model.add_head(2)
    state = train.State(torch.zeros(model.num_neurons, dtype=torch.bool))
    cpu = torch.device("cpu")
    loop = baselines.Loop(0, bench.tasks[:1], 3, cpu, eval_set=lambda: train.eval_set(bench.tasks[0].val, 1, cpu),
                          retrain=None, logits=None, loss=None)
    phis = {}
    for kind in ("shapley", "random", "gxd"):
        args.importance = kind
        _, selected, record = baselines.SNV(args, model, 0).select(model, state, loop)
        assert len(record["phi"]) == model.num_neurons and int(selected.sum()) == record["k"]
        phis[kind] = record["phi"]
    assert phis["random"] != phis["shapley"] and phis["gxd"] != phis["random"]
    assert record["importance"] == "gxd" and record["seconds"] >= 0


def test_removal_effect_matches_one_gate_at_a_time():
    model = small_model("mlp", 5)
    x, y = data()
    mu = snv_core.mean_activations(model, [(x, y)])
    effect = rank_correlation.removal_effect(model, 0, x, y, mu, chunk=4)
    with torch.no_grad():
        base = F.cross_entropy(model(x, 0), y, reduction="none")
    for i in (0, 7, 19):
        keep = torch.ones(model.num_neurons, dtype=torch.bool)
        keep[i] = False
        with model.gated(keep, mu), torch.no_grad():
            loss = F.cross_entropy(model(x, 0), y, reduction="none")
        assert math.isclose(float(effect[i]), float((loss - base).abs().mean()), rel_tol=1e-5, abs_tol=1e-7)


GXD_FLOOR = 0.5


def test_gxd_predicts_the_effect_of_mean_replacement(tmp_path):
    # On a trained network, GXD (reference mu) ranks neurons like the measured loss change of replacing
    # each one by its mean, far better than chance (Spearman 0).
    args = train.resolve_args(train.build_parser().parse_args(run_args(tmp_path, "--width", "32", "--epochs", "5")))
    bench = train.datasets.get_benchmark("synthetic", 3, 0, None)
    torch.manual_seed(0)
    model = build_model("mlp", bench.input_shape, 32)
    model.add_head(2)
    state = train.State(torch.zeros(model.num_neurons, dtype=torch.bool))
    train.train_phase(model, bench, 0, [0], args.epochs, snv_core.Freezer(model, state.frozen, 0), state, args,
                      torch.device("cpu"), torch.Generator().manual_seed(0), "task 1")
    x, y = train.eval_set(bench.tasks[0].val, 1, torch.device("cpu"))
    mu = snv_core.mean_activations(model, [(x, y)])
    rho = rank_correlation.spearman(baselines.importance("gxd", model, 0, x, y, mu), rank_correlation.removal_effect(model, 0, x, y, mu))
    assert rho is not None and rho > GXD_FLOOR


# ----------------------------------------------------------------------------- pure helpers

def test_lowest_plastic_never_picks_frozen_neurons():
    utility = torch.tensor([0.0, 5.0, 1.0, 0.5, 2.0, 0.5])
    frozen = torch.tensor([True, False, False, False, True, False])
    assert baselines.lowest_plastic(utility, frozen, 0.5).tolist() == [False, False, False, True, False, True]
    assert baselines.lowest_plastic(utility, frozen, 1.0).tolist() == [False, True, True, True, False, True]


def test_prune_step_drops_the_lowest_per_layer():
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5, 9.0, 8.0, 7.0, 6.0])
    kept = torch.tensor([True, True, True, False, True, True, True, True])
    out = baselines.prune_step(scores, kept, [4, 4], 0.25)
    assert out.tolist() == [True, False, True, False, True, True, True, False]
    assert baselines.prune_step(scores, kept, [4, 4], 1.0).sum() == 0


def test_top_fraction_counts_and_ties():
    values = torch.tensor([[1.0, 5.0, 5.0], [0.0, 3.0, 2.0]])
    assert baselines.top_fraction(values, 0.5).tolist() == [[False, True, True], [False, True, False]]
    among = torch.tensor([[True, False, False], [True, True, True]])
    assert baselines.top_fraction(values, 0.5, among).tolist() == [[False, False, False], [False, True, True]]
    assert not baselines.top_fraction(values, 0.05).any()
    g = torch.Generator().manual_seed(0)
    for fraction in (0.1, 0.37, 0.5, 1.0):  # many ties: agrees with a stable descending sort
        values = torch.randint(0, 7, (40, 30), generator=g).float()
        among = torch.rand(40, 30, generator=g) < 0.6
        k = round(fraction * int(among.sum()))
        order = torch.sort(values.flatten().masked_fill(~among.flatten(), -math.inf), descending=True, stable=True).indices
        expected = torch.zeros(values.numel(), dtype=torch.bool)
        expected[order[:k]] = True
        got = baselines.top_fraction(values, fraction, among)
        assert torch.equal(got.flatten(), expected) and int(got.sum()) == k


def test_distillation_is_soft_cross_entropy():
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    p = F.softmax(teacher / 2, 1)
    assert torch.allclose(baselines.distillation(student, teacher, 2.0), -(p * F.log_softmax(student / 2, 1)).sum(1).mean())
    same = student.clone().requires_grad_(True)
    baselines.distillation(same, student, 2.0).backward()
    assert same.grad.abs().max() < 1e-6  # minimum at the teacher's logits


def test_empirical_fisher_is_the_mean_squared_batch_gradient():
    lin = nn.Linear(3, 2)
    batches = [data(4, seed) for seed in (1, 2)]
    batches = [(x.flatten(1)[:, :3], y % 2) for x, y in batches]
    loss = lambda x, y: F.cross_entropy(lin(x), y)
    fisher = baselines.empirical_fisher(lin, batches, loss)
    want = sum(torch.autograd.grad(loss(x, y), lin.weight)[0] ** 2 * 4 for x, y in batches) / 8
    assert torch.allclose(fisher["weight"], want)


def test_eidetic_route_keeps_only_the_routed_block():
    method = baselines.Eidetic.__new__(baselines.Eidetic)
    model = small_model("mlp", 4)
    method.router = nn.Linear(model.feature_dim, 2)
    x, _ = data(6)
    logits = torch.randn(6, 6)
    routed = method.route(model, x, logits, 1)
    pick = method.router(model.features(x)).argmax(1)
    assert torch.equal(routed.argmax(1) // 3, pick)
    assert torch.equal(method.route(model, x, logits[:, :3], 0), logits[:, :3])  # router knows 2 heads, not 1


# ----------------------------------------------------------------------------- surgery

@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_gxd_reset_changes_only_plastic_neurons(arch):
    model = small_model(arch, 4)
    for layer in model.layers:
        if layer.bn is not None:
            layer.bn.running_mean.uniform_(-1, 1)
            layer.bn.weight.data.uniform_(0.5, 2)
    x, y = data(8)
    frozen = torch.rand(model.num_neurons, generator=torch.Generator().manual_seed(2)) < 0.5
    mu = snv_core.mean_activations(model, [(x, y)])
    expected = baselines.lowest_plastic(baselines.importance("gxd", model, 0, x, y, mu), frozen, 0.5)
    before = [[t.detach().clone() for t in row_tensors(layer)] for layer in model.layers]
    record = baselines.gxd_reset(model, 0, x, y, frozen, 0.5, seed=7)
    assert record["reset"] == int(expected.sum()) == round(0.5 * int((~frozen).sum()))
    moved = []
    for layer, old, f, e in zip(model.layers, before, model.split_neurons(frozen), model.split_neurons(expected)):
        new = row_tensors(layer)
        for a, b in zip(new, old):
            assert torch.equal(a[f], b[f]), f"{layer.name}: a frozen neuron moved"
        moved.append((new[0] != old[0]).flatten(1).any(1))
        if layer.bn is not None:
            assert bool((layer.bn.running_mean[e] == 0).all()) and bool((layer.bn.weight[e] == 1).all())
    assert torch.equal(torch.cat(moved), expected) and bool(expected.any())


def row_tensors(layer) -> list[Tensor]:
    """Everything of a neuron layer indexed by neuron: weight rows, bias, BatchNorm affine and statistics."""
    tensors = [layer.producer.weight, layer.producer.bias]
    if layer.bn is not None:
        tensors += [layer.bn.weight, layer.bn.bias, layer.bn.running_mean, layer.bn.running_var]
    return [t.detach() for t in tensors if t is not None]


def test_cut_resistance_makes_the_dense_mlp_equal_its_subnetwork():
    model = small_model("mlp", 6)
    members = torch.rand(model.num_neurons, generator=torch.Generator().manual_seed(5)) < 0.5
    x, _ = data()
    assert baselines.cut_resistance(model, members, 0) > 0
    with torch.no_grad():
        with model.gated(members, torch.zeros(model.num_neurons)):
            masked = model(x, 0)
        baselines.reinit_neurons(model, ~members, torch.Generator().manual_seed(1))
        assert torch.equal(model(x, 0), masked)
    assert baselines.cut_resistance(model, members, 0) == 0


# ----------------------------------------------------------------------------- end to end

def check_results(path, method: str) -> dict:
    data = json.loads(path.read_text())
    T = data["args"]["num_tasks"]
    A = data["accuracy_matrix"]
    assert len(A) == T and all(len(row) == T for row in A)
    assert all(A[i][j] is None or 0 <= A[i][j] <= 1 for i in range(T) for j in range(T))
    assert all(A[i][j] is not None for i in range(T) for j in range(i + 1))
    assert data["metrics"]["ACC"] is not None and data["args"]["method"] == method
    return data


@pytest.mark.parametrize("method,scenario", [("eidetic", "task_il"), ("eidetic", "class_il"), ("packnet", "class_il"),
                                             ("wsn", "task_il"), ("ewc", "class_il"), ("si", "class_il"),
                                             ("lwf", "class_il")])
def test_every_baseline_runs_from_the_cli(tmp_path, method, scenario):
    """...with --prune-analysis, as run_experiments.sh runs them: its 0 % point is the run's own ACC."""
    assert train.main(run_args(tmp_path, "--method", method, "--scenario", scenario, "--num-tasks", "2",
                               "--prune-analysis")) == 0
    data = check_results(tmp_path / "out" / "seed0.json", method)
    assert data["pruning"]["avg_accuracy"][0] == pytest.approx(data["metrics"]["ACC"], abs=1e-12)
    records = data["method_records"]
    if method == "eidetic":
        assert [r["task"] for r in records] == [1, 2] and data["metrics"]["CAP"] == records[-1]["frozen_total"] / data["num_neurons"]
        assert ("router_train_accuracy" in records[-1]) == (scenario == "class_il")
    elif method in ("packnet", "wsn"):
        used = [r["used_weights"] for r in records]
        assert len(used) == 2 and used == sorted(used) and used[-1] <= records[-1]["total_weights"]
    else:
        assert records == [] and data["metrics"]["CAP"] is None


def test_ablation_and_reset_from_the_cli(tmp_path):
    assert train.main(run_args(tmp_path, "--importance", "gxd", "--reset", "gxd", "--reset-rate", "0.5",
                               "--num-tasks", "2", "--out-dir", str(tmp_path / "default"))) == 0
    data = check_results(tmp_path / "default" / "seed0.json", "snv")
    assert data["args"]["importance"] == "gxd" and [s["importance"] for s in data["shapley"]] == ["gxd", "gxd"]
    assert [r["before_task"] for r in data["resets"]] == [2] and data["resets"][0]["reset"] > 0
    for flags, name in ((["--importance", "random", "--reset", "gxd"], "snv-random+gxd"), (["--method", "eidetic"], "eidetic")):
        args = train.build_parser().parse_args(run_args(tmp_path, *flags))
        args.world_size = 1  # set by train.resolve_args before it calls baselines.resolve_args
        assert all(ok for ok, _ in baselines.resolve_args(args)) and baselines.run_name(args) == name
    assert args.importance == "taylor"


def test_lwf_without_distillation_is_sgd(tmp_path):
    """LwF with alpha = 0 trains exactly like sgd: the LwF row differs from the sgd row only by distillation."""
    matrices = {}
    for name, flags in (("sgd", ["--method", "sgd"]), ("lwf0", ["--method", "lwf", "--lwf-alpha", "0"]),
                        ("lwf1", ["--method", "lwf", "--lwf-alpha", "1"])):
        out = tmp_path / name
        assert train.main(run_args(tmp_path, *flags, "--num-tasks", "3", "--out-dir", str(out))) == 0
        matrices[name] = json.loads((out / "seed0.json").read_text())["accuracy_matrix"]
    assert matrices["lwf0"] == matrices["sgd"]
    assert matrices["lwf1"] != matrices["sgd"]  # not vacuous: distillation does change training


@pytest.mark.parametrize("flags,message", [
    (["--method", "wsn", "--scenario", "class_il"], "supports --scenario task_il only"),
    (["--method", "ewc", "--importance", "taylor"], "--method ewc takes no --importance"),
    (["--method", "eidetic", "--importance", "shapley"], "--importance taylor or magnitude, not shapley"),
    (["--method", "packnet", "--reset", "gxd"], "--reset gxd applies"),
    (["--method", "packnet", "--packnet-prune", "1"], "--packnet-prune"),
])
def test_bad_baseline_options_exit_2(tmp_path, capsys, flags, message):
    assert train.main(run_args(tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("method,arch", [("eidetic", "mlp"), ("packnet", "mlp"), ("wsn", "mlp"),
                                         ("eidetic", "resnet18"), ("packnet", "resnet18")])
def test_old_task_logits_are_bit_identical_in_til(tmp_path, method, arch):
    args = train.resolve_args(train.build_parser().parse_args(run_args(
        tmp_path, "--method", method, "--arch", arch, "--width", "16" if arch == "mlp" else "4",
        "--optimizer", "sgd", "--weight-decay", "5e-3", "--lr", "0.02", "--packnet-prune", "0.5")))
    rec = LogitRecorder(train.datasets.get_benchmark("synthetic", args.num_tasks, 0, None))
    result = train.run_seed(args, 0, torch.device("cpu"), on_task_end=rec)
    assert len(rec.recorded) == 3 and not rec.mismatches
    assert all(float(r.std(0).max()) > 0 for r in rec.recorded.values())  # the subnetworks still depend on the input
    if method == "eidetic" and arch == "mlp":
        assert rec.dense_changed == []  # resistance: even the dense network keeps old tasks' logits
    else:
        assert rec.dense_changed  # not vacuous: the full network kept training
    A = result["accuracy_matrix"]
    assert all(A[2][j] == A[j][j] for j in range(3)) and result["metrics"]["BWT"] == 0.0


def test_rank_correlation_cli_writes_json(tmp_path):
    out = tmp_path / "rc"
    assert rank_correlation.main(["--dataset", "synthetic", "--width", "8", "--epochs", "2",
                                  "--max-permutations", "3", "--shapley-eval-batches", "1", "--out-dir", str(out),
                                  "--seeds", "0"]) == 0
    data = json.loads((out / "rank_correlation_seed0.json").read_text())
    assert data["seed"] == 0 and data["command"] and data["machine"]["python"] and data["git_commit"]
    assert list(data["scores"]) == list(baselines.SCORES)
    for kind in list(baselines.SCORES)[1:]:
        s = data["scores"][kind]
        assert s["seconds"] >= 0 and 0 <= s["topk_overlap"] <= 1 and sum(s["topk_per_layer"]) == data["k"]
        assert s["spearman_shapley"] is None or -1 <= s["spearman_shapley"] <= 1
    assert data["shapley_cost"]["orderings"] == 3
    assert rank_correlation.main(["--dataset", "synthetic", "--out-dir", str(out), "--seeds", "0"]) == 2
