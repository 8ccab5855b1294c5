"""Benchmark: the fast and the certified incremental V(S) evaluators against the naive one-forward-per-coalition one.

All run in one process on the same coalitions (every prefix of the same seeded orderings), interleaved
over several rounds: (a) the PMNIST MLP (N = 800, 512 evaluation images): naive, fast, incremental;
(b) ResNet-18 on 32x32x3 inputs at a CPU width: naive, fast (the incremental evaluator is MLP-only).
Prints each one's min and median seconds, its speedup over naive (ratio of the minima; of the medians
in brackets), the fast path's achieved FLOP/s next to a plain matrix multiply's, the share of images the
incremental one recomputed exactly and its time by part, and the wall time of a whole default Shapley step (until the
bandit stops or hits its cap) on one trained PMNIST task with the fast and the incremental evaluator. Exits
non-zero if any evaluator's V differs from naive's on any coalition, or the two steps' phi differ. The last line is
`RESULT mlp_speedup=<fast/naive> resnet_speedup=<fast/naive> incremental_speedup=<incremental/naive, MLP>`.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import datasets
import snv_core
from models import ContinualNet, build_model


def stage_flops(model: ContinualNet, x: Tensor) -> tuple[list[float], list[float], float]:
    """FLOPs per image of each stage's `stage_in`, of each `stage_out`, and of pooling + head."""
    counts: list[float] = []

    def hook(module: nn.Module, inputs: tuple[Tensor], out: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            counts.append(2 * module.in_channels * module.kernel_size[0] * module.kernel_size[1] * out[0].numel())
        elif isinstance(module, nn.Linear):
            counts.append(2 * module.in_features * module.out_features)

    def measured() -> float:
        total = float(sum(counts))
        counts.clear()
        return total

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    flops_in, flops_out = [], []
    with torch.no_grad():
        h = x[:1]
        for s in range(len(model.stage_layers)):
            h = model.stage_in(s, h)
            flops_in.append(measured())
            h = model.stage_out(s, h)
            flops_out.append(measured())
        model.heads[0](model.pool(h))
    for handle in handles:
        handle.remove()
    return flops_in, flops_out, measured()


def matmul_flops(device: torch.device, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of a plain float32 matrix multiply (4096 x 512 by 512 x 512)."""
    a, b = torch.randn(4096, 512, device=device), torch.randn(512, 512, device=device)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    sync(device)
    return reps * 2 * 4096 * 512 * 512 / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ordering_coalitions(n: int, orderings: int, positions: int, seed: int) -> Tensor:
    """The first `positions` prefixes S_1..S_p of each seeded ordering, as keep-masks [orderings * p, N]."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(orderings):
        pi = torch.randperm(n, generator=gen)
        blocks.append((torch.arange(n).unsqueeze(0) < torch.arange(1, positions + 1).unsqueeze(1))[:, pi.argsort()])
    return torch.cat(blocks)


def compare(name: str, model: ContinualNet, x: Tensor, y: Tensor, keeps: Tensor, device: torch.device,
            peak: float, impls: tuple[str, ...], rounds: int) -> dict[str, float]:
    """Time the evaluators `impls` (naive first) on the same coalitions, interleaved over `rounds` rounds;
    print min and median seconds and each one's speedup over naive (min / min); check that every value
    equals naive's. Returns {impl: speedup}."""
    model.eval()
    mu = snv_core.mean_activations(model, [(x, y)])
    evaluators = {impl: snv_core.MaskedAccuracy(model, 0, x, y, mu, impl) for impl in impls}
    for v in evaluators.values():
        v(keeps[:2])
    fast = evaluators["fast"]
    fast.groups_in, fast.groups_out = [0] * len(fast.groups_in), [0] * len(fast.groups_out)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    values: dict[str, Tensor] = {}
    for _ in range(rounds):
        for impl, v in evaluators.items():
            sync(device)
            start = time.perf_counter()
            values[impl] = v(keeps)
            sync(device)
            times[impl].append(time.perf_counter() - start)
    flops_in, flops_out, head = stage_flops(model, x)
    e, k = x.shape[0], keeps.shape[0]
    naive_flops = k * e * (sum(flops_in) + sum(flops_out) + head)
    fast_flops = e * (sum(g * f for g, f in zip(fast.groups_in, flops_in)) +
                      sum(g * f for g, f in zip(fast.groups_out, flops_out)) + rounds * k * head) / rounds
    best = {impl: min(t) for impl, t in times.items()}
    print(f"\n[{name}] N={model.num_neurons} neurons, {e} evaluation images, {k} coalitions "
          f"(prefixes of the same orderings), device {device}, {rounds} interleaved rounds")
    for impl in impls:
        extra = ""
        if impl == "naive":
            extra = f", {naive_flops / best[impl] / 1e9:.1f} GFLOP/s"
        elif impl == "fast":
            extra = f", {fast_flops / best[impl] / 1e9:.1f} GFLOP/s, {naive_flops / fast_flops:.1f}x fewer FLOPs"
        elif impl == "incremental":
            recomputed = evaluators[impl].recomputed / (evaluators[impl].evaluations * e)
            extra = f", {recomputed:.2%} of (coalition, image) pairs recomputed exactly"
        print(f"  {impl:<11}: min {best[impl]:7.3f} s, median {statistics.median(times[impl]):7.3f} s, "
              f"{k / best[impl]:9.1f} coalitions/s, speedup over naive {best['naive'] / best[impl]:5.2f}x "
              f"(median {statistics.median(times['naive']) / statistics.median(times[impl]):5.2f}x){extra}")
        if not torch.equal(values[impl], values["naive"]):
            raise SystemExit(f"{name}: the {impl} and naive evaluators disagree")
    print(f"  identical values on all {k} coalitions: True;  plain matmul: {peak / 1e9:.1f} GFLOP/s")
    return {impl: best["naive"] / best[impl] for impl in impls}


def incremental_parts(model: ContinualNet, x: Tensor, y: Tensor, keeps: Tensor, device: torch.device,
                      rounds: int) -> None:
    """Print where the incremental evaluator's time goes on these coalitions: each part's own time (its methods
    timed through wrappers, less the wrapped parts they call: the weight gathers inside the recomputes, the
    recomputes inside the window starts), best of `rounds`; and the wrapped run's total, a little above the
    unwrapped run's."""
    model.eval()
    mu = snv_core.mean_activations(model, [(x, y)])
    v = snv_core.MaskedAccuracy(model, 0, x, y, mu, "incremental")
    inc, seconds, nested = snv_core._IncrementalMLP, {}, []  # nested: wrapped time inside each open call
    parts = {"naive_z1": "naive's second layer", "rank_update": "rank updates", "weights": "weight gathers",
             "decide": "certificates", "exact": "exact path", "start_window": "window starts"}
    originals = {name: getattr(inc, name) for name in ("fresh", *parts)}

    def timed(name: str) -> Callable:
        def wrapper(self: snv_core._IncrementalMLP, *a: object) -> object:
            key = parts[name] if name != "fresh" else "recompute " + (
                "the head" if a[0] == self.depth - 1 else f"hidden layer {a[0] + 2} (of {self.depth})")
            sync(device)
            nested.append(0.0)
            start = time.perf_counter()
            out = originals[name](self, *a)
            sync(device)
            elapsed = time.perf_counter() - start
            own = elapsed - nested.pop()
            if nested:
                nested[-1] += elapsed
            seconds[key] = seconds.get(key, 0.0) + own
            return out
        return wrapper

    best: dict[str, float] = {}
    try:
        for name in originals:
            setattr(inc, name, timed(name))
        for _ in range(rounds):
            seconds.clear()
            sync(device)
            start = time.perf_counter()
            v(keeps)
            sync(device)
            seconds["total"] = time.perf_counter() - start
            best = {key: min(t, best.get(key, math.inf)) for key, t in seconds.items()}
    finally:
        for name, method in originals.items():
            setattr(inc, name, method)
    total = best.pop("total")
    print(f"  incremental by part (own time, best of {rounds} rounds each; wrapped, {total:.3f} s in all): "
          + ", ".join(f"{key} {t:.3f} s" for key, t in sorted(best.items())))


def train_task(model: ContinualNet, split: datasets.Split, device: torch.device, epochs: int) -> None:
    """A few epochs of Adam on one task's training split (batch 64): a trained network to value."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for x, y in split.batches(64, shuffle=True, generator=gen, device=device):
            opt.zero_grad()
            F.cross_entropy(model(x, 0), y).backward()
            opt.step()


def mlp_case(data_dir: str | None, device: torch.device,
             orderings: int) -> tuple[ContinualNet, Tensor, Tensor, Tensor]:
    """The bench's MLP: the paper's PMNIST MLP (seed 0) after one epoch on task 1, its first 512 validation images
    x [512, 1, 28, 28], y [512], and every prefix of `orderings` seeded orderings [orderings * 800, N]."""
    torch.manual_seed(0)
    bench = datasets.get_benchmark("pmnist", 1, 42, data_dir)
    mlp = build_model("mlp", bench.input_shape).to(device)
    mlp.add_head(10)
    train_task(mlp, bench.tasks[0].train, device, epochs=1)
    xs, ys = zip(*[b for _, b in zip(range(8), bench.tasks[0].val.batches(64, device=device))])
    keeps = ordering_coalitions(mlp.num_neurons, orderings, 800, seed=1).to(device)
    return mlp, torch.cat(xs), torch.cat(ys), keeps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer coalitions (finishes within ~5 min on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data-dir", default=None, help="MNIST location (default $SNV_DATA_DIR, else ./data)")
    p.add_argument("--resnet-width", type=int, default=8, help="ResNet-18 base channels (64 = full width)")
    p.add_argument("--resnet-images", type=int, default=128, help="evaluation images for the ResNet")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3 with --quick, else 5)")
    p.add_argument("--skip-step", action="store_true", help="skip the whole-Shapley-step timing")
    p.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    device = torch.device(args.device)
    rounds = args.rounds or (3 if args.quick else 5)
    snv_core.reuse_freed_memory()
    torch.manual_seed(0)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    print(f"bench_shapley: {' '.join(sys.argv)}\ncommit: {commit}\nmachine: {platform.platform()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}")
    peak = matmul_flops(device)

    mlp, x, y, mlp_keeps = mlp_case(args.data_dir, device, 1 if args.quick else 3)
    mlp_speedups = compare("PMNIST MLP 784-200-200-200-200", mlp, x, y, mlp_keeps, device, peak,
                           ("naive",) + tuple(i for i in snv_core.SHAPLEY_IMPLS if i != "naive"), rounds)
    mlp_speedup, incremental_speedup = mlp_speedups["fast"], mlp_speedups["incremental"]
    incremental_parts(mlp, x, y, mlp_keeps, device, rounds)

    resnet = build_model("resnet18", (3, 32, 32), args.resnet_width).to(device)
    resnet.add_head(10)
    rx = torch.randn(args.resnet_images, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    ry = torch.randint(0, 10, (args.resnet_images,), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        resnet.train()
        resnet.features(rx)  # BatchNorm running statistics of these inputs
    positions = resnet.num_neurons if not args.quick else min(resnet.num_neurons, 300)
    resnet_keeps = ordering_coalitions(resnet.num_neurons, 1, positions, seed=1).to(device)
    resnet_speedup = compare(f"ResNet-18 width {args.resnet_width} (32x32x3, random weights and inputs)", resnet,
                             rx, ry, resnet_keeps, device, peak, ("naive", "fast"), rounds)["fast"]

    step = None
    if not args.skip_step:
        mu = snv_core.mean_activations(mlp, [(x, y)])
        step, phis = {}, {}
        for impl in ("fast", "incremental"):
            v = snv_core.MaskedAccuracy(mlp, 0, x, y, mu, impl)
            res = snv_core.permutation_shapley(v, mlp.num_neurons, snv_core.capacity_k(0.1, mlp.num_neurons), seed=0)
            step[impl], phis[impl] = res.cost(), res.phi
            print(f"\n[whole default Shapley step, PMNIST MLP task 1, {impl}] c=0.1, tau=0.1, alpha=0.95, cap 200: "
                  f"{step[impl]['orderings']} orderings, {step[impl]['evaluations']} evaluations, {step[impl]['seconds']:.1f} s")
        if not torch.equal(phis["fast"], phis["incremental"]):
            raise SystemExit("whole Shapley step: the fast and incremental evaluators give different phi")
        print(f"  same phi: True; incremental / fast time: {step['incremental']['seconds'] / step['fast']['seconds']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "commit": commit,
                                              "threads": torch.get_num_threads(), "machine": platform.platform(),
                                              "device": str(device), "matmul_gflops": peak / 1e9,
                                              "rounds": rounds, "mlp_speedup": mlp_speedup,
                                              "resnet_speedup": resnet_speedup,
                                              "incremental_speedup": incremental_speedup,
                                              "shapley_step": step}, indent=1))
    print(f"RESULT mlp_speedup={mlp_speedup:.2f} resnet_speedup={resnet_speedup:.2f} "
          f"incremental_speedup={incremental_speedup:.2f}")


if __name__ == "__main__":
    main()
