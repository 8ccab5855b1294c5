"""Tests of the Shapley estimators, the neuron gates, freezing and the end-to-end loop."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math

import pytest
import torch
from torch import Tensor

import baselines
import snv_core
import train
from models import MLP, ResNet18, build_model


# ----------------------------------------------------------------------------- games

def additive(w: Tensor):
    """V(S) = sum_{i in S} w_i: phi_i = w_i."""
    return lambda keeps: (keeps.double() * w).sum(1)


def glove(keeps: Tensor) -> Tensor:
    """Glove game, left gloves {0, 1}, right glove {2}: phi = (1/6, 1/6, 2/3)."""
    return torch.minimum(keeps[:, :2].double().sum(1), keeps[:, 2:3].double().sum(1))


def unanimity(members: list[int]):
    """V(S) = 1 iff S contains every member: phi_i = 1/|members| for members, 0 otherwise."""
    return lambda keeps: keeps[:, members].all(1).double()


def random_game(n: int, seed: int):
    """A random set function (table of 2^n values) for brute-force comparisons."""
    table = torch.rand(2 ** n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    powers = 2 ** torch.arange(n)
    return lambda keeps: table[(keeps.long() * powers).sum(1)]


def brute_force_shapley(v, n: int) -> Tensor:
    """Shapley values as the average marginal over all n! orderings (the definition)."""
    phi = torch.zeros(n, dtype=torch.float64)
    perms = list(itertools.permutations(range(n)))
    for perm in perms:
        keep = torch.zeros(1, n, dtype=torch.bool)
        prev = float(v(keep)[0])
        for i in perm:
            keep[0, i] = True
            cur = float(v(keep)[0])
            phi[i] += cur - prev
            prev = cur
    return phi / len(perms)


# ----------------------------------------------------------------------------- exact Shapley (Eq. 5)

def test_exact_matches_brute_force_on_random_games():
    for seed in range(3):
        v = random_game(5, seed)
        assert torch.allclose(snv_core.exact_shapley(v, 5), brute_force_shapley(v, 5), atol=1e-12)


def test_exact_analytic_games():
    assert torch.allclose(snv_core.exact_shapley(glove, 3), torch.tensor([1 / 6, 1 / 6, 2 / 3], dtype=torch.float64))
    phi = snv_core.exact_shapley(unanimity([1, 3, 4]), 6)
    assert torch.allclose(phi, torch.tensor([0, 1 / 3, 0, 1 / 3, 1 / 3, 0], dtype=torch.float64))
    w = torch.tensor([0.3, -0.1, 0.7, 0.0], dtype=torch.float64)
    assert torch.allclose(snv_core.exact_shapley(additive(w), 4), w)


def test_exact_rejects_large_n():
    with pytest.raises(ValueError, match="too large"):
        snv_core.exact_shapley(glove, 30)


# ----------------------------------------------------------------------------- Monte Carlo (Eq. 9)

def test_monte_carlo_converges_to_exact():
    v = random_game(7, 11)
    exact = snv_core.exact_shapley(v, 7)
    errors = []
    for m in (10, 300, 5000):
        res = snv_core.permutation_shapley(v, 7, 2, tau=-math.inf, use_bandit=False, max_orderings=m, seed=3)
        assert res.orderings == m and bool((res.counts == m).all())
        errors.append(float((res.phi - exact).abs().max()))
    assert errors[2] < errors[0] and errors[2] < 0.02


def test_antithetic_orderings_still_converge():
    v = random_game(6, 5)
    exact = snv_core.exact_shapley(v, 6)
    res = snv_core.permutation_shapley(v, 6, 2, tau=-math.inf, use_bandit=False, max_orderings=4000,
                                       seed=1, antithetic=True)
    assert float((res.phi - exact).abs().max()) < 0.02


def test_efficiency_of_one_untruncated_ordering():
    v = random_game(8, 2)
    full, empty = torch.ones(1, 8, dtype=torch.bool), torch.zeros(1, 8, dtype=torch.bool)
    res = snv_core.permutation_shapley(v, 8, 1, tau=-math.inf, use_bandit=False, max_orderings=1, seed=9)
    assert math.isclose(float(res.phi.sum()), float(v(full)[0] - v(empty)[0]), abs_tol=1e-12)


def test_truncation_skips_exactly_the_low_value_prefix():
    # V(S) = |S| / 10 on a fixed ordering 0..9: the marginal of the neuron added at step p
    # has base V = p/10, recorded only when p/10 > tau = 0.35, i.e. for p >= 4 (neurons 4..9).
    n = 10
    v = lambda keeps: keeps.double().sum(1) / n
    res = snv_core.permutation_shapley(v, n, 1, tau=0.35, use_bandit=False, max_orderings=1,
                                       orderings=torch.arange(n).unsqueeze(0))
    assert res.counts.tolist() == [0] * 4 + [1] * 6
    assert math.isclose(res.truncated_share, 0.4)
    assert torch.allclose(res.phi[4:], torch.full((6,), 0.1, dtype=torch.float64))


def test_bandit_stops_early_with_the_true_top_k():
    # Well-separated values plus a noisy interaction term that keeps every marginal random.
    n, k = 12, 3
    w = torch.tensor([1.0, 0.9, 0.8] + [0.05] * 9, dtype=torch.float64)
    noise = random_game(n, 4)
    v = lambda keeps: (keeps.double() * w).sum(1) + 0.05 * noise(keeps)
    res = snv_core.permutation_shapley(v, n, k, tau=-math.inf, alpha=0.95, max_orderings=500, seed=0,
                                       threshold="midpoint")
    assert res.converged and res.orderings < 500
    assert snv_core.top_k(res.phi, k).nonzero().squeeze(1).tolist() == [0, 1, 2]
    # the paper's phi^(k) = k-th largest keeps that neuron active: the walk runs to the cap,
    # evaluating only the few neurons whose interval still covers phi^(k)
    lit = snv_core.permutation_shapley(v, n, k, tau=-math.inf, alpha=0.95, max_orderings=500, seed=0)
    assert not lit.converged and lit.orderings == 500 and lit.evaluations < 500 * (n - 1) / 3
    assert snv_core.top_k(lit.phi, k).nonzero().squeeze(1).tolist() == [0, 1, 2]


def test_bandit_evaluates_only_what_active_neurons_need():
    v = additive(torch.arange(20, dtype=torch.float64))
    res = snv_core.permutation_shapley(v, 20, 2, tau=-math.inf, max_orderings=50, seed=0)
    # zero-variance marginals: the active set empties right after the 5 obligatory orderings
    assert res.converged and res.orderings == 5 and res.evaluations == 2 + 5 * 19


def test_neuron_shapley_reverse_estimator():
    v = random_game(6, 8)
    exact = snv_core.exact_shapley(v, 6)
    res = snv_core.neuron_shapley(v, 6, 2, tolerance=-1.0, max_orderings=3000, min_orderings=3000, seed=2)
    assert float((res.phi - exact).abs().max()) < 0.03
    # truncation: a game that is at V({}) once neuron 0 is gone stops each walk there
    v0 = lambda keeps: keeps[:, 0].double() * (1 + keeps.double().sum(1))
    res = snv_core.neuron_shapley(v0, 30, 1, patience=3, tolerance=0.0, max_orderings=20, min_orderings=20)
    assert res.truncated_share > 0.3 and res.evaluations < 20 * 30



def test_neuron_shapley_bandit_stops_at_the_top_k_boundary():
    # additive game: three neurons worth 0.3 each, nine worth 0.01; every marginal is exact, so only the Bernstein
    # bound's range term keeps neurons active. The k-th largest estimate as threshold would keep the 3rd neuron
    # active forever (|phi_3 - phi^(k)| = 0); the boundary between the 3rd and 4th lets the walk stop.
    weights = torch.tensor([0.3, 0.3, 0.3] + [0.01] * 9, dtype=torch.float64)
    res = snv_core.neuron_shapley(additive(weights), 12, 3, max_orderings=200, seed=0)
    assert res.converged and res.orderings < 100
    assert snv_core.top_k(res.phi, 3).tolist() == [True] * 3 + [False] * 9


def test_top_k_and_capacity():
    phi = torch.tensor([0.1, 0.5, 0.5, -1.0, 0.3])
    assert snv_core.top_k(phi, 2).tolist() == [False, True, True, False, False]
    assert snv_core.capacity_k(0.1, 800) == 80 and snv_core.capacity_k(1 / 3, 9) == 3
    with pytest.raises(ValueError):
        snv_core.capacity_k(0.0, 10)
    assert snv_core.z_value(0.95) == pytest.approx(1.959964, abs=1e-5)


# ----------------------------------------------------------------------------- networks and gates


def test_per_layer_selection_splits_k_in_proportion_to_layer_sizes():
    assert snv_core.layer_quotas(80, [200] * 4) == [20] * 4
    assert snv_core.layer_quotas(5, [3, 3, 4]) == [2, 1, 2]  # 1.5, 1.5, 2.0: the first .5 remainder wins the tie
    assert snv_core.layer_quotas(7, [1, 99]) == [0, 7]
    phi = torch.tensor([9.0, 8.0, 7.0, 0.1, 0.2, 0.3, 1.0, 2.0, 3.0, 4.0])
    assert snv_core.top_k_per_layer(phi, 5, [3, 3, 4]).nonzero().squeeze(1).tolist() == [0, 1, 5, 8, 9]
    assert snv_core.top_k(phi, 5).nonzero().squeeze(1).tolist() == [0, 1, 2, 8, 9]  # global: the other layers' best


def test_per_layer_quotas_follow_each_layers_free_neurons():
    # After `outside`, quotas follow the candidates (free neurons) per layer, not the layer sizes: with k equal to
    # every free neuron (the last task under --capacity-rate), every free neuron is taken.
    phi = snv_core.outside(torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0, 6.0]), torch.tensor([0, 0, 0, 1, 1, 0]).bool())
    assert snv_core.top_k_per_layer(phi, 4, [3, 3]).nonzero().squeeze(1).tolist() == [0, 1, 2, 5]  # quotas [3, 1]
    assert snv_core.top_k_per_layer(phi, 2, [3, 3]).nonzero().squeeze(1).tolist() == [0, 2]  # 1.5, 0.5 -> [2, 0]
    assert int(snv_core.top_k_per_layer(torch.full((6,), float("-inf")), 2, [3, 3]).sum()) == 2  # none free: sizes


@pytest.mark.parametrize("flags", [("--selection", "per-layer"), ("--reuse", "off"), ("--candidates", "free")])
def test_selection_and_reuse_variants_run_and_do_what_they_say(tmp_path, flags):
    assert train.main(synthetic_args(tmp_path, "--width", "12", *flags)) == 0
    data = json.loads((tmp_path / "out" / "seed0.json").read_text())
    k = data["shapley"][0]["k"]
    if flags[1] == "per-layer":
        assert all(r["selected_per_layer"] == snv_core.layer_quotas(k, data["layer_sizes"]) for r in data["shapley"])
    elif flags[1] == "free":  # 3 tasks x k = N: every task adds k new neurons and the network ends full
        assert [r["newly_frozen"] for r in data["shapley"]] == [k] * 3 and data["metrics"]["CAP"] == 1.0
    else:
        assert data["metrics"]["BWT"] == 0.0  # each task runs through its own S_t, still frozen in B_t
        args = train.resolve_args(train.build_parser().parse_args(synthetic_args(tmp_path / "hook", "--width", "12",
                                                                                 *flags)))
        sizes = []
        train.run_seed(args, 0, torch.device("cpu"), on_task_end=lambda t, model, state: sizes.append(
            (int(state.subnets[t][0].sum()), int(state.frozen.sum()))))
        assert [m for m, _ in sizes] == [k] * 3 and sizes[-1][1] > k  # S_t alone, while B_t grows


def test_scheduled_k_takes_rho_of_the_free_neurons_with_an_equal_share_as_floor():
    assert snv_core.scheduled_k(0.25, 800, 10) == 200  # rho F_1 > F_1 / 10
    assert snv_core.scheduled_k(0.25, 178, 4) == 44  # 44.5 floored; the equal share 178 // 4 = 44 ties
    assert snv_core.scheduled_k(0.25, 133, 3) == 44  # the equal share 133 // 3 wins over 33.25
    assert snv_core.scheduled_k(0.25, 45, 1) == 45  # the last task takes every free neuron
    assert snv_core.scheduled_k(0.1, 800, 10) == 80  # rho = 1/T: the paper's uniform k


@pytest.mark.parametrize("selection", ["global", "per-layer"])
def test_capacity_rate_front_loads_new_neurons_and_fills_the_network(tmp_path, selection):
    # rho = 0.4 at width 12 leaves the layers unequally free after task 1 (quotas 5, 5, 5, 4 of k = 19): per-layer
    # quotas from the layer sizes would then leave free neurons unselected in the last task.
    assert train.main(synthetic_args(tmp_path, "--width", "12", "--candidates", "free", "--capacity-rate", "0.4",
                                     "--selection", selection)) == 0
    data = json.loads((tmp_path / "out" / "seed0.json").read_text())
    free, expected = sum(data["layer_sizes"]), []
    for t in range(3):
        expected.append(snv_core.scheduled_k(0.4, free, 3 - t))
        free -= expected[-1]
    assert [r["newly_frozen"] for r in data["shapley"]] == [r["k"] for r in data["shapley"]] == expected
    assert expected[0] > expected[1] and data["metrics"]["CAP"] == 1.0 and data["metrics"]["BWT"] == 0.0


def test_capacity_rate_without_free_candidates_is_refused(tmp_path, capsys):
    assert train.main(synthetic_args(tmp_path, "--capacity-rate", "0.5")) == 2
    assert "--capacity-rate" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_outside_ranks_frozen_neurons_last_so_top_k_picks_free_ones_first():
    phi = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.2])
    frozen = torch.tensor([True, False, True, False, False])
    assert snv_core.top_k(snv_core.outside(phi, frozen), 2).tolist() == [False, False, False, True, True]
    assert snv_core.top_k(snv_core.outside(phi, frozen), 4).tolist() == [True, True, False, True, True]  # 3 free


def test_neuron_counts_match_the_paper():
    assert MLP().num_neurons == 800
    resnet = ResNet18()
    assert resnet.num_neurons == 4800 and len(resnet.layers) == 20
    assert sum("shortcut" in name for name in resnet.layer_names) == 3


def test_gate_replaces_by_mean_and_stacks_coalitions():
    torch.manual_seed(0)
    model = ResNet18(in_channels=1, width=4).eval()
    model.add_head(3)
    x = torch.randn(5, 1, 8, 8)
    mu = snv_core.mean_activations(model, [(x, None)])
    stem = model.bn1(model.conv1(x))
    assert torch.allclose(mu[:4], stem.mean(dim=(0, 2, 3)), atol=1e-6)
    # BN in eval mode is affine per channel: the mean after BN is BN of the conv output's mean
    pre = model.conv1(x).mean(dim=(0, 2, 3))
    affine = (pre - model.bn1.running_mean) / (model.bn1.running_var + model.bn1.eps).sqrt() * model.bn1.weight + model.bn1.bias
    assert torch.allclose(mu[:4], affine, atol=1e-5)
    n = model.num_neurons
    with model.gated(torch.ones(n, dtype=torch.bool), mu):
        assert torch.equal(model(x, 0), model(x, 0).clone())
    keeps = torch.rand(3, n, generator=torch.Generator().manual_seed(1)) > 0.5
    singles = []
    for keep in keeps:
        with model.gated(keep, mu):
            singles.append(model(x, 0))
    with model.gated(keeps, mu):
        stacked = model(x.repeat(3, 1, 1, 1), 0)
    assert torch.allclose(torch.cat(singles), stacked, atol=1e-5)
    with model.gated(torch.zeros(n, dtype=torch.bool), mu):
        out = model(x, 0)
    assert torch.allclose(out, out[:1].expand_as(out))  # every neuron removed: the input no longer matters



def test_silent_units_are_the_relus_that_never_fire():
    model = MLP(in_features=2, width=3, depth=2)
    with torch.no_grad():
        for lin in model.linears:
            lin.weight.zero_()
        model.linears[0].weight[2] = torch.tensor([1.0, 0.0])  # fires only where x_0 > 0
        model.linears[0].bias.copy_(torch.tensor([-1.0, 0.0, 0.0]))  # unit 0 below zero, unit 1 exactly zero
        model.linears[1].bias.copy_(torch.tensor([2.0, -2.0, 0.5]))
    negative, mixed = torch.tensor([[-1.0, 5.0], [-2.0, 0.0]]), torch.tensor([[-1.0, 5.0], [3.0, 0.0]])
    expect = [True, True, True, False, True, False]
    assert snv_core.silent_units(model, [(negative, None)]).tolist() == expect
    expect[2] = False  # one positive input in one batch is enough
    assert snv_core.silent_units(model, [(negative, None), (mixed, None)]).tolist() == expect
    assert snv_core.layer_counts(model, snv_core.silent_units(model, [(mixed, None)])) == [2, 1]
    with pytest.raises(ValueError, match="silent_units got no data"):
        snv_core.silent_units(model, [])

def untrained_net(arch: str) -> tuple[torch.nn.Module, Tensor, Tensor, Tensor]:
    """A freshly initialised width-6 net with one 4-class head, 40 random 1 x 8 x 8 images, labels and mu."""
    torch.manual_seed(0)
    model = build_model(arch, (1, 8, 8), width=6)
    model.add_head(4)
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 4, (40,))
    return model, x, y, snv_core.mean_activations(model, [(x, y)])


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_masked_accuracy_fast_equals_naive(arch):
    model, x, y, mu = untrained_net(arch)
    n = model.num_neurons
    pi = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    walk = (torch.arange(n).unsqueeze(0) < torch.arange(0, n + 1, 2).unsqueeze(1))[:, pi.argsort()]
    keeps = torch.cat([torch.rand(10, n, generator=torch.Generator().manual_seed(2)) > 0.3, walk])
    fast = snv_core.MaskedAccuracy(model, 0, x, y, mu, "fast", chunk=16)(keeps)
    naive = snv_core.MaskedAccuracy(model, 0, x, y, mu, "naive")(keeps)
    assert torch.equal(fast, naive)
    res = snv_core.permutation_shapley(snv_core.MaskedAccuracy(model, 0, x, y, mu), model.num_neurons, 3,
                                       tau=-math.inf, use_bandit=False, max_orderings=1)
    full, empty = torch.ones(1, model.num_neurons, dtype=torch.bool), torch.zeros(1, model.num_neurons, dtype=torch.bool)
    v = snv_core.MaskedAccuracy(model, 0, x, y, mu)
    assert math.isclose(float(res.phi.sum()), float(v(full)[0] - v(empty)[0]), abs_tol=1e-12)


def briefly_trained(arch: str, width: int, classes: int, n: int, steps: int, seed: int = 0):
    """(model, x [n, 1, 8, 8], y [n]): a fresh model with one head, trained `steps` Adam steps on random data."""
    torch.manual_seed(seed)
    model = build_model(arch, (1, 8, 8), width=width)
    model.add_head(classes)
    x, y = torch.randn(n, 1, 8, 8), torch.randint(0, classes, (n,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x, 0), y).backward()
        opt.step()
    model.eval()
    return model, x, y


class BitsHead(torch.nn.Module):
    """Wraps a head: scores [B, 2] whose argmax is a hash bit of the exact bits of features and logits.

    With it V(S) changes (by 1/E per image) when an image's features differ in any bit, so fast == naive
    checks every (coalition, image) row bit for bit, not only the argmax of the logits.
    """

    def __init__(self, head: torch.nn.Module, seed: int) -> None:
        super().__init__()
        self.head, self.seed = head, seed

    def forward(self, f: Tensor) -> Tensor:
        words = torch.cat([f, self.head(f)], 1).view(torch.int32).long() & 0xFFFFFFFF
        mult = torch.randint(1, 2 ** 31 - 1, (2, words.shape[1]), generator=torch.Generator().manual_seed(self.seed))
        digest = ((words & 0xFFFF) * mult[0] + (words >> 16) * mult[1]).sum(1)
        return torch.nn.functional.one_hot(digest % 1000003 % 2, 2).float()


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_masked_accuracy_fast_equals_naive_bit_for_bit(arch):
    """A briefly trained net, where removing a neuron often changes only some images' activations (so the
    fast path reuses rows): every (coalition, image)'s features match naive's bit for bit."""
    model, x, y = briefly_trained(arch, 8 if arch == "mlp" else 4, classes=4, n=40, steps=50)
    mu = snv_core.mean_activations(model, [(x, y)])
    n = model.num_neurons
    gen = torch.Generator().manual_seed(1)
    prefixes = (torch.arange(n).unsqueeze(0) < torch.arange(n + 1).unsqueeze(1))[:, torch.randperm(n, generator=gen).argsort()]
    keeps = torch.cat([prefixes[:40], prefixes[::max(1, n // 24)], prefixes.flip(0)[:12],  # add, skip, remove
                       torch.rand(6, n, generator=gen) > 0.5, prefixes[7:8].repeat(3, 1)])
    plain, bits_y = model.heads[0], torch.randint(0, 2, (40,), generator=gen)
    for yy, head in [(y, plain), (bits_y, BitsHead(plain, 0)), (bits_y, BitsHead(plain, 1))]:
        model.heads[0] = head
        naive = snv_core.MaskedAccuracy(model, 0, x, yy, mu, "naive")(keeps)
        for chunk in (1, 5, 32):
            assert torch.equal(snv_core.MaskedAccuracy(model, 0, x, yy, mu, "fast", chunk=chunk)(keeps), naive)
    model.heads[0] = plain
    if arch == "mlp":
        v = snv_core.MaskedAccuracy(model, 0, x, y, mu, "fast", chunk=n + 1)
        v(prefixes)
        layer = torch.repeat_interleave(torch.arange(4), torch.tensor(model.layer_sizes))
        added = layer[(prefixes[1:] & ~prefixes[:-1]).nonzero()[:, 1]]
        whole = [1 + int((added < s).sum()) for s in range(1, 4)]  # coalitions differing before stage s
        assert sum(v.groups_in[1:]) < sum(whole)  # fewer images recomputed than whole coalitions


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_shapley_memory_budget_sizes_the_chunk_and_leaves_v_unchanged(arch):
    model, x, y, mu = untrained_net(arch)
    # widest stage half per image: the MLP's 6 units; the ResNet's layer1 forward_in, [conv1, skip] = 2 x 6 x 8 x 8
    per_coalition = snv_core.coalition_bytes(model, x)
    assert per_coalition == 40 * 4 * (6 if arch == "mlp" else 2 * 6 * 8 * 8)
    n = model.num_neurons
    keeps = torch.cat([(torch.arange(n).unsqueeze(0) < torch.arange(n + 1).unsqueeze(1))[:, torch.randperm(n).argsort()],
                       torch.rand(5, n) > 0.5])
    naive = snv_core.MaskedAccuracy(model, 0, x, y, mu, "naive")(keeps)
    for gib, chunk in [(per_coalition / 2 ** 31, 1), (3.5 * per_coalition / 2 ** 30, 3), (1e6, snv_core.FAST_CHUNK)]:
        model.train()
        v = snv_core.MaskedAccuracy(model, 0, x, y, mu, "fast", memory_gb=gib)
        assert v.chunk == chunk and model.training  # the probe leaves the model's mode as it was
        assert torch.equal(v(keeps), naive)


def test_masked_accuracy_fast_equals_only_bitwise_equal_rows():
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0], [float("nan"), 1.0]])
    b = torch.tensor([[-0.0, 1.0], [2.0, 3.0], [float("nan"), 1.0]])
    assert snv_core.MaskedAccuracy._bitwise_equal_rows(a, b).tolist() == [False, True, True]


# ----------------------------------------------------------------------------- freezing

OPTIMIZERS = [("adam", 0.0), ("sgd", 5e-3), ("adamw", 1e-2)]


@pytest.mark.parametrize("opt,wd", OPTIMIZERS)
@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_freezer_keeps_frozen_neurons_bit_identical(arch, opt, wd):
    torch.manual_seed(0)
    model = build_model(arch, (1, 8, 8), width=6)
    model.add_head(3)
    model.add_head(3)
    n = model.num_neurons
    frozen = torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = train.build_parser().parse_args(["--optimizer", opt, "--weight-decay", str(wd), "--lr", "0.05"])
    optimizer = train.make_optimizer(model.parameters(), args)
    freezer = snv_core.Freezer(model, frozen, frozen_heads=1)
    model.train()
    for step in range(5):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
        loss = torch.nn.functional.cross_entropy(model(x, 1), y) + model(x, 0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        freezer.step(optimizer)
    after = model.state_dict()
    for layer, mask in zip(model.layers, model.split_neurons(frozen)):
        tensors = {"weight": layer.producer.weight, "bias": layer.producer.bias}
        if layer.bn is not None:
            tensors.update(bn_w=layer.bn.weight, bn_b=layer.bn.bias, rm=layer.bn.running_mean, rv=layer.bn.running_var)
        for name, t in tensors.items():
            if t is None:
                continue
            key = next(k for k, v in model.state_dict().items() if v.data_ptr() == t.data_ptr())
            assert torch.equal(after[key][mask], before[key][mask]), f"{layer.name}.{name} moved"
            assert not torch.equal(after[key][~mask], before[key][~mask]), f"{layer.name}.{name} did not train"
    assert torch.equal(after["heads.0.weight"], before["heads.0.weight"])
    assert not torch.equal(after["heads.1.weight"], before["heads.1.weight"])



@pytest.mark.parametrize("opt,wd,momentum,moves", [("adam", 0.0, 0.9, False), ("adamw", 0.0, 0.9, False),
                                                   ("adamw", 1e-2, 0.9, True), ("sgd", 0.0, 0.0, False),
                                                   ("sgd", 0.0, 0.9, True), ("sgd", 1e-3, 0.0, True)])
def test_freezer_restores_parameters_only_where_the_optimizer_can_move_them(opt, wd, momentum, moves):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), width=6)
    model.add_head(3)
    frozen = torch.zeros(model.num_neurons, dtype=torch.bool)
    frozen[::2] = True
    args = train.build_parser().parse_args(["--optimizer", opt, "--weight-decay", str(wd), "--momentum",
                                            str(momentum), "--lr", "0.05"])
    optimizer = train.make_optimizer(model.parameters(), args)
    assert snv_core.may_move_zero_gradients(optimizer) == moves
    freezer = snv_core.Freezer(model, frozen, frozen_heads=0)
    before = model.layers[0].producer.weight.detach()[::2].clone()
    for _ in range(3):  # without the restore, every step must leave the frozen rows exactly as they were
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8), 0), torch.randint(0, 3, (8,)))
        optimizer.zero_grad()
        loss.backward()
        freezer.mask_gradients()
        optimizer.step()
    unchanged = torch.equal(model.layers[0].producer.weight.detach()[::2], before)
    assert unchanged if not moves else (not unchanged or wd == 0)  # weight decay moves them: restore needed


def test_frozen_channels_normalise_in_training_as_at_test():
    torch.manual_seed(0)
    model = build_model("resnet18", (1, 8, 8), width=6)
    model.add_head(3)
    frozen = torch.rand(model.num_neurons, generator=torch.Generator().manual_seed(3)) < 0.4
    mask = model.split_neurons(frozen)[0]  # the stem: its input is the image in train and eval mode alike
    assert mask.any() and (~mask).any()
    x = torch.randn(16, 1, 8, 8) * 3 + 1  # batch statistics far from the running ones
    outs: list[Tensor] = []
    model.layers[0].gate.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    freezer = snv_core.Freezer(model, frozen, 0)
    model.eval()
    model(x, 0)
    model.train()
    with freezer.training():
        model(x, 0)
    freezer.restore()
    model(x, 0)
    at_test, fixed, batch = outs
    assert torch.equal(fixed[:, mask], at_test[:, mask])
    assert torch.equal(fixed[:, ~mask], batch[:, ~mask])
    assert not torch.allclose(batch[:, mask], at_test[:, mask], atol=1e-2)  # without it they would differ
    assert all(layer.bn.fixed is None for layer in model.layers)


def synthetic_args(tmp_path, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--epochs", "3", "--max-permutations", "8", "--shapley-eval-batches", "1",
            "--out-dir", str(tmp_path / "out"), "--seeds", "0", "--no-figures", *extra]


class LogitRecorder:
    """on_task_end hook: each task's TIL logits right after it is learned, compared after every later task.

    mismatches: (t, j) where task j's subnetwork logits changed after task t; dense_changed: the same
    for the full network's logits (model(x, j)), which shows whether the network itself moved.
    """

    def __init__(self, bench) -> None:
        self.bench = bench
        self.recorded: dict[int, Tensor] = {}
        self.dense: dict[int, Tensor] = {}
        self.mismatches: list[tuple[int, int]] = []
        self.dense_changed: list[tuple[int, int]] = []

    def __call__(self, t: int, model, state) -> None:
        model.eval()
        with torch.no_grad():
            for j in range(t + 1):
                x, _ = next(self.bench.tasks[j].test.batches(1000))
                logits, dense = train.task_logits(model, x, j, state), model(x, j)
                if j in self.recorded and not torch.equal(self.recorded[j], logits):
                    self.mismatches.append((t, j))
                if j in self.dense and not torch.equal(self.dense[j], dense):
                    self.dense_changed.append((t, j))
                self.recorded.setdefault(j, logits)
                self.dense.setdefault(j, dense)


@pytest.mark.parametrize("opt,wd", OPTIMIZERS)
@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_old_task_logits_are_bit_identical_in_til(tmp_path, arch, opt, wd):
    args = train.resolve_args(train.build_parser().parse_args(
        synthetic_args(tmp_path, "--arch", arch, "--width", "16" if arch == "mlp" else "8", "--optimizer", opt, "--weight-decay", str(wd),
                       "--mask-finetune-epochs", "1")))
    rec = LogitRecorder(train.datasets.get_benchmark("synthetic", args.num_tasks, 0, None))
    result = train.run_seed(args, 0, torch.device("cpu"), on_task_end=rec)
    assert len(rec.recorded) == 3 and not rec.mismatches
    # not vacuous: the network itself kept training (dense old-task logits moved) and the
    # subnetworks are alive (their logits vary across inputs)
    assert rec.dense_changed == [(1, 0), (2, 0), (2, 1)]
    assert all(float(r.std(0).min()) > 0 for r in rec.recorded.values())
    A = result["accuracy_matrix"]
    assert all(A[2][j] == A[j][j] for j in range(3)) and result["metrics"]["BWT"] == 0.0


@pytest.mark.parametrize("extra", [(), ("--selection", "per-layer", "--reset", "gxd", "--reset-rate", "1.0",
                                          "--capacity-rate", "0.5")])
def test_free_candidates_with_long_mask_training_keep_old_task_logits_bit_identical(tmp_path, extra):
    """Also the combination of the best zero-forgetting variants: per-layer quotas, every plastic neuron
    re-initialised before each task, front-loaded capacity."""
    args = train.resolve_args(train.build_parser().parse_args(synthetic_args(
        tmp_path, "--width", "16", "--candidates", "free", "--mask-finetune-epochs", "3", *extra)))
    rec = LogitRecorder(train.datasets.get_benchmark("synthetic", args.num_tasks, 0, None))
    result = train.run_seed(args, 0, torch.device("cpu"), on_task_end=rec)
    assert len(rec.recorded) == 3 and not rec.mismatches and rec.dense_changed  # the network kept training
    assert result["metrics"]["BWT"] == 0.0
    assert [r["newly_frozen"] for r in result["shapley"]] == [r["k"] for r in result["shapley"]]


@pytest.mark.parametrize("batch", [10, 64, 3])
def test_mlp_hand_written_backward_equals_autograd_bit_for_bit(batch):
    torch.manual_seed(batch)
    model = build_model("mlp", (1, 28, 28))
    for _ in range(3):
        model.add_head(10)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    frozen = torch.rand(model.num_neurons, generator=torch.Generator().manual_seed(batch)) < 0.4
    frozen[:200] = False  # a layer without frozen neurons (its mask is None)
    expected_loss = torch.nn.functional.cross_entropy(model(x, 1), y)
    expected_loss.backward()
    freezer = snv_core.Freezer(model, frozen, 0)
    freezer.mask_gradients()
    expected = {p: p.grad for p in model.parameters()}
    loss, params, grads = model.cross_entropy_grads(x, y, 1, freezer.frozen_rows)
    assert torch.equal(loss, expected_loss.detach())
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if expected[p] is not None}
    assert len(params) == 10 and not any(p is q for p in params for q in model.heads[0].parameters())
    for p, g in zip(params, grads):
        assert torch.equal(g, expected[p])
    hand = {id(p): g for p, g in zip(params, grads)}
    rows = hand[id(model.linears[1].weight)][frozen[200:400]]
    assert rows.numel() > 0 and not rows.any() and hand[id(model.linears[1].weight)].any()  # frozen rows: exactly 0
    dead = float((model.linears[0](x.flatten(1)) <= 0).float().mean())
    assert 0.2 < dead < 0.8  # not vacuous: the ReLU backward zeroes a good share of units


@pytest.mark.parametrize("opt,wd", [("adam", 0.0), ("adam", 1e-2), ("adamw", 1e-2)])
def test_fused_adam_updates_as_torch_adam_bit_for_bit(opt, wd):
    # FusedAdam calls the fused kernel directly: the same parameters and state as torch.optim.Adam(W)(fused=True)
    # over steps where some parameters have no gradient, through .grad (step) and as a list (update).
    shapes = [(20, 30), (20,), (5, 20), (5,)]
    reference, fused, listed = ([torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                                 for i, s in enumerate(shapes)] for _ in range(3))
    torch_cls = torch.optim.AdamW if opt == "adamw" else torch.optim.Adam
    optimizers = [torch_cls(reference, lr=0.01, weight_decay=wd, fused=True)]
    args = train.build_parser().parse_args(["--optimizer", opt, "--weight-decay", str(wd), "--lr", "0.01"])
    optimizers += [train.make_optimizer(fused, args), train.make_optimizer(listed, args)]
    assert isinstance(optimizers[1], train.FusedAdam)
    gen = torch.Generator().manual_seed(9)
    for step in range(6):
        grads = [None if step % 3 == 0 and i % 2 else torch.randn(s, generator=gen) for i, s in enumerate(shapes)]
        for params, optimizer in zip((reference, fused), optimizers):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
            optimizer.step()
        optimizers[2].update([p for p, g in zip(listed, grads) if g is not None], [g for g in grads if g is not None])
    for p, q, r in zip(reference, fused, listed):
        assert torch.equal(p, q) and torch.equal(p, r)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizers[0].state[p][key], optimizers[1].state[q][key])
            assert torch.equal(optimizers[0].state[p][key], optimizers[2].state[r][key])
    assert int(optimizers[0].state[reference[1]]["step"]) == 4  # not vacuous: skipped where its gradient was None
    with pytest.raises(ValueError, match="one parameter group"):
        train.FusedAdam([{"params": reference[:1]}, {"params": reference[1:]}], 0.01, wd, False)


def test_training_steps_through_the_hand_written_backward_change_no_result(tmp_path, monkeypatch):
    # A TIL SNV run takes MLP.cross_entropy_grads for its training steps (mask fine-tuning, gated, takes autograd)
    # and ends with the numbers of a run forced onto autograd.
    runs, taken = [], []
    original = train.hand_written_backward
    for name, rule in (("hand", lambda *a: taken.append(original(*a)) or taken[-1]), ("autograd", lambda *a: False)):
        monkeypatch.setattr(train, "hand_written_backward", rule)
        assert train.main(synthetic_args(tmp_path / name, "--width", "16", "--mask-finetune-epochs", "1")) == 0
        runs.append(json.loads((tmp_path / name / "out" / "seed0.json").read_text()))
    assert True in taken and False in taken
    assert runs[0]["accuracy_matrix"] == runs[1]["accuracy_matrix"]
    assert [s["phi"] for s in runs[0]["shapley"]] == [s["phi"] for s in runs[1]["shapley"]]


@pytest.mark.parametrize("extra,expected", [((), True), (("--scenario", "class_il"), False),
                                            (("--method", "ewc"), False), (("--method", "packnet"), False),
                                            (("--arch", "resnet18", "--width", "4"), False),
                                            (("--amp", "bf16"), False), (("--optimizer", "sgd"), False)])
def test_hand_written_backward_only_where_it_is_the_same_computation(tmp_path, extra, expected):
    args = train.resolve_args(train.build_parser().parse_args(synthetic_args(tmp_path, *extra)))
    model = build_model(args.arch, (1, 28, 28), args.width)
    model.add_head(2)
    state = train.State(torch.zeros(model.num_neurons, dtype=torch.bool),
                        method=baselines.build_method(args, model, 0))
    net = train.TrainForward(model, state, args.scenario, 0)
    optimizer = train.make_optimizer(model.parameters(), args)
    assert train.hand_written_backward(net, model, optimizer, state, args, 0) == expected


def test_run_records_each_tasks_silent_units_on_its_validation_data(tmp_path):
    args = train.resolve_args(train.build_parser().parse_args(synthetic_args(tmp_path, "--width", "16")))
    bench = train.datasets.get_benchmark("synthetic", args.num_tasks, 0, None)
    seen = []
    result = train.run_seed(args, 0, torch.device("cpu"), on_task_end=lambda t, model, state: seen.append(
        snv_core.layer_counts(model, snv_core.silent_units(model, bench.tasks[t].val.batches(100)))))
    assert result["silent_units"] == seen and len(seen) == args.num_tasks
    assert len({tuple(row) for row in seen}) > 1  # not vacuous: the counts differ between tasks

# ----------------------------------------------------------------------------- end to end

def test_cli_end_to_end_writes_valid_json(tmp_path):
    assert train.main(synthetic_args(tmp_path, "--scenario", "class_il")) == 0
    data = json.loads((tmp_path / "out" / "seed0.json").read_text())
    T = data["args"]["num_tasks"]
    A = data["accuracy_matrix"]
    assert len(A) == T and all(len(row) == T for row in A)
    for i in range(T):
        for j in range(T):
            assert (A[i][j] is None) == (j > i + 1)
            assert A[i][j] is None or 0 <= A[i][j] <= 1
    for key in ("ACC", "BWT", "FWT", "PS", "AF", "CAP"):
        assert data["metrics"][key] is not None
    assert len(data["random_init_accuracy"]) == T and data["seed"] == 0 and data["git_commit"]
    assert len(data["shapley"]) == T
    for entry in data["shapley"]:
        assert entry["orderings"] >= 1 and entry["evaluations"] > 0 and entry["seconds"] >= 0
        assert len(entry["phi"]) == data["num_neurons"]
    frozen = [e["frozen_total"] for e in data["shapley"]]
    assert frozen == sorted(frozen) and frozen[-1] <= data["num_neurons"]
    assert len(data["silent_units"]) == T
    assert all(0 <= k <= size for row in data["silent_units"] for k, size in zip(row, data["layer_sizes"], strict=True))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metrics"]["ACC"]["n"] == 1


def test_same_seed_same_numbers(tmp_path):
    runs = []
    for name in ("a", "b"):
        assert train.main(synthetic_args(tmp_path / name)) == 0
        runs.append(json.loads((tmp_path / name / "out" / "seed0.json").read_text()))
    assert runs[0]["accuracy_matrix"] == runs[1]["accuracy_matrix"]
    assert [s["phi"] for s in runs[0]["shapley"]] == [s["phi"] for s in runs[1]["shapley"]]


def test_cil_cached_old_logits_match_the_subnetworks(tmp_path, monkeypatch):
    """The cached finished-head logits line up with each shuffled batch, and the run matches an uncached one."""
    args = train.resolve_args(train.build_parser().parse_args(synthetic_args(tmp_path, "--scenario", "class_il")))
    runs, checked = [], []

    def check(t: int, model, state) -> None:
        split = train.datasets.get_benchmark("synthetic", args.num_tasks, 0, None).tasks[t].train
        cache = train.cache_finished_logits(model, split, t + 1, state, args, torch.device("cpu"))
        if t == 0:
            return
        gen = torch.Generator().manual_seed(1)
        for x, _, pos in split.batches(7, shuffle=True, generator=gen, positions=True):
            live = torch.cat([train.frozen_logits(model, x, i, state) for i in range(t + 1)], dim=1)
            assert cache.shape == (len(split), (t + 1) * 2) and torch.allclose(cache[pos], live, atol=1e-6)
        checked.append(t)

    runs.append(train.run_seed(args, 0, torch.device("cpu"), on_task_end=check))
    assert checked == [1, 2]
    monkeypatch.setattr(train, "cache_finished_logits", lambda *a, **k: None)
    runs.append(train.run_seed(args, 0, torch.device("cpu")))
    assert runs[0]["accuracy_matrix"] == runs[1]["accuracy_matrix"]
    assert [s["phi"] for s in runs[0]["shapley"]] == [s["phi"] for s in runs[1]["shapley"]]


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_cil_with_augmentation_runs_finished_subnetworks_stacked(tmp_path, monkeypatch, arch):
    """Augmenting source (crop padding set: no cache): the finished subnetworks' heads run as stacked forwards
    (train.finished_logits). In eval mode on CPU they equal one forward per task (frozen_logits) bit for bit for
    batches of 4 or more samples, within 1e-6 for smaller ones (MKL sums 1 to 3 rows in another order); training
    and evaluating with the per-task loop instead gives the same run."""
    synthetic = train.datasets.make_synthetic

    def augmenting(*a, **k):
        bench = synthetic(*a, **k)
        padded = dataclasses.replace(bench.tasks[0].train.source, pad=2)
        for task in bench.tasks:
            for split in (task.train, task.val, task.test):
                split.source = padded
        return bench

    monkeypatch.setattr(train.datasets, "get_benchmark", lambda name, n, seed, *a, **k: augmenting(n or 3, seed))
    monkeypatch.setattr(train, "STACKED_ROWS", 10)  # stacked forwards of 3 samples x 3 subnetworks
    args = train.resolve_args(train.build_parser().parse_args(synthetic_args(
        tmp_path, "--scenario", "class_il", "--arch", arch, "--width", "4", "--epochs", "1")))
    checked: list[tuple[int, bool]] = []

    def check(t: int, model, state) -> None:
        split = train.datasets.get_benchmark("synthetic", args.num_tasks, 0).tasks[t].train
        assert train.cache_finished_logits(model, split, t + 1, state, args, torch.device("cpu")) is None
        model.train()
        for x, _ in split.batches(9, shuffle=True, generator=torch.Generator().manual_seed(t), augment=True):
            stacked = train.finished_logits(model, x, t + 1, state)
            loop = torch.cat([train.frozen_logits(model, x, i, state) for i in range(t + 1)], dim=1)
            assert stacked.shape == (len(x), (t + 1) * 2) and model.training
            assert torch.equal(stacked, loop) if len(x) >= 4 else torch.allclose(stacked, loop, rtol=0, atol=1e-6)
            checked.append((t, len(x) >= 4))

    stacked_run = train.run_seed(args, 0, torch.device("cpu"), on_task_end=check)
    assert {t for t, _ in checked} == {0, 1, 2} and {big for _, big in checked} == {True, False}  # 84 = 9 x 9 + 3
    monkeypatch.setattr(train, "finished_logits", lambda model, x, f, state: torch.cat(
        [train.frozen_logits(model, x, i, state) for i in range(f)], dim=1))
    loop_run = train.run_seed(args, 0, torch.device("cpu"))
    assert stacked_run["accuracy_matrix"] == loop_run["accuracy_matrix"]
    assert [s["phi"] for s in stacked_run["shapley"]] == [s["phi"] for s in loop_run["shapley"]]


def test_finished_logits_keep_a_method_s_own_forward():
    """A method that overrides forward (here: logits doubled) cannot be stacked: finished_logits runs its forward
    per task; the default forward is stacked and gives the undoubled logits."""

    class Doubled(baselines.Method):
        def forward(self, model, x, task):
            return 2 * model(x, task)

    torch.manual_seed(0)
    model = MLP(12, 8, 3)
    for _ in range(2):
        model.add_head(3)
    n, x = model.num_neurons, torch.randn(5, 12)
    subnets = [(torch.rand(n) < 0.5, torch.randn(n)) for _ in range(2)]
    plain = train.finished_logits(model, x, 2, train.State(torch.zeros(n, dtype=torch.bool), subnets))
    doubled = train.finished_logits(model, x, 2, train.State(torch.zeros(n, dtype=torch.bool), subnets, Doubled()))
    assert torch.equal(doubled, 2 * plain) and not torch.equal(plain, 0 * plain)


def test_no_cil_cache_when_augmenting(tmp_path):
    args = train.resolve_args(train.build_parser().parse_args(synthetic_args(tmp_path, "--scenario", "class_il")))
    bench = train.datasets.get_benchmark("synthetic", args.num_tasks, 0, None)
    model = train.build_model("mlp", bench.input_shape, 8)
    n = model.num_neurons
    state = train.State(torch.zeros(n, dtype=torch.bool), subnets=[(torch.ones(n, dtype=torch.bool), torch.zeros(n))])
    for _ in range(2):
        model.add_head(2)
    split = bench.tasks[1].train
    assert train.cache_finished_logits(model, split, 1, state, args, torch.device("cpu")).shape == (len(split), 2)
    split.source.pad = 1
    assert train.cache_finished_logits(model, split, 1, state, args, torch.device("cpu")) is None


@pytest.mark.parametrize("method", ["sgd", "joint"])
def test_baseline_bounds_run(tmp_path, method):
    assert train.main(synthetic_args(tmp_path, "--method", method)) == 0
    data = json.loads((tmp_path / "out" / "seed0.json").read_text())
    assert data["shapley"] == [] and data["metrics"]["CAP"] is None


@pytest.mark.parametrize("flags,message", [
    (["--sparsity", "0"], "--sparsity"),
    (["--sparsity", "1.5"], "--sparsity"),
    (["--truncation", "1.2"], "--truncation"),
    (["--confidence", "1"], "--confidence"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--shapley-memory-gb", "0"], "--shapley-memory-gb"),
])
def test_bad_input_gives_clear_error(tmp_path, capsys, flags, message):
    assert train.main(synthetic_args(tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "seed0.json").exists()


@pytest.mark.parametrize("allowed,value,ok", [
    (">= 1", 1, True), (">= 1", 0, False), ("> 0", 0.0, False), ("> 0", 1e-9, True),
    ("(0, 1]", 0.0, False), ("(0, 1]", 1.0, True), ("[0, 1)", 0.0, True), ("[0, 1)", 1.0, False),
    ("(0, 1)", 0.5, True), ("(0, 1)", 1.0, False), ("[0, 1]", 1.0, True), ("[0, 1]", -0.1, False),
    (">= 1", None, True),  # unset (e.g. --width): nothing to check
])
def test_in_range_reads_each_bound_as_written(allowed, value, ok):
    args = argparse.Namespace(eval_batch_size=value)
    assert train.in_range(args, "--eval-batch-size", allowed) == (ok, f"--eval-batch-size must be "
                                                                     f"{'' if allowed[0] == '>' else 'in '}{allowed}, got {value}")


def test_unknown_flag_values_exit_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(synthetic_args(tmp_path, "--method", "magic"))
    assert e.value.code == 2


def test_existing_results_are_not_overwritten(tmp_path, capsys):
    assert train.main(synthetic_args(tmp_path)) == 0
    assert train.main(synthetic_args(tmp_path)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert train.main(synthetic_args(tmp_path, "--overwrite")) == 0


def test_impossible_task_split_is_rejected_before_training(tmp_path, capsys):
    assert train.main(synthetic_args(tmp_path, "--dataset", "splitmnist", "--num-tasks", "3")) == 2
    err = capsys.readouterr().err
    assert "3 tasks cannot split 10 classes" in err and "[1, 2, 5, 10]" in err
    assert not (tmp_path / "out" / "seed0.json").exists()


def test_missing_data_lists_the_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.datasets, "_download", lambda target: f"offline: {target.name}")
    assert train.main(synthetic_args(tmp_path, "--dataset", "pmnist", "--data-dir", str(tmp_path / "nodata"))) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and str(tmp_path / "nodata") in err
