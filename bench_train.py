"""Benchmark: training and data-pipeline throughput on one device, and projected wall times of the paper's runs.

Measured (on --device, random inputs and random-pixel stand-ins written to a temporary folder):
  - training steps/s and images/s (forward, cross-entropy, backward, fused Adam step) of the 4x200 MLP at
    batch 10 and of full-width ResNet-18 at 32x32 / batch 64 and 224x224 / batch 128 (64x64 / batch 64
    without --quick);
  - the data pipeline alone, images/s: in-memory (CIFAR-100 pickles, TinyImageNet- and PMNIST-shaped tensors;
    gathered, augmented and normalised on the device) and ImageNet class folders of JPEGs through the DataLoader;
  - Shapley coalitions/s of the fast V(S) evaluator (snv_core.MaskedAccuracy) for the MLP and ResNet-18 32x32;
  - before vs after, side by side in one process (9 interleaved rounds; fastest and median of each, and the
    median of the rounds' ratios): the data pipelines of BEFORE_COMMIT's datasets.py (read from git) against
    the current one, and the masked training step of the paper's MLP at batch 10 (data + step over a whole
    epoch of 20,000 images, mid-run: 320 frozen neurons, 4 finished heads) with BEFORE_COMMIT's datasets.py,
    Freezer and step (autograd, a host sync per step; `step_before`) against the current ones
    (train.train_step: the MLP's hand-written backward and FusedAdam.update); ratios are before / after.
Projected (arithmetic on the measured rates, labelled as such in the JSON): wall time per task and per run
(one seed, T tasks) of each paper protocol (PAPER section 2: max epochs, batch, 70/10/20 split of each task's
pooled images) at the maximum number of epochs (early stopping usually ends sooner) plus the Shapley step at
its cap of orderings without truncation or bandit stop (upper bounds).

Writes results/bench/bench_train_[quick_]<device>.json; the last line is
`RESULT mlp_steps_per_s=<f> resnet32_steps_per_s=<f> imagenet_loader_images_per_s=<f> train_step_speedup=<f>`.
On a GPU machine: `python bench_train.py --device cuda`.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import baselines
import datasets
import snv_core
import train
from bench_shapley import ordering_coalitions, sync
from models import ContinualNet, build_model

HERE = Path(__file__).resolve().parent
BEFORE_COMMIT = "895fcb1c118c669c2d6cf0c483c6315583fbed20"
"""The last commit with the per-batch host pipeline (CPU gather + copy, ImageNet thread pool per batch) and the
Freezer that restored every frozen entry after every step."""
TRAIN_STEP = "pmnist mlp masked training step (data + step)"
"""The before/after case whose ratio is train_step_speedup."""

MODELS = {  # name: (arch, input shape, batch, classes of a task's head, measured with --quick)
    "mlp": ("mlp", (1, 28, 28), 10, 10, True),
    "resnet32": ("resnet18", (3, 32, 32), 64, 10, True),
    "resnet64": ("resnet18", (3, 64, 64), 64, 20, False),
    "resnet224": ("resnet18", (3, 224, 224), 128, 100, True),
}
PROTOCOLS = {  # paper protocol: (model, pipeline, images pooled per task)
    "pmnist": ("mlp", "in_memory_pmnist", 70_000),
    "cifar100": ("resnet32", "in_memory_cifar100", 60_000 // 10),
    "tinyimagenet": ("resnet64", "in_memory_tinyimagenet", 110_000 // 10),
    "imagenet1k": ("resnet224", "imagenet_loader", (1_281_167 + 50_000) // 10),
}


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds that fn() takes, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def model_and_inputs(name: str, device: torch.device, images: int) -> tuple[ContinualNet, Tensor, Tensor]:
    """Model `name` (paper width, one head, seeded) and random inputs x [images, C, H, W], labels y [images]."""
    arch, shape, _, classes, _ = MODELS[name]
    torch.manual_seed(0)
    model = build_model(arch, shape).to(device)
    model.add_head(classes)
    return model, torch.randn(images, *shape, device=device), torch.randint(0, classes, (images,), device=device)


def train_steps(name: str, device: torch.device, warmup: int, steps: int) -> dict:
    """Training steps of model `name` on random inputs: steps/s and images/s (measured)."""
    arch, shape, batch, _, _ = MODELS[name]
    model, x, y = model_and_inputs(name, device, batch)
    model.train()
    opt = train.make_optimizer(model.parameters(), argparse.Namespace(optimizer="adam", lr=1e-3, weight_decay=0.0))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, 0), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    seconds = timed(device, lambda: [step() for _ in range(steps)])
    print(f"  train {name:9s} {arch} {shape} batch {batch}: {steps / seconds:8.2f} steps/s "
          f"{steps * batch / seconds:9.1f} images/s  ({steps} steps, {seconds:.1f} s)", flush=True)
    return {"arch": arch, "input": list(shape), "batch": batch, "neurons": model.num_neurons, "steps": steps,
            "seconds": seconds, "steps_per_s": steps / seconds, "images_per_s": steps * batch / seconds}


def in_memory_splits(root: Path, ds) -> dict[str, object]:
    """In-memory training splits of module `ds` (a datasets.py version): CIFAR-100 from its stand-in pickles,
    TinyImageNet- and PMNIST-shaped random uint8 tensors (their files are decoded once per run, not per batch)."""
    gen = torch.Generator().manual_seed(0)
    cifar = ds.get_benchmark("cifar100", 10, seed=0, data_dir=str(root)).tasks[0].train
    tiny = torch.randint(0, 256, (4000, 3, 64, 64), dtype=torch.uint8, generator=gen)
    mnist = torch.randint(0, 256, (20000, 1, 28, 28), dtype=torch.uint8, generator=gen)
    perm = torch.randperm(28 * 28, generator=gen)
    labels = torch.zeros(4000, dtype=torch.int64)
    return {"in_memory_cifar100": (cifar, 64),
            "in_memory_tinyimagenet": (ds.Split(ds.TensorSource(tiny, *ds.MEAN_STD["tinyimagenet"], pad=8),
                                                torch.arange(4000), labels), 64),
            "in_memory_pmnist": (ds.Split(ds.TensorSource(mnist, *ds.MEAN_STD["mnist"], perm=perm),
                                          torch.arange(20000), torch.zeros(20000, dtype=torch.int64)), 10)}


def pipeline_pass(split, batch: int, device: torch.device, max_batches: int | None) -> dict:
    """One shuffled, augmented pass over `split`, at most `max_batches` batches (None: the whole pass): the seconds
    until the first batch and the rate, measured. A whole pass's rate counts every batch (an in-memory split
    prepares consecutive batches without augmentation together, before the first one is yielded); a bounded
    pass's rate counts the batches after the first (the DataLoader's worker start-up excluded)."""
    gen = torch.Generator().manual_seed(0)
    sync(device)
    start = time.perf_counter()
    first, images, first_images = 0.0, 0, 0
    for i, (x, _) in enumerate(split.batches(batch, shuffle=True, generator=gen, augment=True, device=device)):
        sync(device)
        if i == 0:
            first, first_images = time.perf_counter(), len(x)
        else:
            images += len(x)
        if i + 1 == max_batches:
            break
    end = time.perf_counter()
    if max_batches is None:
        images, seconds = images + first_images, end - start
    else:
        seconds = end - first
    return {"batch": batch, "first_batch_s": first - start, "whole_pass": max_batches is None, "images": images,
            "seconds": seconds, "images_per_s": images / seconds}


def pipelines(root: Path, imagenet: object, imagenet_batch: int, device: torch.device, max_batches: int) -> dict:
    """Images/s of the data pipelines alone (measured): whole passes over the in-memory splits and `max_batches`
    batches of the ImageNet DataLoader."""
    out = {name: pipeline_pass(split, batch, device, None)
           for name, (split, batch) in in_memory_splits(root, datasets).items()}
    out["imagenet_loader"] = {**pipeline_pass(imagenet, imagenet_batch, device, max_batches),
                              "workers": imagenet.source.workers}
    for name, r in out.items():
        print(f"  pipeline {name:24s} {r['images_per_s']:9.1f} images/s  ({r['images']} images in {r['seconds']:.2f} s"
              f"{'' if r['whole_pass'] else ' after the first batch'}; first batch at {r['first_batch_s']:.2f} s)",
              flush=True)
    return out


def shapley_rate(name: str, device: torch.device, images: int, coalitions: int) -> dict:
    """Coalitions/s of the fast V(S) evaluator on `images` random evaluation images (measured)."""
    model, x, y = model_and_inputs(name, device, images)
    mu = snv_core.mean_activations(model, [(x, y)])
    v = snv_core.MaskedAccuracy(model, 0, x, y, mu, "fast")
    keeps = ordering_coalitions(model.num_neurons, 1, coalitions, seed=1).to(device)
    seconds = timed(device, lambda: v(keeps))
    print(f"  shapley {name:9s} N={model.num_neurons} on {images} images: {coalitions / seconds:9.2f} coalitions/s "
          f"({coalitions} prefixes of one ordering, {seconds:.1f} s)", flush=True)
    return {"neurons": model.num_neurons, "images": images, "coalitions": coalitions, "seconds": seconds,
            "coalitions_per_s": coalitions / seconds}


def load_before(name: str) -> object | None:
    """Module `name` (datasets, snv_core) as of BEFORE_COMMIT, imported from git as `<name>_before`; None if git
    cannot show it."""
    proc = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:{name}.py"], cwd=HERE, capture_output=True, text=True)
    if proc.returncode:
        print(f"  before/after skipped: git cannot show {BEFORE_COMMIT[:7]}:{name}.py ({proc.stderr.strip()})")
        return None
    path = Path(tempfile.mkdtemp()) / f"{name}_before.py"
    path.write_text(proc.stdout)
    spec = importlib.util.spec_from_file_location(f"{name}_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{name}_before"] = module
    spec.loader.exec_module(module)
    return module


def step_before(net: torch.nn.Module, model: ContinualNet, optimizer: torch.optim.Optimizer, freezer, state,
                x: Tensor, y: Tensor, j: int, finished: Tensor | None, args: argparse.Namespace, c: int) -> Tensor:
    """BEFORE_COMMIT's training step (the body of its train_phase loop), train.train_step's signature: autograd
    backward, the loss's finiteness read by the host after every step, Freezer.step."""
    loss = F.cross_entropy(net(x, j, finished), train.targets(y, j, args.scenario, c)) + state.method.penalty(model, x, j)
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    freezer.step(optimizer)
    state.method.after_step(model)
    return loss.detach()


def masked_epoch(split, freezer_cls: type, step: Callable[..., Tensor],
                 device: torch.device) -> tuple[Callable[[], None], ContinualNet]:
    """One epoch of training steps (`step`: train.train_step or step_before) of the paper's MLP at batch 10 in the
    middle of a TIL SNV run (task 5: 320 of 800 neurons frozen, 4 finished heads): every batch of `split` loaded
    through it (a whole epoch, so that a pipeline that prepares the epoch's data at once pays for no more than it
    uses), frozen entries kept by `freezer_cls`; the loss is summed on the device and read once at the end, as
    train_phase does per epoch. Returns (run, the model it trains)."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28)).to(device)
    for _ in range(5):
        model.add_head(10)
    frozen = torch.zeros(model.num_neurons, dtype=torch.bool, device=device)
    frozen[torch.randperm(model.num_neurons)[:320]] = True
    args = argparse.Namespace(optimizer="adam", lr=1e-3, weight_decay=0.0, amp="none", scenario="task_il",
                              channels_last=False, arch="mlp")
    opt = train.make_optimizer(model.parameters(), args)
    state = baselines.State(frozen)
    net = train.TrainForward(model, state, "task_il", 4)
    freezer = freezer_cls(model, frozen, 4)

    def run() -> None:
        gen, loss_sum = torch.Generator().manual_seed(0), torch.zeros((), device=device)
        for x, y in split.batches(10, shuffle=True, generator=gen, device=device):
            loss_sum += step(net, model, opt, freezer, state, x, y, 4, None, args, 10)
        float(loss_sum)

    return run, model


def before_after(root: Path, device: torch.device, rounds: int, max_batches: int, imagenet_batch: int) -> dict | None:
    """Before (BEFORE_COMMIT's datasets.py) vs after, interleaved in one process: the fastest of `rounds` each
    (the least disturbed by other load on the machine) and their ratio; also the ratio of the medians and the
    median of the rounds' before / after (each pair adjacent in time, so a machine whose speed drifts during
    the run moves both alike). Pipelines as in `pipeline_pass` (the same
    images for both): a whole in-memory pass; the DataLoader after its first batch, whose seconds are recorded."""
    before, core_before = load_before("datasets"), load_before("snv_core")
    if before is None or core_before is None:
        return None
    old, new = in_memory_splits(root, before), in_memory_splits(root, datasets)
    old_imagenet = before.get_benchmark("imagenet1k", 1, seed=0, data_dir=str(root)).tasks[0].train
    new_imagenet = datasets.get_benchmark("imagenet1k", 1, seed=0, data_dir=str(root)).tasks[0].train
    def pipeline(split, batch: int, limit: int | None) -> Callable[[], dict]:
        return lambda: pipeline_pass(split, batch, device, limit)

    def whole(run: Callable[[], None]) -> Callable[[], dict]:
        return lambda: {"seconds": timed(device, run)}

    cases = {
        "in_memory_cifar100 pipeline": [pipeline(s["in_memory_cifar100"][0], 64, None) for s in (old, new)],
        "imagenet folder pipeline": [pipeline(s, imagenet_batch, max_batches) for s in (old_imagenet, new_imagenet)],
        TRAIN_STEP: [whole(masked_epoch(s["in_memory_pmnist"][0], core.Freezer, step, device)[0])
                     for s, core, step in ((old, core_before, step_before), (new, snv_core, train.train_step))],
    }
    out = {}
    for name, (run_old, run_new) in cases.items():
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        run_old(), run_new()  # warm-up: one-time copies to the device, caches
        for _ in range(rounds):
            runs["before"].append(run_old())
            runs["after"].append(run_new())
        b, a = (min(r["seconds"] for r in runs[k]) for k in ("before", "after"))
        mb, ma = (statistics.median(r["seconds"] for r in runs[k]) for k in ("before", "after"))
        paired = statistics.median(o["seconds"] / n["seconds"] for o, n in zip(runs["before"], runs["after"]))
        out[name] = {**runs, "ratio_before_over_after": b / a, "ratio_of_medians": mb / ma,
                     "median_of_paired_ratios": paired}
        print(f"  {name:46s} before {b:7.3f} s  after {a:7.3f} s  ratio {b / a:5.2f}x  (fastest of {rounds}; "
              f"medians {mb:7.3f} / {ma:7.3f} s, {mb / ma:5.2f}x; median of the rounds' ratios {paired:5.2f}x)",
              flush=True)
    return out


def split_sizes(n: int) -> tuple[int, int, int]:
    """Train/val/test sizes of a task of n pooled images (datasets._split_indices' rounding)."""
    n_val, n_test = max(1, round(datasets.SPLIT_FRACTIONS[1] * n)), max(1, round(datasets.SPLIT_FRACTIONS[2] * n))
    return n - n_val - n_test, n_val, n_test


def projections(trained: dict, pipes: dict, shapley: dict) -> dict:
    """Projected hours per task and per run (one seed) of each paper protocol from the measured rates."""
    parser = train.build_parser()
    orderings = parser.get_default("max_permutations")
    eval_images = parser.get_default("shapley_eval_batches") * train.SHAPLEY_BATCH
    out = {}
    for protocol, (model, pipeline, pooled) in PROTOCOLS.items():
        d = train.DATASET_DEFAULTS[protocol]
        batch, epochs, tasks = d["batch_size"], d["epochs"], d["num_tasks"]
        finetune = max(1, epochs // 10)
        notes = []
        if model in trained:
            compute_s = 1 / trained[model]["steps_per_s"]
        else:
            compute_s = 4 / trained["resnet32"]["steps_per_s"]
            notes.append(f"{model} step time projected as 4x resnet32's (pixel ratio; not measured with --quick)")
        load_s = batch / pipes[pipeline]["images_per_s"]
        if pipeline == "imagenet_loader":
            step_s = max(compute_s, load_s)
            notes.append("ImageNet: loader workers overlap the step, step time = max(step, batch load)")
        else:
            step_s = compute_s + load_s
            notes.append("in-memory: batch gathering runs before the step on the same device, times added")
        forward_per_image = step_s / batch / 3
        notes.append("evaluation forward per image assumed 1/3 of a training step's time per image")
        rate_key = "mlp" if model == "mlp" else "resnet32"
        rate = shapley[rate_key]["coalitions_per_s"] * shapley[rate_key]["images"] / eval_images
        if model != rate_key:
            rate *= batch / compute_s / trained["resnet32"]["images_per_s"]
            notes.append(f"Shapley rate of {model} projected from resnet32's by their training images/s ratio")
        if shapley[rate_key]["images"] != eval_images:
            notes.append(f"Shapley rate scaled linearly from {shapley[rate_key]['images']} to {eval_images} images")
        n_train, n_val, _ = split_sizes(pooled)
        steps_per_epoch = math.ceil(n_train / batch)
        epoch_s = steps_per_epoch * step_s + n_val * forward_per_image
        shapley_s = orderings * shapley[rate_key]["neurons"] / rate  # ResNet-18's N does not depend on the input
        task_s = (epochs + finetune) * epoch_s + shapley_s
        out[protocol] = {
            "kind": "projection", "tasks": tasks, "epochs": epochs, "mask_finetune_epochs": finetune, "batch": batch,
            "train_images_per_task": n_train, "steps_per_epoch": steps_per_epoch, "step_s": step_s,
            "shapley_upper_bound_s": shapley_s, "per_task_hours": task_s / 3600, "per_run_hours": tasks * task_s / 3600,
            "notes": notes}
        print(f"  {protocol:12s} {steps_per_epoch:6d} steps/epoch x {epochs}+{finetune} epochs, step {step_s:.4f} s, "
              f"Shapley <= {shapley_s / 3600:6.2f} h: per task <= {task_s / 3600:8.2f} h, "
              f"per run ({tasks} tasks) <= {tasks * task_s / 3600:9.2f} h", flush=True)
    return out


def steps(name: str, quick: bool) -> tuple[int, int]:
    """(warm-up, timed) training steps of model `name`; with --quick one timed step of the 224x224 model."""
    if name == "mlp":
        return (20, 200) if quick else (100, 2000)
    if not quick:
        return 3, 20
    return (0, 1) if name == "resnet224" else (1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and images (under 5 minutes on 2 CPU cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workers", type=int, default=None, help="ImageNet DataLoader workers; default: the CPU count")
    p.add_argument("--out", default=None, help="default: results/bench/bench_train_[quick_]<device>.json")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; use --device cpu")
    device = torch.device(args.device)
    q = args.quick
    out = Path(args.out or HERE / "results" / "bench" / f"bench_train_{'quick_' if q else ''}{args.device}.json")
    print(f"bench_train: {train.command_line()}\ndevice: {train.device_name(device)}, {torch.get_num_threads()} "
          f"threads, commit {train.git_commit()}", flush=True)
    snv_core.reuse_freed_memory()
    start = time.perf_counter()

    def phase(text: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="snv_standins_") as tmp:
        root = Path(tmp)
        datasets.write_standin("cifar100", root, per_class=50 if q else 500)
        datasets.write_standin("imagenet1k", root, per_class=40 if q else 200, classes=10 if q else 20)
        imagenet_batch = 32 if q else 128
        imagenet = datasets.get_benchmark("imagenet1k", 1, seed=0, data_dir=str(root), workers=args.workers)
        imagenet_train = imagenet.tasks[0].train
        phase("measured: training steps")
        trained = {name: train_steps(name, device, *steps(name, q)) for name, (*_, in_quick) in MODELS.items()
                   if in_quick or not q}
        phase("measured: data pipelines alone")
        pipes = pipelines(root, imagenet_train, imagenet_batch, device, max_batches=8 if q else 100)
        phase("measured: Shapley coalitions/s (fast evaluator)")
        shapley = {"mlp": shapley_rate("mlp", device, 512, 200 if q else 2000),
                   "resnet32": shapley_rate("resnet32", device, 64 if q else 512, 4 if q else 64)}
        phase("measured: before vs after, side by side")
        compared = before_after(root, device, rounds=9, max_batches=8 if q else 50,
                                imagenet_batch=imagenet_batch)
    phase("projected (upper bounds: max epochs, Shapley at its cap of orderings):")
    projected = projections(trained, pipes, shapley)
    result = {"mlp_steps_per_s": trained["mlp"]["steps_per_s"], "resnet32_steps_per_s": trained["resnet32"]["steps_per_s"],
              "imagenet_loader_images_per_s": pipes["imagenet_loader"]["images_per_s"],
              "train_step_speedup": compared[TRAIN_STEP]["ratio_before_over_after"] if compared else math.nan}
    out.parent.mkdir(parents=True, exist_ok=True)
    train.write_json(out, {"command": train.command_line(), "machine": train.machine(), "device": train.device_name(device),
                           "git_commit": train.git_commit(), "quick": q, "seed": 0,
                           "measured": {"train": trained, "pipelines": pipes, "shapley": shapley,
                                        "before_after": compared, "before_commit": BEFORE_COMMIT},
                           "projected": projected, "result": result})
    print(f"wrote {out}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
