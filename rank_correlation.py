"""The rank-correlation study: train task 1, then every registered neuron score against Monte Carlo Shapley.

`python rank_correlation.py [train.py options]` writes <out-dir>/rank_correlation_seed<s>.json per seed: each
score's Spearman rank correlation with Shapley and with the measured single-neuron removal effect, the overlap
of the top-k sets, the top-k's per-layer counts and the seconds it took.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import baselines
import datasets
import snv_core
import train
from models import ContinualNet, build_model


@torch.no_grad()
def removal_effect(model: ContinualNet, task: int, x: Tensor, y: Tensor, mu: Tensor, chunk: int = 32) -> Tensor:
    """[N] float64: mean over samples of |loss(all) - loss(all but i)|, neuron i replaced by mu_i (measured, not estimated)."""
    was_training = model.training
    model.eval()
    n = model.num_neurons
    base = F.cross_entropy(model(x, task), y, reduction="none")
    effects = []
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(start + chunk, n), device=x.device)
        keeps = torch.ones(len(idx), n, dtype=torch.bool, device=x.device)
        keeps[torch.arange(len(idx), device=x.device), idx] = False
        with model.gated(keeps, mu.to(x.device)):
            out = model(x.repeat(len(idx), *([1] * (x.dim() - 1))), task)
        loss = F.cross_entropy(out, y.repeat(len(idx)), reduction="none").view(len(idx), -1)
        effects.append((loss - base).abs().mean(1))
    model.train(was_training)
    return torch.cat(effects).double().cpu()



def spearman(a: Tensor, b: Tensor) -> float | None:
    """Spearman's rank correlation of two [N] scores (None where undefined, e.g. a constant score)."""
    from scipy.stats import spearmanr

    rho = spearmanr(a.numpy(), b.numpy()).statistic
    return None if np.isnan(rho) else float(rho)


def rank_correlation(args: argparse.Namespace, seed: int, device: torch.device) -> dict:
    """Train task 1; Monte Carlo Shapley (SNV's estimator without the bandit) vs every cheap score.

    Returns, per score: Spearman with Shapley and with the measured single-neuron removal effect,
    the overlap of the top-k sets, the top-k's per-layer counts and the seconds it took.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    bench = datasets.get_benchmark(args.dataset, args.num_tasks, seed, args.data_dir, pmnist_first=args.pmnist_first)
    model = build_model(args.arch, bench.input_shape, args.width).to(device)
    model.add_head(bench.classes_per_task)
    state = baselines.State(torch.zeros(model.num_neurons, dtype=torch.bool))
    freezer = snv_core.Freezer(model, state.frozen.to(device), 0)
    epochs = train.train_phase(model, bench, 0, [0], args.epochs, freezer, state, args, device,
                               torch.Generator().manual_seed(seed), "task 1")
    val = bench.tasks[0].val
    mu = snv_core.mean_activations(model, val.batches(args.eval_batch_size, device=device))
    x, y = train.eval_set(val, args.shapley_eval_batches, device)
    n = model.num_neurons
    k = snv_core.capacity_k(args.sparsity, n)
    v = snv_core.MaskedAccuracy(model, 0, x, y, mu, impl=args.shapley_impl, memory_gb=args.shapley_memory_gb)
    shapley = snv_core.permutation_shapley(v, n, k, tau=args.truncation, use_bandit=False,
                                           max_orderings=args.max_permutations, seed=seed * 1000, progress=args.progress)
    start = time.perf_counter()
    removal = removal_effect(model, 0, x, y, mu)
    removal_seconds = time.perf_counter() - start
    top = snv_core.top_k(shapley.phi, k)
    scores = {"shapley": {"seconds": round(shapley.seconds, 3), "spearman_removal": spearman(shapley.phi, removal),
                          "topk_per_layer": snv_core.layer_counts(model, top)}}
    for kind in (kind for kind in baselines.SCORES if kind != "shapley"):
        res = baselines.score(kind, baselines.ScoreInput(model, 0, x, y, mu, k, v, seed=seed * 1000, args=args))
        chosen = snv_core.top_k(res.phi, k)
        scores[kind] = {"seconds": round(res.seconds, 3), "spearman_shapley": spearman(res.phi, shapley.phi),
                        "spearman_removal": spearman(res.phi, removal),
                        "topk_overlap": int((chosen & top).sum()) / k,
                        "topk_per_layer": snv_core.layer_counts(model, chosen)}
    return {"command": train.command_line(), "seed": seed, "machine": train.machine(),
            "device": train.device_name(device), "git_commit": train.git_commit(), "args": vars(args),
            "num_neurons": n, "k": k, "layer_names": model.layer_names, "layer_sizes": model.layer_sizes,
            "epochs_run": epochs, "v_full": float(v(torch.ones(1, n, dtype=torch.bool))[0]),
            "shapley_cost": shapley.cost(), "removal_seconds": round(removal_seconds, 3), "scores": scores}


def main(argv: list[str] | None = None) -> int:
    """`python rank_correlation.py [train.py options]`: <out-dir>/rank_correlation_seed<s>.json per seed."""
    train.git_commit()
    parser = train.build_parser()
    parser.prog = "rank_correlation.py"
    parser.description = __doc__
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = f"results/rank_correlation_{args.dataset}"
    try:
        args = train.resolve_args(args)
        out = Path(args.out_dir)
        existing = [out / f"rank_correlation_seed{s}.json" for s in args.seeds
                    if (out / f"rank_correlation_seed{s}.json").exists()]
        if existing and not args.overwrite:
            raise train.UsageError(f"results already exist ({existing[0]}); pass --overwrite to replace them")
    except (train.UsageError, datasets.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = train.pick_device(args)
    for seed in args.seeds:
        result = rank_correlation(args, seed, device)
        train.write_json(out / f"rank_correlation_seed{seed}.json", result)
        print(f"[seed {seed}] " + " ".join(f"{kind}={s['spearman_shapley']:.3f}" for kind, s in result["scores"].items()
                                           if s.get("spearman_shapley") is not None), flush=True)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
