"""SNV continual learning: the per-task loop and the command line.

Per task t: train (frozen neurons B_{t-1} masked out of the update), capture mu on validation data,
estimate phi by Monte Carlo Shapley, freeze S_t = top-k(phi): B_t = B_{t-1} U S_t. After every task
every task seen so far is re-evaluated; task t+1 is evaluated (fresh head) before it is trained.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import baselines
import datasets
import metrics
import snv_core
import task_inference
import utils
from baselines import SCENARIOS, State
from models import ARCHS, MLP, ContinualNet, build_model

DATASET_DEFAULTS = {
    "pmnist": dict(arch="mlp", num_tasks=10, epochs=20, batch_size=10),
    "splitmnist": dict(arch="resnet18", num_tasks=5, epochs=200, batch_size=64),
    "cifar100": dict(arch="resnet18", num_tasks=10, epochs=200, batch_size=64),
    "tinyimagenet": dict(arch="resnet18", num_tasks=10, epochs=200, batch_size=64),
    "imagenet1k": dict(arch="resnet18", num_tasks=10, epochs=100, batch_size=128),
    "synthetic": dict(arch="mlp", num_tasks=3, epochs=5, batch_size=16),
}
SHAPLEY_BATCH = 64
FORMAT_VERSION = 3
"""Version of the checkpoint layout; a checkpoint of another version is refused."""
RUN_ONLY_ARGS = frozenset({"seeds", "device", "dist_backend", "data_dir", "out_dir", "joint_results", "overwrite",
                           "resume", "no_figures", "progress", "prune_analysis", "workers",
                           "shapley_memory_gb"})
"""Arguments that do not change a seed's training (where and how it runs, what is written, post-hoc analyses)."""


class UsageError(Exception):
    """Bad command-line input or data: reported in one line with exit code 2."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun group; the default is a single process (rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    reduce_device: torch.device | None = None  # nccl: CPU tensors are reduced on this GPU

    def all_reduce(self, t: Tensor) -> None:
        """In-place sum over ranks; nothing on a single process."""
        if self.world == 1:
            return
        if self.reduce_device is None:
            torch.distributed.all_reduce(t)
            return
        on_device = t.to(self.reduce_device)
        torch.distributed.all_reduce(on_device)
        t.copy_(on_device)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], dtype=torch.float64)
        self.all_reduce(t)
        return bool(t.item() > 0)

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.world > 1:
            for b in model.buffers():
                torch.distributed.broadcast(b, 0)

    def check_agreement(self, result: dict) -> None:
        """RuntimeError unless every rank got the same accuracy matrix, epochs and phi."""
        if self.world == 1:
            return
        key = json.dumps([result["accuracy_matrix"], result["epochs_run"], [s["phi"] for s in result["shapley"]]])
        keys: list[str | None] = [None] * self.world
        torch.distributed.all_gather_object(keys, key)
        if any(k != key for k in keys):
            raise RuntimeError(f"seed {result['seed']}: the ranks disagree on the results")


SINGLE_PROCESS = Dist()
"""The Dist of a run without torchrun."""


# ----------------------------------------------------------------------------- logits and evaluation

def task_logits(model: ContinualNet, x: Tensor, task: int, state: State) -> Tensor:
    """Head `task` on x, through task's subnetwork (members of B_task kept, others = mu) if it has one."""
    if task < len(state.subnets):
        with model.gated(*state.subnets[task]):
            return state.method.forward(model, x, task)
    return state.method.forward(model, x, task)


@contextlib.contextmanager
def frozen_function(model: ContinualNet) -> Iterator[None]:
    """Within the block the model runs in eval mode without gradient (a finished subnetwork is a constant
    function); its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def frozen_logits(model: ContinualNet, x: Tensor, task: int, state: State) -> Tensor:
    """Logits of a finished task's subnetwork: a constant function, run without gradient in eval mode."""
    with frozen_function(model):
        return task_logits(model, x, task, state)


STACKED_ROWS = 512
"""The most rows (samples x finished subnetworks) one stacked forward of finished_logits runs: a 224x224
ResNet-18's largest activation is then 1.6 GB (fp32)."""


def finished_logits(model: ContinualNet, x: Tensor, f: int, state: State) -> Tensor:
    """[B, f C]: heads 0..f-1 on x [B, ...], each through its finished task's subnetwork, without gradient in eval
    mode.

    Neuron subnetworks (state.subnets: SNV, Eidetic) under the default forward hook run as stacked forwards of at
    most STACKED_ROWS rows (task_inference.stacked_logits); weight masks (per_task) and a method with its own
    forward run one forward per task (frozen_logits). On CPU the two agree bit for bit where the batch has at least
    4 samples (MKL sums 1 to 3 rows in another order; test_snv).
    """
    if state.method.per_task or type(state.method).forward is not baselines.Method.forward:
        return torch.cat([frozen_logits(model, x, i, state) for i in range(f)], dim=1)
    keep, const = (torch.stack(v) for v in zip(*state.subnets[:f]))
    with frozen_function(model):
        out = task_inference.stacked_logits(model, x, keep, const, range(f), STACKED_ROWS)
    return out.transpose(0, 1).flatten(1)


def finished_heads(state: State, trainable: int) -> int:
    """How many leading heads belong to finished tasks, whose logits are a constant function of x."""
    return trainable if state.method.per_task else min(trainable, len(state.subnets))


def scenario_logits(model: ContinualNet, x: Tensor, task: int, upto: int, scenario: str, state: State,
                    trainable: int, finished: Tensor | None = None) -> Tensor:
    """TIL: [B, C] of head `task`. CIL: [B, (upto+1) C], heads 0..upto concatenated.

    Heads of finished tasks with a subnetwork (index < `trainable`) run through it without gradient
    (finished_logits), or come from `finished` [B, f C], their logits cached for this batch (see
    cache_finished_logits).
    """
    if scenario == "task_il":
        return task_logits(model, x, task, state)
    if not state.subnets and not state.method.per_task:
        feats = model.features(x)
        return torch.cat([model.heads[i](feats) for i in range(upto + 1)], dim=1)
    f = finished_heads(state, trainable)
    old = [finished] if finished is not None else [finished_logits(model, x, f, state)] if f else []
    return torch.cat([*old, *(task_logits(model, x, i, state) for i in range(f, upto + 1))], dim=1)


def cache_finished_logits(model: ContinualNet, split: datasets.Split, trainable: int, state: State,
                          args: argparse.Namespace, device: torch.device) -> Tensor | None:
    """CIL: the finished heads' logits [n, f C] on every sample of a training split, computed once per phase.

    None where there is nothing to cache (TIL, no finished subnetwork) or where augmentation makes a sample's
    input differ between epochs. Without it, CIL training runs every old subnetwork for every batch.
    """
    f = finished_heads(state, trainable)
    if args.scenario == "task_il" or split.source.augments or f == 0:
        return None
    return torch.cat([finished_logits(model, x, f, state)
                      for x, _ in split.batches(args.eval_batch_size, device=device)])


def memory_format(args: argparse.Namespace) -> torch.memory_format:
    """--channels-last: channels_last for the conv nets' weights and input batches; the MLP (which flattens its
    input) and the default keep the contiguous format."""
    return torch.channels_last if args.channels_last and args.arch != "mlp" else torch.contiguous_format


def targets(y: Tensor, task: int, scenario: str, classes_per_task: int) -> Tensor:
    """Task-local labels for TIL, global labels (task offset + local) for CIL."""
    return y if scenario == "task_il" else y + task * classes_per_task


@torch.no_grad()
def evaluate(model: ContinualNet, split: datasets.Split, task: int, upto: int, args: argparse.Namespace,
             state: State, device: torch.device, classes_per_task: int,
             dist: Dist = SINGLE_PROCESS) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `task` on a split, heads 0..upto in CIL.

    The correct count, the per-batch loss sums (float64, batch by batch) and the sample count add up on the
    device; the host reads them once per split. Distributed: each rank evaluates its share of every batch
    (every sample once over the ranks, datasets.Split.batches(complete=True)) and the three sums are all-reduced
    once, so every rank returns the same numbers. The accuracy (integer counts) equals a single process's (the
    eval-mode forward treats each sample alone); the loss may differ from it in float32's last bits (each batch's
    loss is a float32 sum, over other samples; about 1e-7 relative).
    """
    model.eval()
    sums, n = torch.zeros(3, dtype=torch.float64, device=device), 0
    for x, y in split.batches(args.eval_batch_size, device=device, rank=dist.rank, world=dist.world, complete=True):
        x = x.contiguous(memory_format=memory_format(args))
        out = state.method.route(model, x, scenario_logits(model, x, task, upto, args.scenario, state,
                                                           trainable=upto + 1), upto)
        t = targets(y, task, args.scenario, classes_per_task)
        sums[:2] += torch.stack([(out.argmax(1) == t).sum().double(),
                                 F.cross_entropy(out, t, reduction="sum").double()])
        n += y.numel()
    sums[2] = n
    dist.all_reduce(sums)
    correct, loss, n = sums.tolist()
    return correct / n, loss / n


# ----------------------------------------------------------------------------- training

class FusedAdam(torch.optim.Adam):
    """Adam (AdamW with `decoupled_weight_decay`) that calls torch's fused kernel directly: the update of
    torch.optim.Adam(fused=True) bit for bit, in the same per-parameter state (test_snv.py), without the per-step
    bookkeeping around the kernel (step wrapper, lazy-state checks, grouping by device), which at the MLP's batch
    10 costs a third as much as the kernel. `step` reads the gradients from .grad; `update` takes them as a list
    (MLP.cross_entropy_grads). One parameter group, no amsgrad."""

    def __init__(self, params, lr: float, weight_decay: float, decoupled_weight_decay: bool) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                         fused=True)
        if len(self.param_groups) != 1:
            raise ValueError(f"FusedAdam takes one parameter group, got {len(self.param_groups)}")
        self.lists: dict[tuple[int, ...], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        params = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        self.update(params, [p.grad for p in params])

    @torch.no_grad()
    def update(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """One Adam step of `params` with gradients `grads` (same order and shapes)."""
        if not params:
            return
        key = tuple(map(id, params))
        if key not in self.lists:  # the state lists of this set of parameters, made once
            for p in params:
                if not self.state[p]:  # torch.optim.Adam's lazy state (fused: float32 step on p's device)
                    self.state[p].update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))
            self.lists[key] = tuple([self.state[p][k] for p in params] for k in ("exp_avg", "exp_avg_sq", "step"))
        exp_avgs, exp_avg_sqs, steps = self.lists[key]
        group = self.param_groups[0]
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
               beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
               eps=group["eps"], maximize=False)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.lists.clear()


def make_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam (the paper's), or SGD with momentum / AdamW for the freezing tests; fused kernels (3x faster on CPU)."""
    if args.optimizer in ("adam", "adamw"):
        return FusedAdam(params, args.lr, args.weight_decay, decoupled_weight_decay=args.optimizer == "adamw")
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, fused=True)


class TrainForward(nn.Module):
    """The training forward (scenario_logits while training `task`) as a module that DDP can wrap."""

    def __init__(self, model: ContinualNet, state: State, scenario: str, task: int) -> None:
        super().__init__()
        self.model, self.state, self.scenario, self.task = model, state, scenario, task

    def forward(self, x: Tensor, data_task: int, finished: Tensor | None) -> Tensor:
        """Logits of the batch x of task `data_task`; `finished`: cached logits of the finished heads, or None."""
        return scenario_logits(self.model, x, data_task, self.task, self.scenario, self.state, trainable=self.task,
                               finished=finished)


def hand_written_backward(net: nn.Module, model: ContinualNet, optimizer: torch.optim.Optimizer, state: State,
                          args: argparse.Namespace, j: int) -> bool:
    """Whether train_step may take the MLP's hand-written backward (MLP.cross_entropy_grads, bit-identical to
    autograd) and hand its gradients to FusedAdam.update: a single-process TIL step of data task j through the
    whole ungated MLP, without autocast, of a method that adds no forward or penalty of its own."""
    method = type(state.method)
    return (isinstance(model, MLP) and isinstance(net, TrainForward) and isinstance(optimizer, FusedAdam)
            and args.scenario == "task_il" and args.amp == "none" and j >= len(state.subnets)
            and all(layer.gate.keep is None and layer.gate.sums is None for layer in model.layers)
            and (method.forward, method.penalty) == (baselines.Method.forward, baselines.Method.penalty))


def train_step(net: nn.Module, model: ContinualNet, optimizer: torch.optim.Optimizer, freezer: snv_core.Freezer,
               state: State, x: Tensor, y: Tensor, j: int, finished: Tensor | None, args: argparse.Namespace,
               classes_per_task: int) -> Tensor:
    """One masked training step on batch x [B, C, H, W], y [B] of data task j; returns the loss (a device scalar)."""
    if hand_written_backward(net, model, optimizer, state, args, j):
        loss, params, grads = model.cross_entropy_grads(x, y, j, freezer.frozen_rows)
        optimizer.update(params, grads)
        freezer.restore_moved(optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)
        x = x.contiguous(memory_format=memory_format(args))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = (F.cross_entropy(net(x, j, finished), targets(y, j, args.scenario, classes_per_task))
                    + state.method.penalty(model, x, j))
        loss.backward()
        freezer.step(optimizer)
    state.method.after_step(model)
    return loss.detach()


def train_phase(model: ContinualNet, bench: datasets.Benchmark, task: int, data_tasks: list[int],
                epochs: int, freezer: snv_core.Freezer, state: State, args: argparse.Namespace,
                device: torch.device, gen: torch.Generator, desc: str, dist: Dist = SINGLE_PROCESS,
                log: Callable[[dict], None] | None = None) -> int:
    """Train on `data_tasks`' training data with early stopping on validation loss; restore the best weights.

    Several data tasks (joint) take turns, one batch of each task in order, until every task's epoch is done.
    The step never waits for the device: the training loss is summed on the device and read once per epoch,
    where a non-finite sum stops the run; `log` then gets the epoch's record (losses, accuracy, seconds).
    --amp bf16 runs the step's forward (and so its backward) under bf16 autocast; --channels-last feeds conv nets
    channels_last batches.

    Distributed: every rank draws the same batches and loads and trains on its share only (every world-th
    sample) through a DDP wrapper made for this phase (heads are added per task); batches smaller than the
    world are skipped.
    Returns the number of epochs run.
    """
    optimizer = make_optimizer(model.parameters(), args)
    net: nn.Module = TrainForward(model, state, args.scenario, task)
    if dist.world > 1:
        net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                      find_unused_parameters=True)
    c = bench.classes_per_task
    cache = {j: cache_finished_logits(model, bench.tasks[j].train, task, state, args, device) for j in data_tasks}
    best, best_state, bad, epoch = float("inf"), None, 0, 0
    with freezer.training():
        for epoch in tqdm(range(1, epochs + 1), desc=desc, disable=not args.progress, leave=False):
            start, loss_sum, steps = time.perf_counter(), torch.zeros((), device=device), 0
            net.train()
            active = [(j, bench.tasks[j].train.batches(args.batch_size, shuffle=True, generator=gen, augment=True,
                                                       device=device, positions=True, rank=dist.rank, world=dist.world))
                      for j in data_tasks]
            while active:
                for j, it in list(active):
                    batch = next(it, None)
                    if batch is None:
                        active.remove((j, it))
                        continue
                    x, y, pos = batch
                    finished = cache[j][pos] if cache[j] is not None else None
                    loss_sum += train_step(net, model, optimizer, freezer, state, x, y, j, finished, args, c)
                    steps += 1
            train_loss = float(loss_sum) / max(steps, 1)
            if dist.any(not math.isfinite(train_loss)):
                raise FloatingPointError(f"non-finite loss (mean {train_loss}) in task {task + 1}, epoch {epoch}: "
                                         "lower --lr or check the data")
            dist.sync_buffers(model)
            accs, losses = zip(*(evaluate(model, bench.tasks[j].val, j, task, args, state, device, c, dist)
                                 for j in data_tasks))
            val = sum(losses)
            if log is not None and dist.rank == 0:
                log({"phase": desc, "epoch": epoch, "train_loss": train_loss, "val_loss": val,
                     "val_accuracy": sum(accs) / len(accs), "seconds": round(time.perf_counter() - start, 3)})
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


# ----------------------------------------------------------------------------- one run

def task_loop(model: ContinualNet, bench: datasets.Benchmark, t: int, freezer: snv_core.Freezer, state: State,
              args: argparse.Namespace, device: torch.device, gen: torch.Generator, dist: Dist,
              log: Callable[[dict], None] | None) -> baselines.Loop:
    """What a baseline's after_task may call back into: task t's data, retraining it, its logits and its loss."""
    c = bench.classes_per_task
    return baselines.Loop(
        t, bench.tasks[:t + 1], bench.num_tasks, device,
        eval_set=lambda: eval_set(bench.tasks[t].val, args.shapley_eval_batches, device),
        retrain=lambda epochs, desc: train_phase(model, bench, t, [t], epochs, freezer, state, args, device, gen,
                                                 desc, dist, log),
        logits=lambda x: task_logits(model, x, t, state),
        loss=lambda x, y: F.cross_entropy(scenario_logits(model, x, t, t, args.scenario, state, trainable=t),
                                          targets(y, t, args.scenario, c)),
        rank=dist.rank, world=dist.world, all_reduce=dist.all_reduce if dist.world > 1 else None)


def random_init_accuracy(bench: datasets.Benchmark, args: argparse.Namespace, seed: int,
                         device: torch.device, dist: Dist = SINGLE_PROCESS) -> list[float]:
    """b_t: accuracy on task t of a freshly initialised model (heads 0..t in CIL)."""
    torch.manual_seed(seed + 1)
    fresh = build_model(args.arch, bench.input_shape, args.width).to(device, memory_format=memory_format(args))
    for _ in bench.tasks:
        fresh.add_head(bench.classes_per_task)
    empty = State(torch.zeros(fresh.num_neurons, dtype=torch.bool))
    return [evaluate(fresh, task.test, t, t, args, empty, device, bench.classes_per_task, dist)[0]
            for t, task in enumerate(bench.tasks)]


PRUNE_RATES = tuple(range(0, 95, 5))
"""Fig. 4's pruning rates in percent: 0, 5, ..., 90."""


@torch.no_grad()
def pruning_curve(model: ContinualNet, bench: datasets.Benchmark, state: State, args: argparse.Namespace,
                  device: torch.device, dist: Dist = SINGLE_PROCESS) -> dict:
    """Fig. 4: average accuracy over all tasks after pruning the backbone's weights globally by magnitude.

    At each rate the smallest |w| of every producer (Linear/Conv2d of model.layers; heads untouched) are zeroed,
    ranked over the whole backbone, and every task j is evaluated as in the accuracy matrix's last row (heads
    0..T-1, through its subnetwork under masked inference). The weights are restored afterwards. The critical
    percentage is the first rate whose accuracy is below half the unpruned accuracy (None if none is).
    """
    T, c = bench.num_tasks, bench.classes_per_task
    weights = [layer.producer.weight for layer in model.layers]
    saved = [w.detach().clone() for w in weights]
    order = torch.cat([w.abs().flatten() for w in saved]).argsort(stable=True)
    sizes = [w.numel() for w in weights]
    curve: list[float] = []
    try:
        for rate in PRUNE_RATES:
            pruned = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
            pruned[order[:round(rate / 100 * order.numel())]] = True
            for w, orig, cut in zip(weights, saved, pruned.split(sizes)):
                w.copy_(orig.masked_fill(cut.view_as(orig), 0.0))
            curve.append(float(np.mean([evaluate(model, bench.tasks[j].test, j, T - 1, args, state, device, c, dist)[0]
                                        for j in range(T)])))
    finally:
        for w, orig in zip(weights, saved):
            w.copy_(orig)
    critical = next((rate for rate, a in zip(PRUNE_RATES, curve) if a < curve[0] / 2), None)
    return {"rates": list(PRUNE_RATES), "avg_accuracy": curve, "critical_percentage": critical}


def run_seed(args: argparse.Namespace, seed: int, device: torch.device,
             on_task_end: Callable[[int, ContinualNet, State], None] | None = None,
             checkpoint: Path | None = None, dist: Dist = SINGLE_PROCESS, epoch_log: Path | None = None) -> dict:
    """One complete continual-learning run; returns the results dict. `on_task_end(t, model, state)` is a hook.

    With a `checkpoint` path, rank 0 saves the run there after every task, and with --resume an existing
    checkpoint is continued from its last completed task. Rank 0 prints one line per training epoch and, with an
    `epoch_log` path, appends the same record there as a JSON line (the file starts over with the run).
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    bench = datasets.get_benchmark(args.dataset, args.num_tasks, seed, args.data_dir, pmnist_first=args.pmnist_first,
                                   workers=args.workers)
    T, c = bench.num_tasks, bench.classes_per_task
    saved = load_checkpoint(checkpoint, args, seed) if args.resume and checkpoint and checkpoint.exists() else None
    b = saved["random_init_accuracy"] if saved is not None else random_init_accuracy(bench, args, seed, device, dist)
    torch.manual_seed(seed)
    model = build_model(args.arch, bench.input_shape, args.width).to(device, memory_format=memory_format(args))
    n = model.num_neurons
    state = State(torch.zeros(n, dtype=torch.bool), method=baselines.build_method(args, model, seed))
    gen = torch.Generator().manual_seed(seed)
    A = np.full((T, T), np.nan)
    silent, resets, epochs_run, t0, start = [], [], [], time.time(), 0
    infer = (task_inference.Recorder(T, args.eval_batch_size, device, dist.rank, dist.world,
                                     dist.all_reduce if dist.world > 1 else None)
             if args.scenario == "class_il" and state.method.infers_tasks(args) else None)

    def test_accuracy(j: int, upto: int, row: int) -> float:
        """A[row, j]: task j's test accuracy over heads 0..upto, by --task-inference (every rule recorded)."""
        acc = evaluate(model, bench.tasks[j].test, j, upto, args, state, device, c, dist)[0]
        if infer is None:
            return acc
        by_rule = infer.evaluate(model, state, bench.tasks[j].test, j, upto, row)
        return acc if args.task_inference == "heads" else by_rule[args.task_inference]

    if saved is not None:
        restore_checkpoint(saved, model, state, gen, c, device)
        if infer is not None:
            infer.load_state_dict(saved["task_inference"])
        A[:] = np.array(saved["accuracy_matrix"], dtype=float)
        state.method.records, silent, epochs_run = saved["records"], saved["silent_units"], saved["epochs_run"]
        start = saved["tasks_done"]
        t0 -= saved["seconds"]
    log = EpochLog(seed, epoch_log, fresh=start == 0) if dist.rank == 0 else None
    for t in range(start, T):
        model.add_head(c)
        if t > 0:
            A[t - 1, t] = test_accuracy(t, t, t - 1)
            if args.reset == "gxd":
                resets.append(baselines.gxd_reset(model, t - 1, *eval_set(bench.tasks[t - 1].val,
                                                                          args.shapley_eval_batches, device),
                                                  state.frozen, args.reset_rate, seed * 1000 + t))
        method = state.method
        method.before_task(t, model)
        freezer = snv_core.Freezer(model, state.frozen.to(device), t if method.freezes_heads else 0)
        epochs_run.append(train_phase(model, bench, t, method.data_tasks(t), args.epochs, freezer, state, args,
                                      device, gen, f"task {t + 1}/{T}", dist, log))
        method.after_task(model, state, task_loop(model, bench, t, freezer, state, args, device, gen, dist, log))
        silent.append(snv_core.layer_counts(model, snv_core.silent_units(
            model, bench.tasks[t].val.batches(args.eval_batch_size, device=device))))
        if infer is not None:
            infer.task_end(model, state, t, bench.tasks[t].val)
        for j in range(t + 1):
            A[t, j] = test_accuracy(j, t, t)
        if on_task_end is not None:
            on_task_end(t, model, state)
        if dist.rank == 0 and checkpoint is not None:
            save_checkpoint(checkpoint, args, seed, model, state, gen, {
                "tasks_done": t + 1, "accuracy_matrix": A.tolist(), "random_init_accuracy": b,
                "epochs_run": epochs_run, "records": state.method.records, "silent_units": silent, "seconds": time.time() - t0,
                "task_inference": infer.state_dict() if infer is not None else None})
        if dist.rank == 0:
            print(f"[seed {seed}] task {t + 1}/{T}: " + " ".join(f"{a:.4f}" for a in A[t, :t + 1]), flush=True)
    joint_diag = load_joint_diag(args.joint_results, seed, T) if args.joint_results else None
    pruning = {"pruning": pruning_curve(model, bench, state, args, device, dist)} if args.prune_analysis else {}
    frozen = int(state.frozen.sum()) if state.method.freezes_neurons else None
    records = {"shapley": [], "method_records": [], state.method.records_key: state.method.records}
    if infer is not None:
        records["task_inference"] = {"selected": args.task_inference,
                                     **infer.results(np.array(b), joint_diag, frozen, n)}
    return {
        "args": vars(args), "seed": seed, "command": command_line(), "device": device_name(device),
        "machine": machine(), "git_commit": git_commit(), "seconds": round(time.time() - t0, 1),
        "num_neurons": n, "layer_names": model.layer_names, "layer_sizes": model.layer_sizes,
        "accuracy_matrix": [[None if np.isnan(a) else float(a) for a in row] for row in A],
        "random_init_accuracy": b, "epochs_run": epochs_run, "silent_units": silent,
        "metrics": metrics.compute_metrics(A, np.array(b), joint_diag, frozen, n),
        **records, "resets": resets, **pruning,
    }


class EpochLog:
    """Where train_phase's per-epoch records go: one line on stdout each, and a JSON line in `path` if given."""

    def __init__(self, seed: int, path: Path | None, fresh: bool) -> None:
        self.seed, self.path = seed, path
        if path is not None and fresh:
            path.unlink(missing_ok=True)

    def __call__(self, record: dict) -> None:
        record = {"seed": self.seed, **record}
        tqdm.write(f"[seed {self.seed}] {record['phase']} epoch {record['epoch']}: train loss "
                   f"{record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, val acc "
                   f"{record['val_accuracy']:.4f}, {record['seconds']:.1f} s", file=sys.stdout)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


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


# ----------------------------------------------------------------------------- checkpoints (--resume)

CHECKPOINT_KEYS = frozenset({"format_version", "dataset", "seed", "config", "tasks_done", "accuracy_matrix",
                             "random_init_accuracy", "epochs_run", "records", "silent_units", "seconds", "model",
                             "frozen", "subnets", "generator", "torch_rng", "cuda_rng", "numpy_rng",
                             "task_inference"})


def checkpoint_path(out: Path, seed: int) -> Path:
    """Where a seed's run is saved after every task."""
    return out / f"checkpoint_seed{seed}.pt"


def result_config(args: dict) -> dict:
    """The arguments (as in vars(args)) that change a seed's results."""
    return {k: v for k, v in args.items() if k not in RUN_ONLY_ARGS}


def config_diff(saved: dict, current: dict) -> str:
    """'key saved -> current' for every setting that differs; empty if none does.

    A setting missing from `saved` (a flag added after it was written) counts as its default for the saved
    run's method (e.g. --importance shapley for snv).
    """
    defaults = build_parser().parse_args([])
    defaults.method, defaults.world_size = saved.get("method", defaults.method), 1
    baselines.resolve_args(defaults)
    saved = {**result_config(vars(defaults)), **saved}
    keys = sorted(k for k in saved.keys() | current.keys() if saved.get(k, "unset") != current.get(k, "unset"))
    return ", ".join(f"{k} {saved.get(k, 'unset')!r} -> {current.get(k, 'unset')!r}" for k in keys)


def save_checkpoint(path: Path, args: argparse.Namespace, seed: int, model: ContinualNet, state: State,
                    gen: torch.Generator, progress: dict) -> None:
    """Atomically save the run after `progress["tasks_done"]` tasks: weights, masks, records, RNG states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    device = next(model.parameters()).device
    ckpt = {"format_version": FORMAT_VERSION, "dataset": args.dataset, "seed": seed,
            "config": result_config(vars(args)), **progress, "model": model.state_dict(),
            "frozen": state.frozen.cpu(), "subnets": [(members.cpu(), mu.cpu()) for members, mu in state.subnets],
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy_rng": [kind, keys.tolist(), pos, has_gauss, gauss]}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: Path, args: argparse.Namespace, seed: int) -> dict:
    """The checkpoint at `path` on the CPU; UsageError if it is corrupt or belongs to another run."""
    fix = "pass --overwrite to start this seed over, or choose another --out-dir"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage makes torch.load raise many different types
        raise UsageError(f"{path}: corrupt checkpoint ({one_line(e)}); {fix}") from e
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        raise UsageError(f"{path}: corrupt checkpoint (entries missing); {fix}")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise UsageError(f"{path}: checkpoint format version {ckpt['format_version']!r}, but this train.py reads "
                         f"version {FORMAT_VERSION}; {fix}")
    if (ckpt["dataset"], ckpt["seed"]) != (args.dataset, seed):
        raise UsageError(f"{path}: checkpoint of dataset {ckpt['dataset']} seed {ckpt['seed']}, not "
                         f"{args.dataset} seed {seed}; {fix}")
    if diff := config_diff(ckpt["config"], result_config(vars(args))):
        raise UsageError(f"{path}: checkpoint of a run with other settings ({diff}); resume with its settings, or "
                         f"{fix}")
    return ckpt


def restore_checkpoint(ckpt: dict, model: ContinualNet, state: State, gen: torch.Generator, classes_per_task: int,
                       device: torch.device) -> None:
    """Put a checkpoint's weights (heads included), masks and random-number states back in place."""
    for _ in range(ckpt["tasks_done"]):
        model.add_head(classes_per_task)
    model.load_state_dict(ckpt["model"])
    state.frozen = ckpt["frozen"]
    state.subnets = [(members.to(device), mu.to(device)) for members, mu in ckpt["subnets"]]
    gen.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    kind, keys, pos, has_gauss, gauss = ckpt["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if ckpt["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------------------- provenance and files

def command_line() -> str:
    return shlex.join([Path(sys.executable).name] + sys.argv)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo where it exists), for telling machines apart in results."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or "unknown"


def machine() -> dict:
    """Where a result was computed. The same seed and code give other float results on another CPU or kernel
    (vector width, library code paths), so the CPU model and torch's CPU capability are recorded too."""
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


@functools.cache
def git_commit() -> str:
    """The commit (with -dirty) of the checkout this process runs from, read once: main() reads it at start-up,
    so a checkout that changes while a run goes on does not relabel the run's results."""
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0o644 for the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write atomically: `write` fills a temporary file in the same folder, which then replaces `path`; the file
    gets the mode a plainly created file would (mkstemp's own is 0600, unreadable to collaborators)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    """Write a JSON file atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


def summarize(results: list[dict]) -> dict:
    """Mean and std over seeds of every metric, with the runs it came from."""
    return {"runs": [r["seed"] for r in results], "command": command_line(), "args": results[0]["args"],
            "device": results[0]["device"], "machine": results[0]["machine"], "git_commit": results[0]["git_commit"],
            "metrics": metrics.summarize([r["metrics"] for r in results])}


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """The CLI: the common options, then each registered method's and score's own; every option with a dash also
    accepts its underscore spelling (--num_tasks)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(name: str, **kw) -> None:
        alias = name.replace("-", "_").replace("__", "--", 1)
        p.add_argument(*dict.fromkeys((name, alias)), **kw)

    add("--method", choices=tuple(baselines.METHODS), default="snv", help=baselines.method_help())
    add("--importance", choices=tuple(baselines.SCORES), default=None, help=baselines.importance_help())
    add("--dataset", choices=datasets.BENCHMARKS, default="pmnist")
    add("--num-tasks", type=int, default=None, help="default: the dataset's (pmnist 10, splitmnist 5, ...)")
    add("--scenario", choices=SCENARIOS, default="task_il")
    add("--arch", choices=ARCHS, default=None, help="default: mlp for pmnist/synthetic, resnet18 otherwise")
    add("--width", type=int, default=None, help="hidden units (MLP) or base channels (ResNet); default 200 / 64")
    add("--sparsity", type=float, default=None,
        help="capacity c: k = floor(c N) neurons per task (wsn: fraction of each layer's weights); default 1/T")
    add("--shapley-eval-batches", type=int, default=8,
        help="V(S) and the data-driven scores use this many validation batches of 64")
    add("--shapley-impl", choices=snv_core.SHAPLEY_IMPLS, default="fast",
        help="V(S) evaluator: fast (staged, bitwise = naive), naive (one forward each), incremental (MLP: rank-1 "
             "updates, argmax certified against naive)")
    add("--shapley-memory-gb", type=float, default=4.0,
        help="fast V(S) evaluator: GiB for the activations of a chunk of coalitions at the widest stage; sets the "
             f"chunk (1 to {snv_core.FAST_CHUNK} coalitions)")
    add("--mask-finetune-epochs", type=int, default=None,
        help="epochs of training task t through its own mask after selection (snv masked, packnet); "
             "default epochs/10")
    add("--task-inference", choices=tuple(task_inference.RULES), default="heads",
        help="class_il with a mask-based method: how the task of a test image is picked from every finished task's "
             "subnetwork (every rule is recorded under task_inference in the results; this one gives the accuracy "
             "matrix): " + "; ".join(f"{name}: {rule.help}" for name, rule in task_inference.RULES.items()))
    add("--reset", choices=("none", "gxd"), default="none",
        help="gxd: before each new task, He-reinitialise the plastic neurons of lowest GXD utility")
    add("--reset-rate", type=float, default=0.1, help="--reset gxd: fraction of the plastic neurons reset per task")
    add("--epochs", type=int, default=None, help="max epochs per task; default: the dataset's")
    add("--batch-size", type=int, default=None)
    add("--eval-batch-size", type=int, default=500)
    add("--workers", type=int, default=None, help="ImageNet decoding processes per rank; default: CPUs / ranks per node")
    add("--lr", type=float, default=0.001)
    add("--optimizer", choices=("adam", "sgd", "adamw"), default="adam")
    add("--momentum", type=float, default=0.9, help="for --optimizer sgd")
    add("--weight-decay", type=float, default=0.0)
    add("--patience", type=int, default=20, help="early stopping on validation loss")
    add("--amp", choices=("none", "bf16"), default="none",
        help="speed: bf16 autocast for the training forward/backward (evaluation and V(S) stay fp32)")
    add("--channels-last", action="store_true",
        help="speed: conv nets (ResNet) keep weights and input batches in channels_last memory format")
    add("--pmnist-first", choices=("identity", "permuted"), default="identity",
        help="PMNIST task 1: the identity permutation (authors' code) or permuted")
    add("--seeds", type=int, nargs="+", default=[42])
    add("--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="under torchrun each process uses GPU LOCAL_RANK (cuda) or the CPU")
    add("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto",
        help="torch.distributed backend under torchrun (WORLD_SIZE > 1); auto: nccl on CUDA, gloo on CPU")
    add("--data-dir", default=None, help="default: $SNV_DATA_DIR, else ./data")
    add("--out-dir", default=None, help="default: results/<dataset>_<scenario>_<method>_T<T>")
    add("--joint-results", default=None, help="a joint run's seed JSON, for intransigence")
    add("--prune-analysis", action="store_true",
        help="Fig. 4: after the run, prune backbone weights globally by magnitude (0-90%%) and re-measure ACC")
    add("--overwrite", action="store_true",
        help="start the seeds over: replace their existing results JSON and checkpoint")
    add("--resume", action="store_true",
        help="continue each seed from <out-dir>/checkpoint_seed<seed>.pt, which is saved after every task and "
             "deleted once the seed's results JSON is written; seeds whose results JSON exists are kept (the "
             "baselines and --reset keep their finished seeds only: their checkpoints cannot be continued)")
    add("--no-figures", action="store_true")
    add("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(), help="tqdm bars")
    for flag in baselines.all_flags():
        add(flag.name, **flag.kwargs)
    return p


RANGES = (("--num-tasks", ">= 1"), ("--sparsity", "(0, 1]"), ("--shapley-eval-batches", ">= 1"), ("--epochs", ">= 1"),
          ("--mask-finetune-epochs", ">= 0"), ("--batch-size", ">= 1"), ("--eval-batch-size", ">= 1"),
          ("--lr", "> 0"), ("--patience", ">= 1"), ("--weight-decay", ">= 0"), ("--width", ">= 1"),
          ("--reset-rate", "(0, 1]"), ("--workers", ">= 0"),
          ("--shapley-memory-gb", "> 0"))
"""The common numeric flags and their allowed values: '>= x', '> x', or an interval such as '(0, 1]' (the methods'
and scores' own are in baselines.flag_ranges())."""


def in_range(args: argparse.Namespace, flag: str, allowed: str) -> tuple[bool, str]:
    """(ok, message): whether --flag's value (None = unset, always ok) is `allowed`, e.g. '>= 1' or '[0, 1)'."""
    value = getattr(args, flag.removeprefix("--").replace("-", "_"))
    message = f"{flag} must be {'' if allowed[0] == '>' else 'in '}{allowed}, got {value}"
    if value is None:
        return True, message
    if allowed[0] == ">":
        op, bound = allowed.split()
        return (value > float(bound) if op == ">" else value >= float(bound)), message
    low, high = (float(x) for x in allowed[1:-1].split(","))
    ok = (low < value if allowed[0] == "(" else low <= value) and (value < high if allowed[-1] == ")" else value <= high)
    return ok, message


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
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(args)
    checks = [in_range(args, flag, allowed) for flag, allowed in RANGES + baselines.flag_ranges()] + [
        (len(set(args.seeds)) == len(args.seeds), f"--seeds has duplicates: {args.seeds}"),
        (args.device != "cuda" or torch.cuda.is_available(), "--device cuda was given but CUDA is not available: "
                                                            "use --device cpu or auto"),
        (args.dist_backend != "nccl" or device.type == "cuda", "--dist-backend nccl needs CUDA: use gloo on CPU"),
        (device.type == "cpu" or device.index < torch.cuda.device_count(),
         f"LOCAL_RANK {device.index} but only {torch.cuda.device_count()} GPUs are visible: lower --nproc_per_node"),
        (not (args.resume and args.overwrite), "--resume and --overwrite exclude each other: continue the seeds or "
                                               "start them over"),
        (args.task_inference == "heads" or (args.scenario == "class_il"
                                            and baselines.METHODS[args.method].infers_tasks(args)),
         f"--task-inference {args.task_inference} needs --scenario class_il and a method with frozen subnetworks ("
         + ", ".join(n for n, m in baselines.METHODS.items() if m.task_inference) + "; snv with --inference masked)"),
    ] + baselines.resolve_args(args)
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if args.out_dir is None:
        args.out_dir = f"results/{args.dataset}_{args.scenario}_{baselines.run_name(args)}_T{args.num_tasks}"
    try:
        datasets.check_data(args.dataset, args.data_dir, args.num_tasks, download=True)
    except datasets.DataError as e:
        raise UsageError(str(e)) from e
    out = Path(args.out_dir)
    for seed in args.seeds:
        check_previous(out, seed, args)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UsageError(f"--out-dir {out} is not writable ({e.strerror}): choose another folder") from e
    return args


def check_previous(out: Path, seed: int, args: argparse.Namespace) -> None:
    """UsageError unless the seed's earlier results JSON and checkpoint in `out` fit --resume / --overwrite."""
    result, checkpoint = out / f"seed{seed}.json", checkpoint_path(out, seed)
    if args.overwrite:
        return
    if result.exists() and not args.resume:
        raise UsageError(f"results already exist ({result}); pass --overwrite to replace them, --resume to keep "
                         "them, or choose another --out-dir")
    if result.exists():
        try:
            saved = json.loads(result.read_text())["args"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{result}: unreadable results ({one_line(e)}); pass --overwrite to redo the seed") from e
        if diff := config_diff(result_config(saved), result_config(vars(args))):
            raise UsageError(f"{result}: results of a run with other settings ({diff}); pass --overwrite to redo "
                             "the seed, or choose another --out-dir")
    elif checkpoint.exists() and args.resume and not baselines.resumable(args.method, args.reset):
        raise UsageError(f"{checkpoint}: --method {args.method} --reset {args.reset} keeps state between tasks that "
                         f"the checkpoint does not hold, so the seed cannot continue: start it over with --seeds {seed} "
                         "--overwrite")
    elif checkpoint.exists() and args.resume:
        load_checkpoint(checkpoint, args, seed)
    elif checkpoint.exists():
        raise UsageError(f"{checkpoint} exists: pass --resume to continue it, --overwrite to start the seed over, "
                         "or choose another --out-dir")


def pick_device(args: argparse.Namespace) -> torch.device:
    """The device of this process: cuda (GPU LOCAL_RANK under torchrun) unless --device cpu or no CUDA."""
    if args.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(args: argparse.Namespace, device: torch.device) -> Dist:
    """Under torchrun (WORLD_SIZE > 1) join the process group; progress bars stay on rank 0 only."""
    if args.world_size == 1:
        return SINGLE_PROCESS
    backend = args.dist_backend if args.dist_backend != "auto" else "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank()
    args.progress = args.progress and rank == 0
    return Dist(rank, args.world_size, device if backend == "nccl" else None)


def finish_seed(out: Path, result: dict, args: argparse.Namespace) -> None:
    """Write a seed's results JSON, then delete its checkpoint; draw its figures and print its metrics."""
    seed = result["seed"]
    write_json(out / f"seed{seed}.json", result)
    checkpoint_path(out, seed).unlink(missing_ok=True)
    if not args.no_figures:
        utils.plot_run(result, out / f"figures_seed{seed}")
    m = result["metrics"]
    print(f"[seed {seed}] " + " ".join(f"{key}={m[key]:.4f}" for key in ("ACC", "BWT", "FWT", "PS", "AF")
                                        if m.get(key) is not None), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    git_commit()
    snv_core.reuse_freed_memory()
    dist = SINGLE_PROCESS
    try:
        args = resolve_args(args)
        if args.joint_results:
            load_joint_diag(args.joint_results, args.seeds[0], args.num_tasks)
        device = pick_device(args)
        dist = init_distributed(args, device)
        out = Path(args.out_dir)
        results = []
        for seed in args.seeds:
            path = out / f"seed{seed}.json"
            if args.resume and path.exists():
                results.append(json.loads(path.read_text()))
                continue
            result = run_seed(args, seed, device, checkpoint=checkpoint_path(out, seed), dist=dist,
                              epoch_log=out / f"log_seed{seed}.jsonl")
            dist.check_agreement(result)
            if dist.rank == 0:
                finish_seed(out, result, args)
            results.append(result)
        if dist.rank == 0:
            write_json(out / "summary.json", summarize(results))
            print(f"results in {out}")
        if dist.world > 1:
            torch.distributed.barrier()  # no rank tears gloo down while another still uses it (an abort at exit)
        return 0
    except (UsageError, datasets.DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
