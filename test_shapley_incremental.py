"""The certified incremental V(S) evaluator (MaskedAccuracy impl="incremental") against the naive one."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

import bench_shapley
import snv_core
from models import MLP, build_model
from test_snv import briefly_trained


def trained_mlp(e: int, classes: int = 4, width: int = 8, seed: int = 0) -> tuple[MLP, Tensor, Tensor]:
    """A briefly trained 64-width-width-width-width MLP and its e evaluation images."""
    model, x, y = briefly_trained("mlp", width, classes, n=max(e, 40), steps=30, seed=seed)
    return model, x[:e], y[:e]


def walks(n: int, orderings: int, seed: int) -> Tensor:
    """Every prefix of `orderings` random orderings, their reverses (removals), skips and random coalitions."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(orderings):
        prefixes = (torch.arange(n).unsqueeze(0) < torch.arange(n + 1).unsqueeze(1))[:, torch.randperm(n, generator=gen).argsort()]
        blocks += [prefixes, prefixes.flip(0)[::3]]
    blocks += [torch.rand(8, n, generator=gen) > 0.5, blocks[0][5:6].repeat(3, 1)]
    return torch.cat(blocks)


def values(model: MLP, x: Tensor, y: Tensor, mu: Tensor, keeps: Tensor) -> tuple[Tensor, Tensor, int]:
    """(naive V, incremental V, images the incremental evaluator recomputed exactly)."""
    inc = snv_core.MaskedAccuracy(model, 0, x, y, mu, "incremental")
    got = inc(keeps)
    return snv_core.MaskedAccuracy(model, 0, x, y, mu, "naive")(keeps), got, inc.recomputed


@pytest.mark.parametrize("e", [1, 2, 3, 40])
def test_incremental_equals_naive_on_every_prefix(e):
    model, x, y = trained_mlp(e)
    mu = snv_core.mean_activations(model, [(x, y)])
    naive, inc, _ = values(model, x, y, mu, walks(model.num_neurons, 4, seed=e))
    assert torch.equal(inc, naive)


@pytest.mark.parametrize("group", [3, 50])
def test_incremental_equals_naive_in_batches_smaller_than_e(monkeypatch, group):
    """Naive's z_1 and the exact path in batches of `group` rows (E = 40): a batch under E rows is padded."""
    monkeypatch.setattr(snv_core._IncrementalMLP, "GROUP", group)
    model, x, y, mu = near_tie_mlp()
    naive, inc, recomputed = values(model, x, y, mu, walks(model.num_neurons, 2, seed=6))
    assert torch.equal(inc, naive)
    assert recomputed > group


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_incremental_equals_naive_at_other_depths(depth):
    torch.manual_seed(depth)
    model = MLP(64, 8, depth).eval()
    model.add_head(4)
    x, y = torch.randn(40, 64), torch.randint(0, 4, (40,))
    mu = snv_core.mean_activations(model, [(x, y)])
    naive, inc, _ = values(model, x, y, mu, walks(model.num_neurons, 2, seed=depth))
    assert torch.equal(inc, naive)


def test_incremental_equals_naive_with_ties_and_neurons_at_mu():
    """Duplicate head rows (logits tied bit for bit: naive's argmax takes the first), neurons whose output
    is a constant equal to mu (toggling them changes nothing), mu exactly 0."""
    model, x, y = trained_mlp(40, classes=5, seed=3)
    with torch.no_grad():
        head = model.heads[0]
        head.weight[3], head.bias[3] = head.weight[1], head.bias[1]
        model.linears[1].weight[:3] = 0.0
        model.linears[1].bias[:3] = torch.tensor([0.5, 0.0, -0.5])
    mu = snv_core.mean_activations(model, [(x, y)])
    assert mu[8:11].tolist() == [0.5, 0.0, -0.5]
    mu[12] = 0.0
    y = torch.where(torch.arange(40) % 2 == 0, torch.full_like(y, 3), torch.full_like(y, 1))
    naive, inc, recomputed = values(model, x, y, mu, walks(model.num_neurons, 3, seed=7))
    assert torch.equal(inc, naive)
    assert recomputed > 0  # the tie is never certified: it goes to the exact path


def test_incremental_step_whose_first_toggled_layer_changes_no_image():
    """One step toggles neuron 8 (layer 2, constant output relu(mu) = 0: no image changes there) and all of
    layer 4: every image must still be recomputed from layer 4 on."""
    model, x, y = trained_mlp(40, seed=4)
    with torch.no_grad():
        model.linears[1].weight[0], model.linears[1].bias[0] = 0.0, -0.5
    mu = snv_core.mean_activations(model, [(x, y)])
    keeps = torch.ones(3, model.num_neurons, dtype=torch.bool)
    keeps[0, [8] + list(range(24, 32))] = False
    keeps[2] = keeps[0]
    naive, inc, _ = values(model, x, y, mu, keeps)
    assert naive[0] != naive[1]
    assert torch.equal(inc, naive)


def near_tie_mlp() -> tuple[MLP, Tensor, Tensor, Tensor]:
    """Classes 0 and 1 with the same head row and biases 0 and 1e-8: in exact arithmetic class 1 wins, while
    naive's float32 logits (|logit| >> 1e-8 / ulp) are mostly tied bit for bit, so naive answers 0."""
    model, x, y = trained_mlp(40, classes=3, seed=5)
    with torch.no_grad():
        head = model.heads[0]
        head.weight[0] = head.weight[0].abs() * 20
        head.weight[1] = head.weight[0]
        head.weight[2] = 0.0
        head.bias[:] = torch.tensor([0.0, 1e-8, -100.0])
    mu = snv_core.mean_activations(model, [(x, y)])
    return model, x, torch.zeros_like(y), mu


def test_incremental_certificate_sends_near_ties_to_the_exact_path():
    model, x, y, mu = near_tie_mlp()
    keeps = walks(model.num_neurons, 2, seed=1)
    naive, inc, recomputed = values(model, x, y, mu, keeps)
    assert torch.equal(inc, naive)
    assert recomputed > 0
    assert naive.max() > 0  # naive's float32 ties answer class 0 (the label) on some images


def test_incremental_certifies_a_near_tie_between_two_wrong_classes():
    """Label 2 (never the argmax: weight 0, bias -100) while classes 0 and 1 are near-tied: naive's winner among
    them is uncertain, but every image is surely wrong, so none needs the exact path."""
    model, x, _, mu = near_tie_mlp()
    y = torch.full((x.shape[0],), 2)
    naive, inc, recomputed = values(model, x, y, mu, walks(model.num_neurons, 2, seed=1))
    assert torch.equal(inc, naive)
    assert naive.max() == 0.0 and recomputed == 0


def cancelling_head_mlp(seed: int) -> tuple[MLP, Tensor, Tensor, Tensor]:
    """Head rows of classes 0 and 1 with large weights of both signs, 1e-6 apart (relative): their logits are
    sums with cancellation, whose float32 rounding depends on the summation order; the label is 0."""
    model, x, y = trained_mlp(40, classes=3, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = model.heads[0]
        head.weight[0] = torch.randn(head.weight.shape[1], generator=gen) * 100
        head.weight[1] = head.weight[0] * (1 + 1e-6 * torch.randn(head.weight.shape[1], generator=gen))
        head.weight[2] = 0.0
        head.bias[:] = torch.tensor([0.0, 0.0, -1e4])
    mu = snv_core.mean_activations(model, [(x, y)])
    return model, x, torch.zeros_like(y), mu


def test_incremental_without_its_error_bound_would_disagree(monkeypatch):
    """Our float32 logits (the members' product plus a constant) and naive's (one product, another order) round
    differently, and with near-tied classes some argmax with them. With the bound every V equals naive's; with
    gamma = 0 and u = 0 (no bound on any rounding) our argmax is accepted and some V is not naive's."""
    disagreements = 0
    for seed in range(12):
        model, x, y, mu = cancelling_head_mlp(seed)
        keeps = walks(model.num_neurons, 2, seed=seed)
        naive, inc, _ = values(model, x, y, mu, keeps)
        assert torch.equal(inc, naive)
        with monkeypatch.context() as patched:
            patched.setattr(snv_core, "_gamma", lambda n, u: 0.0)
            patched.setattr(snv_core, "U32", 0.0)
            disagreements += not torch.equal(values(model, x, y, mu, keeps)[1], naive)
    assert disagreements > 0


def test_permutation_shapley_incremental_equals_naive():
    model, x, y = trained_mlp(40, seed=2)
    mu = snv_core.mean_activations(model, [(x, y)])
    n = model.num_neurons
    phis = [snv_core.permutation_shapley(snv_core.MaskedAccuracy(model, 0, x, y, mu, impl), n, 4, tau=0.3,
                                         min_orderings=2, max_orderings=6, chunk=7, seed=3).phi
            for impl in ("naive", "incremental")]
    assert torch.equal(phis[0], phis[1])


def test_incremental_counts_labels_outside_the_head_as_wrong():
    """V is the share of images whose argmax is the label: a label the head cannot output is never correct."""
    model, x, y = trained_mlp(40)
    mu = snv_core.mean_activations(model, [(x, y)])
    y = torch.where(torch.arange(40) % 3 == 0, torch.where(torch.arange(40) % 2 == 0, 4, -1), y)
    naive, inc, _ = values(model, x, y, mu, walks(model.num_neurons, 2, seed=8))
    assert torch.equal(inc, naive)
    assert naive.max() <= 26 / 40


def test_incremental_rejects_the_resnet():
    model = build_model("resnet18", (3, 8, 8), width=4)
    model.add_head(2)
    x, y = torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="MLP \\(2 or more hidden layers\\) only"):
        snv_core.MaskedAccuracy(model, 0, x, y, torch.zeros(model.num_neurons), "incremental")


def test_incremental_rechecks_images_whose_naive_unit_may_fire():
    """Neuron 16 (layer 3, mu = -1) sums three equal inputs with weights a + b + c ~ 0: on some images naive's
    float32 pre-activation is > 0 where the exact one is <= 0. Adding it to S then changes naive's answer (a
    weight 1e8 carries it to class 1) while our output may stay relu = 0, so that our state does not change:
    the bound of the window (which holds the 1e8 path) must already send these images to the exact path."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), width=8)
    model.add_head(2)
    model.eval()
    x, y = torch.rand(64, 1, 8, 8) + 0.5, torch.zeros(64, dtype=torch.long)
    l0, l1, l2, l3, head = *model.linears, model.heads[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        l1.weight[:3], l1.bias[:3] = l1.weight[0].abs(), 0.1  # units 0, 1, 2 of layer 2: equal outputs
        for weights in (l2.weight[0], l3.weight[0], head.weight):
            weights.zero_()
        l2.bias[0] = l3.bias[0] = 0.0
        l3.weight[0, 0], head.weight[1, 0] = 1e8, 10.0
        head.bias[:] = torch.tensor([0.5, 0.0])
        h = torch.relu(l1(torch.relu(l0(x.flatten(1)))))
        for _ in range(200):
            a, b = (torch.rand(2, generator=gen) * 2 - 1).tolist()
            l2.weight[0, :3] = torch.tensor([a, b, -(torch.tensor(a) + torch.tensor(b)).item()])
            if ((l2(h)[:, 0] > 0) & (h.double() @ l2.weight[0].double() <= 0)).any():
                break
    mu = torch.zeros(model.num_neurons)
    mu[16] = -1.0
    keeps = torch.ones(2, model.num_neurons, dtype=torch.bool)
    keeps[0, 16] = False
    naive, inc, _ = values(model, x, y, mu, keeps)
    assert naive[0] == 1.0 and naive[1] < 1.0
    assert torch.equal(inc, naive)


def test_incremental_equals_naive_on_the_bench_coalitions():
    """bench_shapley's MLP case (the PMNIST MLP after one epoch, 512 images): on each of the 800 coalitions its
    --quick run times, the incremental evaluator's V equals naive's."""
    model, x, y, keeps = bench_shapley.mlp_case(None, torch.device("cpu"), orderings=1)
    model.eval()
    mu = snv_core.mean_activations(model, [(x, y)])
    naive, inc, recomputed = values(model, x, y, mu, keeps)
    assert torch.equal(inc, naive)
    assert naive.unique().numel() > 100 and 0 < recomputed < 0.05 * naive.numel() * x.shape[0]
