"""SNV continual learning: the per-task loop and the command line.

Per task t: train (frozen neurons B_{t-1} masked out of the update), capture mu on validation data,
estimate phi by Monte Carlo Shapley, freeze S_t = top-k(phi): B_t = B_{t-1} U S_t. After every task
every task seen so far is re-evaluated; task t+1 is evaluated (fresh head) before it is trained.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import datasets
import metrics
import snv_core
import utils
from models import ARCHS, ContinualNet, build_model

METHODS = ("snv", "sgd", "joint")
SCENARIOS = ("task_il", "class_il")
DATASET_DEFAULTS = {
    "pmnist": dict(arch="mlp", num_tasks=10, epochs=20, batch_size=10),
    "splitmnist": dict(arch="resnet18", num_tasks=5, epochs=200, batch_size=64),
    "cifar100": dict(arch="resnet18", num_tasks=10, epochs=200, batch_size=64),
    "tinyimagenet": dict(arch="resnet18", num_tasks=10, epochs=200, batch_size=64),
    "imagenet1k": dict(arch="resnet18", num_tasks=10, epochs=100, batch_size=128),
    "synthetic": dict(arch="mlp", num_tasks=3, epochs=5, batch_size=16),
}
SHAPLEY_BATCH = 64


class UsageError(Exception):
    """Bad command-line input or data: reported in one line with exit code 2."""


@dataclass
class State:
    """What the loop carries between tasks: B_t and, for masked inference, each task's subnetwork."""

    frozen: Tensor
    subnets: list[tuple[Tensor, Tensor]] = field(default_factory=list)


# ----------------------------------------------------------------------------- logits and evaluation

def task_logits(model: ContinualNet, x: Tensor, task: int, state: State) -> Tensor:
    """Head `task` on x, through task's subnetwork (members of B_task kept, others = mu) if it has one."""
    if task < len(state.subnets):
        with model.gated(*state.subnets[task]):
            return model(x, task)
    return model(x, task)


def frozen_logits(model: ContinualNet, x: Tensor, task: int, state: State) -> Tensor:
    """Logits of a finished task's subnetwork: a constant function, run without gradient in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = task_logits(model, x, task, state)
    model.train(was_training)
    return out


def scenario_logits(model: ContinualNet, x: Tensor, task: int, upto: int, scenario: str, state: State,
                    trainable: int) -> Tensor:
    """TIL: [B, C] of head `task`. CIL: [B, (upto+1) C], heads 0..upto concatenated.

    Heads of finished tasks with a subnetwork (index < `trainable`) run through it without gradient.
    """
    if scenario == "task_il":
        return task_logits(model, x, task, state)
    if not state.subnets:
        feats = model.features(x)
        return torch.cat([model.heads[i](feats) for i in range(upto + 1)], dim=1)
    return torch.cat([frozen_logits(model, x, i, state) if i < min(trainable, len(state.subnets))
                      else task_logits(model, x, i, state) for i in range(upto + 1)], dim=1)


def targets(y: Tensor, task: int, scenario: str, classes_per_task: int) -> Tensor:
    """Task-local labels for TIL, global labels (task offset + local) for CIL."""
    return y if scenario == "task_il" else y + task * classes_per_task


@torch.no_grad()
def evaluate(model: ContinualNet, split: datasets.Split, task: int, upto: int, args: argparse.Namespace,
             state: State, device: torch.device, classes_per_task: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `task` on a split, heads 0..upto in CIL."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in split.batches(args.eval_batch_size, device=device):
        out = scenario_logits(model, x, task, upto, args.scenario, state, trainable=upto + 1)
        t = targets(y, task, args.scenario, classes_per_task)
        correct += int((out.argmax(1) == t).sum())
        loss += float(F.cross_entropy(out, t, reduction="sum"))
        n += y.numel()
    return correct / n, loss / n


# ----------------------------------------------------------------------------- training

def make_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam (the paper's), or SGD with momentum / AdamW for the freezing tests; fused kernels (3x faster on CPU)."""
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, fused=True)


def train_phase(model: ContinualNet, bench: datasets.Benchmark, task: int, data_tasks: list[int],
                epochs: int, freezer: snv_core.Freezer, state: State, args: argparse.Namespace,
                device: torch.device, gen: torch.Generator, desc: str) -> int:
    """Train on `data_tasks`' training data with early stopping on validation loss; restore the best weights.

    Returns the number of epochs run.
    """
    optimizer = make_optimizer(model.parameters(), args)
    c = bench.classes_per_task
    best, best_state, bad, epoch = float("inf"), None, 0, 0
    for epoch in tqdm(range(1, epochs + 1), desc=desc, disable=not args.progress, leave=False):
        model.train()
        iters = [bench.tasks[j].train.batches(args.batch_size, shuffle=True, generator=gen, augment=True,
                                              device=device) for j in data_tasks]
        while iters:
            for j, it in list(zip(data_tasks, iters)):
                batch = next(it, None)
                if batch is None:
                    data_tasks, iters = [d for d, i in zip(data_tasks, iters) if i is not it], [i for i in iters if i is not it]
                    continue
                x, y = batch
                out = scenario_logits(model, x, j, task, args.scenario, state, trainable=task)
                loss = F.cross_entropy(out, targets(y, j, args.scenario, c))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss ({float(loss)}) in task {task + 1}, epoch {epoch}: "
                                             "lower --lr or check the data")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                freezer.step(optimizer)
        data_tasks = sorted({*range(task + 1)} if args.method == "joint" else {task})
        val = sum(evaluate(model, bench.tasks[j].val, j, task, args, state, device, c)[1] for j in data_tasks)
        if val < best:
            best, bad = val, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= args.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return epoch


# ----------------------------------------------------------------------------- SNV selection

def eval_set(split: datasets.Split, batches: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The fixed, cached Shapley evaluation set: the first `batches` x 64 validation samples."""
    xs, ys = [], []
    for i, (x, y) in enumerate(split.batches(SHAPLEY_BATCH, device=device)):
        if i == batches:
            break
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def select_neurons(model: ContinualNet, bench: datasets.Benchmark, task: int, state: State,
                   args: argparse.Namespace, device: torch.device, seed: int) -> tuple[Tensor, Tensor, dict]:
    """mu, phi and S_t for `task`: returns (mu [N], S_t [N] bool, record for the results file)."""
    n = model.num_neurons
    k = snv_core.capacity_k(args.sparsity, n)
    val = bench.tasks[task].val
    mu = snv_core.mean_activations(model, val.batches(args.eval_batch_size, device=device))
    x, y = eval_set(val, args.shapley_eval_batches, device)
    v = snv_core.MaskedAccuracy(model, task, x, y, mu, impl=args.shapley_impl)
    kw = dict(max_orderings=args.max_permutations, seed=seed * 1000 + task, progress=args.progress)
    if args.estimator == "snv":
        res = snv_core.permutation_shapley(v, n, k, tau=args.truncation, alpha=args.confidence,
                                           threshold=args.bandit_threshold, **kw)
    else:
        res = snv_core.neuron_shapley(v, n, k, **kw)
    selected = snv_core.top_k(res.phi, k)
    new = selected & ~state.frozen
    record = {**res.cost(), "k": k, "selected": int(selected.sum()), "newly_frozen": int(new.sum()),
              "v_full": float(v(torch.ones(1, n, dtype=torch.bool))[0]),
              "v_members": float(v((state.frozen | selected).unsqueeze(0))[0]),
              "selected_per_layer": snv_core.layer_counts(model, selected),
              "phi": [round(float(p), 6) for p in res.phi]}
    return mu, selected, record


# ----------------------------------------------------------------------------- one run

def random_init_accuracy(bench: datasets.Benchmark, args: argparse.Namespace, seed: int,
                         device: torch.device) -> list[float]:
    """b_t: accuracy on task t of a freshly initialised model (heads 0..t in CIL)."""
    torch.manual_seed(seed + 1)
    fresh = build_model(args.arch, bench.input_shape, args.width).to(device)
    for _ in bench.tasks:
        fresh.add_head(bench.classes_per_task)
    empty = State(torch.zeros(fresh.num_neurons, dtype=torch.bool))
    return [evaluate(fresh, task.test, t, t, args, empty, device, bench.classes_per_task)[0]
            for t, task in enumerate(bench.tasks)]


def run_seed(args: argparse.Namespace, seed: int, device: torch.device,
             on_task_end: Callable[[int, ContinualNet, State], None] | None = None) -> dict:
    """One complete continual-learning run; returns the results dict. `on_task_end(t, model, state)` is a hook."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    bench = datasets.get_benchmark(args.dataset, args.num_tasks, seed, args.data_dir, pmnist_first=args.pmnist_first)
    T, c = bench.num_tasks, bench.classes_per_task
    b = random_init_accuracy(bench, args, seed, device)
    torch.manual_seed(seed)
    model = build_model(args.arch, bench.input_shape, args.width).to(device)
    n = model.num_neurons
    state = State(torch.zeros(n, dtype=torch.bool))
    gen = torch.Generator().manual_seed(seed)
    A = np.full((T, T), np.nan)
    shapley, epochs_run, t0 = [], [], time.time()
    for t in range(T):
        model.add_head(c)
        if t > 0:
            A[t - 1, t] = evaluate(model, bench.tasks[t].test, t, t, args, state, device, c)[0]
        frozen_heads = t if args.method == "snv" else 0
        freezer = snv_core.Freezer(model, state.frozen.to(device), frozen_heads)
        data_tasks = list(range(t + 1)) if args.method == "joint" else [t]
        epochs_run.append(train_phase(model, bench, t, data_tasks, args.epochs, freezer, state, args, device, gen,
                                      f"task {t + 1}/{T}"))
        if args.method == "snv":
            mu, selected, record = select_neurons(model, bench, t, state, args, device, seed)
            members = state.frozen | selected
            if args.inference == "masked":
                state.subnets.append((members.to(device), mu.to(device)))
                if args.mask_finetune_epochs > 0:
                    keeper = snv_core.Freezer(model, ~members.to(device), 0)
                    record["mask_finetune_epochs"] = train_phase(model, bench, t, [t], args.mask_finetune_epochs,
                                                                 freezer, state, args, device, gen,
                                                                 f"task {t + 1}/{T} (mask)")
                    keeper.restore()
            state.frozen = members
            record["frozen_total"] = int(members.sum())
            record["frozen_per_layer"] = snv_core.layer_counts(model, members)
            shapley.append(record)
        for j in range(t + 1):
            A[t, j] = evaluate(model, bench.tasks[j].test, j, t, args, state, device, c)[0]
        if on_task_end is not None:
            on_task_end(t, model, state)
        print(f"[seed {seed}] task {t + 1}/{T}: " + " ".join(f"{a:.4f}" for a in A[t, :t + 1]), flush=True)
    joint_diag = load_joint_diag(args.joint_results, seed, T) if args.joint_results else None
    frozen = int(state.frozen.sum()) if args.method == "snv" else None
    return {
        "args": vars(args), "seed": seed, "command": command_line(), "device": device_name(device),
        "machine": machine(), "git_commit": git_commit(), "seconds": round(time.time() - t0, 1),
        "num_neurons": n, "layer_names": model.layer_names, "layer_sizes": model.layer_sizes,
        "accuracy_matrix": [[None if np.isnan(a) else float(a) for a in row] for row in A],
        "random_init_accuracy": b, "epochs_run": epochs_run,
        "metrics": metrics.compute_metrics(A, np.array(b), joint_diag, frozen, n),
        "shapley": shapley,
    }


def load_joint_diag(path: str, seed: int, T: int) -> np.ndarray:
    """a*_k from a joint run's results file (its A[k, k])."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--joint-results {path}: cannot read a results JSON ({e})") from e
    A = np.array([[np.nan if a is None else a for a in row] for row in data["accuracy_matrix"]], dtype=float)
    if A.shape != (T, T) or data.get("args", {}).get("method") != "joint":
        raise UsageError(f"--joint-results {path}: not a joint run with {T} tasks")
    return np.diag(A)


# ----------------------------------------------------------------------------- provenance and files

def command_line() -> str:
    return shlex.join([Path(sys.executable).name] + sys.argv)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def machine() -> dict:
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summarize(results: list[dict]) -> dict:
    """Mean and std over seeds of every metric, with the runs it came from."""
    return {"runs": [r["seed"] for r in results], "command": command_line(), "args": results[0]["args"],
            "device": results[0]["device"], "machine": results[0]["machine"], "git_commit": results[0]["git_commit"],
            "metrics": metrics.summarize([r["metrics"] for r in results])}


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """The CLI; every option also accepts its underscore spelling (--num_tasks)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(name: str, **kw) -> None:
        p.add_argument(name, name.replace("-", "_").replace("__", "--", 1), **kw)

    add("--method", choices=METHODS, default="snv", help="snv, or the sgd (fine-tuning) / joint bounds")
    add("--dataset", choices=datasets.BENCHMARKS, default="pmnist")
    add("--num-tasks", type=int, default=None, help="default: the dataset's (pmnist 10, splitmnist 5, ...)")
    add("--scenario", choices=SCENARIOS, default="task_il")
    add("--arch", choices=ARCHS, default=None, help="default: mlp for pmnist/synthetic, resnet18 otherwise")
    add("--width", type=int, default=None, help="hidden units (MLP) or base channels (ResNet); default 200 / 64")
    add("--sparsity", type=float, default=None, help="capacity c: k = floor(c N) neurons per task; default 1/T")
    add("--estimator", choices=("snv", "neuron_shapley"), default="snv",
        help="snv: forward walks + truncation + z-bandit; neuron_shapley: reverse walks + Bernstein bandit")
    add("--truncation", type=float, default=0.1, help="tau: skip marginals while V(S) <= tau")
    add("--confidence", type=float, default=0.95, help="alpha of the bandit's z_alpha")
    add("--bandit-threshold", choices=("kth", "midpoint"), default="kth",
        help="phi^(k): the k-th largest estimate (paper) or the midpoint of the k-th and (k+1)-th")
    add("--max-permutations", type=int, default=200, help="cap on Monte Carlo orderings per task")
    add("--shapley-eval-batches", type=int, default=8, help="V(S) is evaluated on this many batches of 64")
    add("--shapley-impl", choices=("fast", "naive"), default="fast", help="coalition-batched or one forward each")
    add("--inference", choices=("masked", "dense"), default="masked",
        help="masked: task t runs through its subnetwork (Eq. 1); dense: the paper-literal full network")
    add("--mask-finetune-epochs", type=int, default=None,
        help="epochs of training task t through its own mask after selection (masked only); default epochs/10")
    add("--epochs", type=int, default=None, help="max epochs per task; default: the dataset's")
    add("--batch-size", type=int, default=None)
    add("--eval-batch-size", type=int, default=500)
    add("--lr", type=float, default=0.001)
    add("--optimizer", choices=("adam", "sgd", "adamw"), default="adam")
    add("--momentum", type=float, default=0.9, help="for --optimizer sgd")
    add("--weight-decay", type=float, default=0.0)
    add("--patience", type=int, default=20, help="early stopping on validation loss")
    add("--pmnist-first", choices=("identity", "permuted"), default="identity",
        help="PMNIST task 1: the identity permutation (authors' code) or permuted")
    add("--seeds", type=int, nargs="+", default=[42])
    add("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add("--data-dir", default=None, help="default: $SNV_DATA_DIR, else ./data")
    add("--out-dir", default=None, help="default: results/<dataset>_<scenario>_<method>_T<T>")
    add("--joint-results", default=None, help="a joint run's seed JSON, for intransigence")
    add("--overwrite", action="store_true", help="replace existing results for the same seed")
    add("--no-figures", action="store_true")
    add("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(), help="tqdm bars")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill per-dataset defaults and validate everything before any training starts."""
    d = DATASET_DEFAULTS[args.dataset]
    for key in ("arch", "num_tasks", "epochs", "batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, d[key])
    if args.sparsity is None:
        args.sparsity = 1.0 / args.num_tasks
    if args.mask_finetune_epochs is None:
        args.mask_finetune_epochs = max(1, args.epochs // 10)
    checks = [
        (args.num_tasks >= 1, f"--num-tasks must be >= 1, got {args.num_tasks}"),
        (0 < args.sparsity <= 1, f"--sparsity must be in (0, 1], got {args.sparsity}"),
        (0 <= args.truncation < 1, f"--truncation tau must be in [0, 1), got {args.truncation}"),
        (0 < args.confidence < 1, f"--confidence alpha must be in (0, 1), got {args.confidence}"),
        (args.max_permutations >= 1, f"--max-permutations must be >= 1, got {args.max_permutations}"),
        (args.shapley_eval_batches >= 1, f"--shapley-eval-batches must be >= 1, got {args.shapley_eval_batches}"),
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.mask_finetune_epochs >= 0, f"--mask-finetune-epochs must be >= 0, got {args.mask_finetune_epochs}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {args.eval_batch_size}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.patience >= 1, f"--patience must be >= 1, got {args.patience}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (args.width is None or args.width >= 1, f"--width must be >= 1, got {args.width}"),
        (len(set(args.seeds)) == len(args.seeds), f"--seeds has duplicates: {args.seeds}"),
        (args.device != "cuda" or torch.cuda.is_available(), "--device cuda was given but CUDA is not available: "
                                                            "use --device cpu or auto"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if args.out_dir is None:
        args.out_dir = f"results/{args.dataset}_{args.scenario}_{args.method}_T{args.num_tasks}"
    try:
        datasets.check_data(args.dataset, args.data_dir, args.num_tasks, download=True)
    except datasets.DataError as e:
        raise UsageError(str(e)) from e
    out = Path(args.out_dir)
    existing = [out / f"seed{s}.json" for s in args.seeds if (out / f"seed{s}.json").exists()]
    if existing and not args.overwrite:
        raise UsageError(f"results already exist ({existing[0]}); pass --overwrite to replace them or choose "
                         "another --out-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UsageError(f"--out-dir {out} is not writable ({e.strerror}): choose another folder") from e
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    snv_core.reuse_freed_memory()
    try:
        args = resolve_args(args)
        if args.joint_results:
            load_joint_diag(args.joint_results, args.seeds[0], args.num_tasks)
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
        out = Path(args.out_dir)
        results = []
        for seed in args.seeds:
            result = run_seed(args, seed, device)
            write_json(out / f"seed{seed}.json", result)
            if not args.no_figures:
                utils.plot_run(result, out / f"figures_seed{seed}")
            m = result["metrics"]
            print(f"[seed {seed}] " + " ".join(f"{key}={m[key]:.4f}" for key in ("ACC", "BWT", "FWT", "PS", "AF")
                                                if m.get(key) is not None), flush=True)
            results.append(result)
        write_json(out / "summary.json", summarize(results))
        print(f"results in {out}")
        return 0
    except (UsageError, datasets.DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
