"""Tests of the torch.distributed path on CPU (gloo): sharded Shapley orderings, BatchNorm across ranks and a 2-process
torchrun run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import datasets
import snv_core
import task_inference
import train
from baselines import State
from models import build_model

HERE = Path(__file__).resolve().parent
N, K = 12, 3
ORDERINGS = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(i)) for i in range(7)])


def game(keeps: torch.Tensor) -> torch.Tensor:
    """Well-separated additive values plus a random interaction term: V in [0, ~3]."""
    w = torch.tensor([1.0, 0.9, 0.8] + [0.05] * (N - 3), dtype=torch.float64)
    table = torch.rand(2 ** N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return (keeps.double() * w).sum(1) + 0.05 * table[(keeps.long() * 2 ** torch.arange(N)).sum(1)]


def fixed_orderings(**kw) -> snv_core.ShapleyResult:
    """The estimate over ORDERINGS, bandit off, with truncation."""
    return snv_core.permutation_shapley(game, N, K, tau=0.5, use_bandit=False, orderings=ORDERINGS, **kw)


def with_bandit(**kw) -> snv_core.ShapleyResult:
    """Seeded random orderings with the bandit on."""
    return snv_core.permutation_shapley(game, N, K, tau=-math.inf, max_orderings=60, seed=0, threshold="midpoint",
                                        **kw)


def gloo_rank(rank: int, world: int, store: str, out: str, work: Callable[[int, int], object]) -> None:
    """One rank of a gloo group of `world`: work(rank, world), saved to <out>/<work's name><rank>.pt."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(work(rank, world), os.path.join(out, f"{work.__name__}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def estimates(rank: int, world: int) -> dict:
    """Both estimates of this rank."""
    kw = dict(rank=rank, world_size=world, all_reduce=train.Dist(rank, world).all_reduce)
    fixed, bandit = fixed_orderings(**kw), with_bandit(**kw)
    return {"fixed": (fixed.phi, fixed.counts, fixed.evaluations), "bandit": (bandit.phi, bandit.orderings),
            "top_k": snv_core.top_k(bandit.phi, K)}


def test_sharded_shapley_matches_single_process(tmp_path):
    mp.spawn(gloo_rank, args=(2, str(tmp_path / "store"), str(tmp_path), estimates), nprocs=2)
    ranks = [torch.load(tmp_path / f"estimates{r}.pt") for r in range(2)]
    single = fixed_orderings()
    for r in ranks:
        phi, counts, evaluations = r["fixed"]
        assert torch.allclose(phi, single.phi, rtol=0, atol=1e-12)
        assert torch.equal(counts, single.counts) and evaluations == single.evaluations
    assert torch.equal(ranks[0]["bandit"][0], ranks[1]["bandit"][0])
    assert ranks[0]["bandit"][1] == ranks[1]["bandit"][1] < 60  # the bandit stopped, on both ranks at once
    assert torch.equal(ranks[0]["top_k"], ranks[1]["top_k"])
    assert ranks[0]["top_k"].nonzero().squeeze(1).tolist() == [0, 1, 2]


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_torchrun_two_processes_write_results_once(tmp_path, arch):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--dataset", "synthetic", "--device", "cpu", "--arch", arch, "--width", "4", "--epochs", "1",
           "--max-permutations", "4", "--shapley-eval-batches", "1", "--out-dir", str(out), "--seeds", "0",
           "--no-figures"]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["log_seed0.jsonl", "seed0.json", "summary.json"]
    assert proc.stdout.count("results in") == 1 and proc.stdout.count("task 3/3:") == 1
    log = [json.loads(line) for line in (out / "log_seed0.jsonl").read_text().splitlines()]
    assert proc.stdout.count(" epoch 1:") == len([r for r in log if r["epoch"] == 1]) > 0  # rank 0 logs, once
    data = json.loads((out / "seed0.json").read_text())
    assert data["args"]["world_size"] == 2 and len(data["shapley"]) == 3
    A = data["accuracy_matrix"]
    assert all(0 <= a <= 1 for row in A for a in row if a is not None)
    assert all(A[2][j] == A[j][j] for j in range(3))  # frozen subnetworks (and their BatchNorm) kept under DDP


def bn_worker(rank: int, world: int, store: str, out: str) -> None:
    """One gloo rank of a 3-task ResNet run: after every task, each BatchNorm's parameters and running statistics
    and the frozen mask B_t, saved to <out>/bn_rank<rank>.pt."""
    os.environ["WORLD_SIZE"] = str(world)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        args = train.resolve_args(train.build_parser().parse_args([
            "--dataset", "synthetic", "--device", "cpu", "--arch", "resnet18", "--width", "4", "--epochs", "1",
            "--max-permutations", "3", "--shapley-eval-batches", "1", "--out-dir", os.path.join(out, str(rank)),
            "--seeds", "0", "--no-figures"]))
        tasks = []

        def snapshot(t: int, model, state) -> None:
            tasks.append({"frozen": [m.clone() for m in model.split_neurons(state.frozen)],
                          "bn": [torch.stack([l.bn.weight.detach(), l.bn.bias.detach(), l.bn.running_mean,
                                              l.bn.running_var]).clone() for l in model.layers]})

        train.run_seed(args, 0, torch.device("cpu"), on_task_end=snapshot, dist=train.Dist(rank, world))
        torch.save(tasks, os.path.join(out, f"bn_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_frozen_batchnorm_channels_stay_identical_across_ranks_and_tasks(tmp_path):
    # The BatchNorm policy under DDP (docs/running.md): per-rank batch statistics, rank 0's running statistics
    # broadcast after every epoch, frozen channels normalised with (and restored to) their frozen statistics.
    mp.spawn(bn_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"bn_rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    for t in range(3):
        for a, b in zip(ranks[0][t]["bn"], ranks[1][t]["bn"], strict=True):
            assert torch.equal(a, b)  # every channel, frozen or not, agrees bit for bit at the end of each task
    for t, later in [(0, 1), (0, 2), (1, 2)]:  # channels frozen after task t keep their values (both ranks agree)
        for frozen, then, now in zip(ranks[0][t]["frozen"], ranks[0][t]["bn"], ranks[0][later]["bn"], strict=True):
            assert torch.equal(then[:, frozen], now[:, frozen])
    frozen, before, after = ranks[0][0]["frozen"], ranks[0][0]["bn"], ranks[0][1]["bn"]
    assert sum(int(m.sum()) for m in frozen) > 0  # not vacuous: channels were frozen after task 1 ...
    assert any(not torch.equal(b[2:, ~m], a[2:, ~m]) for m, b, a in zip(frozen, before, after))  # ... others moved


def eval_fixture() -> tuple:
    """A class-incremental evaluation with two finished subnetworks: args (eval batches of 23, so task 1's 24 test
    samples come as 23 + 1), the benchmark, a seeded MLP with three heads and its State."""
    args = train.resolve_args(train.build_parser().parse_args([
        "--dataset", "synthetic", "--device", "cpu", "--scenario", "class_il", "--width", "16",
        "--eval-batch-size", "23"]))
    bench = datasets.get_benchmark("synthetic", 3, 0)
    torch.manual_seed(0)
    model = build_model("mlp", bench.input_shape, 16)
    for _ in range(3):
        model.add_head(bench.classes_per_task)
    n, gen = model.num_neurons, torch.Generator().manual_seed(1)
    state = State(torch.zeros(n, dtype=torch.bool))
    state.subnets = [(torch.rand(n, generator=gen) < 0.6, torch.randn(n, generator=gen)) for _ in range(2)]
    return args, bench, model, state


def evaluations(rank: int = 0, world: int = 1) -> dict:
    """train.evaluate and task_inference.Recorder.evaluate of task 1 over heads 0..2, and the rows the network's
    first layer saw."""
    args, bench, model, state = eval_fixture()
    rows = []
    model.layers[0].producer.register_forward_pre_hook(lambda m, inp: rows.append(inp[0].shape[0]))
    split, group = bench.tasks[1].test, train.Dist(rank, world)
    acc, loss = train.evaluate(model, split, 1, 2, args, state, torch.device("cpu"), bench.classes_per_task, group)
    first = sum(rows)
    recorder = task_inference.Recorder(3, args.eval_batch_size, torch.device("cpu"), rank, world,
                                       group.all_reduce if world > 1 else None)
    by_rule = recorder.evaluate(model, state, split, 1, 2, 2)
    return {"accuracy": acc, "loss": loss, "rows": first, "by_rule": by_rule, "n": len(split)}


def test_sharded_evaluation_covers_every_sample_once_and_matches_single_process(tmp_path):
    mp.spawn(gloo_rank, args=(2, str(tmp_path / "store"), str(tmp_path), evaluations), nprocs=2)
    ranks = [torch.load(tmp_path / f"evaluations{r}.pt") for r in range(2)]
    single = evaluations()
    assert single["n"] == 24 and single["rows"] == 24 * 3  # one forward per head (two finished subnetworks)
    assert [r["rows"] for r in ranks] == [(12 + 1) * 3, 11 * 3]  # rank 0 takes the 1-sample batch too
    for r in ranks:
        assert r["accuracy"] == single["accuracy"] and r["by_rule"] == single["by_rule"]
        assert math.isclose(r["loss"], single["loss"], rel_tol=1e-6)  # float32 batch sums over other batches
    assert ranks[0]["loss"] == ranks[1]["loss"]  # the all-reduced sums are the same on every rank
    assert 0 < single["accuracy"] < 1
