"""Alternatives to SNV in the same harness: cheap neuron importances, GXD resets, Eidetic Learning, EWC, SI, LwF,
PackNet and WSN.

train.py keeps the loop (train, score, evaluate); a baseline plugs into it through `Method`'s hooks:
before_task, forward (one head's logits, e.g. through a weight mask), penalty (added to the loss),
after_step (after every optimizer step), after_task (pruning, consolidation; gets a `Loop` to call
back into train.py) and route (class-incremental task routing).

`python baselines.py rank-correlation [train.py options]` trains task 1 and measures every cheap score's
Spearman rank correlation with Monte Carlo Shapley and its cost.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import datasets
import snv_core
from models import ContinualNet, build_model, he_init

if TYPE_CHECKING:
    from train import State

IMPORTANCES = ("shapley", "random", "magnitude", "activation", "taylor", "gxd")
DEFAULT_IMPORTANCE = {"snv": "shapley", "eidetic": "taylor"}
FROZEN_HEADS = ("snv", "eidetic", "packnet", "wsn")
"""Methods whose finished heads are frozen."""
NEURON_FREEZING = ("snv", "eidetic")
"""Methods with a frozen-neuron set B_t (reported as CAP)."""
RESET_METHODS = ("snv", "sgd", "ewc", "si", "lwf")
"""Methods that --reset gxd may be combined with (no weight ownership, no own reinitialisation)."""
SI_DAMPING = 0.1
"""xi of Synaptic Intelligence: Omega += omega / (Delta^2 + xi)."""


# ----------------------------------------------------------------------------- neuron importances

def gate_outputs(model: ContinualNet, task: int, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer, in eval mode: the gate outputs a [B, n(, H, W)] on x and dL/da, L = summed cross-entropy of head `task`.

    The loss is summed over the batch, so each sample's rows of dL/da are that sample's own gradient.
    """
    was_training = model.training
    model.eval()
    captured: dict[nn.Module, Tensor] = {}
    handles = [layer.gate.register_forward_hook(lambda module, inputs, out: captured.__setitem__(module, out))
               for layer in model.layers]
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x, task), y, reduction="sum")
            acts = [captured[layer.gate] for layer in model.layers]
            grads = torch.autograd.grad(loss, acts)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [a.detach() for a in acts], list(grads)


def importance(kind: str, model: ContinualNet, task: int, x: Tensor, y: Tensor, mu: Tensor | None = None, *,
               seed: int = 0, norm: int = 1) -> Tensor:
    """A cheap per-neuron score [N] float64 (higher = more important) of head `task` on (x, y).

    random: U(0, 1) from `seed`; magnitude: ||incoming weight row||_norm; activation: mean max(a, 0), the
    neuron's ReLU output (a is the gate output, before the ReLU: a neuron that never fires scores 0);
    taylor: mean over samples of |mean over positions of a * dL/da| (Molchanov et al. 2017);
    gxd: mean over samples of |sum over positions of (a - mu) * dL/da|, the first-order loss change of
    replacing the neuron by its mean mu [N] (SNV's removal).
    """
    if kind == "random":
        return torch.rand(model.num_neurons, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if kind == "magnitude":
        return torch.cat([layer.producer.weight.detach().flatten(1).norm(p=norm, dim=1).cpu()
                          for layer in model.layers]).double()
    if kind not in ("activation", "taylor", "gxd"):
        raise ValueError(f"unknown importance {kind!r}: choose one of {', '.join(IMPORTANCES[1:])}")
    if kind == "gxd" and mu is None:
        raise ValueError("gxd needs the reference mu")
    acts, grads = gate_outputs(model, task, x, y)
    refs = model.split_neurons(mu.to(x.device)) if mu is not None else [None] * len(acts)
    scores = []
    for a, g, ref in zip(acts, grads, refs):
        a, g = a.flatten(2) if a.dim() > 2 else a.unsqueeze(2), g.flatten(2) if g.dim() > 2 else g.unsqueeze(2)
        if kind == "activation":
            scores.append(a.clamp(min=0).mean(dim=(0, 2)))
        elif kind == "taylor":
            scores.append((a * g).mean(2).abs().mean(0))
        else:
            scores.append(((a - ref.view(1, -1, 1)) * g).sum(2).abs().mean(0))
    return torch.cat(scores).double().cpu()


@dataclass
class ScoreResult:
    """A cheap score phi [N] and what it cost (duck-types snv_core.ShapleyResult in train.select_neurons)."""

    phi: Tensor
    importance: str
    seconds: float

    def cost(self) -> dict:
        """The JSON-ready cost summary."""
        return {"importance": self.importance, "seconds": round(self.seconds, 3)}


def score(kind: str, model: ContinualNet, task: int, x: Tensor, y: Tensor, mu: Tensor, *, seed: int = 0,
          norm: int = 1) -> ScoreResult:
    """`importance` with its wall-clock cost."""
    start = time.perf_counter()
    phi = importance(kind, model, task, x, y, mu, seed=seed, norm=norm)
    return ScoreResult(phi, kind, time.perf_counter() - start)


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


# ----------------------------------------------------------------------------- neuron surgery (resets, Eidetic)

@torch.no_grad()
def reinit_neurons(model: ContinualNet, mask: Tensor, generator: torch.Generator) -> None:
    """He-reinitialise the incoming weight rows and biases of the neurons in mask [N]; their BatchNorm becomes identity."""
    for layer, m in zip(model.layers, model.split_neurons(mask.cpu())):
        if not bool(m.any()):
            continue
        weight = layer.producer.weight
        fresh = torch.empty(weight.shape)
        mode = "fan_out" if isinstance(layer.producer, nn.Conv2d) else "fan_in"
        nn.init.kaiming_normal_(fresh, mode=mode, nonlinearity="relu", generator=generator)
        idx = m.nonzero().squeeze(1)
        weight[idx.to(weight.device)] = fresh[idx].to(weight.device, weight.dtype)
        if layer.producer.bias is not None:
            layer.producer.bias[idx.to(weight.device)] = 0.0
        if layer.bn is not None:
            for tensor, value in ((layer.bn.weight, 1.0), (layer.bn.bias, 0.0), (layer.bn.running_mean, 0.0),
                                  (layer.bn.running_var, 1.0)):
                tensor[idx.to(tensor.device)] = value


def lowest_plastic(utility: Tensor, frozen: Tensor, rate: float) -> Tensor:
    """[N] bool: the round(rate * #plastic) plastic (not frozen) neurons of lowest utility (ties to the lower index)."""
    plastic = ~frozen.cpu()
    k = round(rate * int(plastic.sum()))
    order = torch.sort(utility.cpu().masked_fill(~plastic, math.inf), stable=True).indices[:k]
    chosen = torch.zeros_like(plastic)
    chosen[order] = True
    return chosen


def gxd_reset(model: ContinualNet, task: int, x: Tensor, y: Tensor, frozen: Tensor, rate: float, seed: int) -> dict:
    """Before a new task: He-reinitialise the plastic neurons of lowest GXD utility of head `task` on (x, y).

    The reference is the mean activation on (x, y); frozen neurons [N] are never touched. Returns a record.
    """
    start = time.perf_counter()
    mu = snv_core.mean_activations(model, [(x, y)])
    chosen = lowest_plastic(importance("gxd", model, task, x, y, mu), frozen, rate)
    reinit_neurons(model, chosen, torch.Generator().manual_seed(seed))
    return {"before_task": task + 2, "reset": int(chosen.sum()), "reset_per_layer": snv_core.layer_counts(model, chosen),
            "seconds": round(time.perf_counter() - start, 3)}


def prune_step(scores: Tensor, kept: Tensor, sizes: list[int], fraction: float) -> Tensor:
    """One Eidetic pruning step: in every layer drop the ceil(fraction * n_l) lowest-scored neurons still kept. [N] bool."""
    out = []
    for s, k, n in zip(torch.split(scores.cpu(), sizes), torch.split(kept.cpu(), sizes), sizes):
        drop = min(math.ceil(fraction * n), int(k.sum()))
        order = torch.sort(s.masked_fill(~k, math.inf), stable=True).indices[:drop]
        k = k.clone()
        k[order] = False
        out.append(k)
    return torch.cat(out)


@torch.no_grad()
def cut_resistance(model: ContinualNet, members: Tensor, head: int) -> int:
    """Resistance: zero the weights from non-members into members (members [N] bool) and into head `head`.

    Applies to consecutive Linear layers (the MLP); a ResNet's residual sums have no per-neuron inputs to
    cut, and there the task's gates (non-members output 0) give the same guarantee. Returns how many
    non-zero weights were cut.
    """
    masks = [m.to(layer.producer.weight.device) for layer, m in zip(model.layers, model.split_neurons(members))]
    cut = 0
    for prev, cur, m_prev, m_cur in zip(model.layers, model.layers[1:], masks, masks[1:]):
        weight = cur.producer.weight
        if isinstance(cur.producer, nn.Linear) and weight.shape[1] == prev.gate.n:
            block = m_cur.unsqueeze(1) & ~m_prev.unsqueeze(0)
            cut += int((weight[block] != 0).sum())
            weight[block] = 0.0
    last, weight = model.layers[-1], model.heads[head].weight
    if isinstance(last.producer, nn.Linear) and weight.shape[1] == last.gate.n:
        cut += int((weight[:, ~masks[-1]] != 0).sum())
        weight[:, ~masks[-1]] = 0.0
    return cut


def top_fraction(values: Tensor, fraction: float, among: Tensor | None = None) -> Tensor:
    """Bool mask (values' shape) of the round(fraction * m) largest of the m entries where `among` (ties to the lower index).

    A partial selection (top-k values, then the threshold's ties by index), not a full sort: WSN calls it for
    every layer on every step, where a stable sort of fc1's 156,800 scores took 10x longer.
    """
    flat = values.detach().flatten()
    pool = torch.ones_like(flat, dtype=torch.bool) if among is None else among.flatten()
    k = round(fraction * int(pool.sum()))
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    scores = flat.masked_fill(~pool, -math.inf)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    mask = pool & (scores > threshold)
    ties = (pool & (scores == threshold)).nonzero().squeeze(1)
    mask[ties[:k - int(mask.sum())]] = True
    return mask.view(values.shape)


def distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """LwF's loss: cross-entropy of softmax(student / T) against softmax(teacher / T); [B, K] logits -> scalar."""
    return -(F.softmax(teacher / temperature, 1) * F.log_softmax(student / temperature, 1)).sum(1).mean()


def split_accuracy(logits: Callable[[Tensor], Tensor], split: datasets.Split, batch_size: int,
                   device: torch.device) -> float:
    """Accuracy of `logits` (x -> [B, C], local labels) on a split, without gradient."""
    correct = 0
    with torch.no_grad():
        for x, y in split.batches(batch_size, device=device):
            correct += int((logits(x).argmax(1) == y).sum())
    return correct / len(split)


# ----------------------------------------------------------------------------- the method interface

@dataclass
class Loop:
    """train.py's services for the task just trained: its data, retraining it, its own head's logits and its loss."""

    task: int
    tasks: list[datasets.Task]
    device: torch.device
    eval_set: Callable[[], tuple[Tensor, Tensor]]
    """() -> (x, y): this task's fixed evaluation set (Shapley's), for data-driven scores."""
    retrain: Callable[[int, str], int]
    """(epochs, label) -> epochs run: train_phase on this task (early stopping, best weights restored)."""
    logits: Callable[[Tensor], Tensor]
    """x -> [B, C]: this task's head through its subnetwork, if it has one."""
    loss: Callable[[Tensor, Tensor], Tensor]
    """(x, y) -> the scenario's training loss of this task on a batch."""


class Method:
    """No-op hooks (SNV, SGD, joint); each baseline overrides the ones it needs."""

    per_task = False
    """True: every head runs through its own task's network, so heads cannot share one feature pass (CIL)."""

    def __init__(self) -> None:
        self.task = 0
        self.records: list[dict] = []

    def before_task(self, task: int, model: ContinualNet) -> None:
        """Called after head `task` is added, before it is trained."""
        self.task = task

    def forward(self, model: ContinualNet, x: Tensor, task: int) -> Tensor:
        """Logits [B, C] of head `task`."""
        return model(x, task)

    def penalty(self, model: ContinualNet, x: Tensor, task: int) -> Tensor | float:
        """A term added to the training loss of a batch x of `task`."""
        return 0.0

    def after_step(self, model: ContinualNet) -> None:
        """Called after every optimizer step (gradients still in .grad)."""

    def after_task(self, model: ContinualNet, state: State, loop: Loop) -> None:
        """Called once task `loop.task` is trained (and, for SNV, selected), before it is evaluated."""

    def route(self, model: ContinualNet, x: Tensor, logits: Tensor, upto: int) -> Tensor:
        """CIL evaluation logits [B, (upto+1) C] after task routing."""
        return logits


class EWC(Method):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017), online form: (lambda/2) sum_i F_i (theta_i - theta*_i)^2.

    F = sum over finished tasks of the diagonal empirical Fisher (batch gradients squared, FACIL's
    approximation, with the true labels); theta* = the weights after the last task.
    """

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__()
        self.args = args
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def penalty(self, model: ContinualNet, x: Tensor, task: int) -> Tensor | float:
        if not self.fisher:
            return 0.0
        return self.args.ewc_lambda / 2 * sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
                                              for n, p in model.named_parameters() if n in self.fisher)

    def after_task(self, model: ContinualNet, state: State, loop: Loop) -> None:
        batches = loop.tasks[loop.task].train.batches(self.args.batch_size, device=loop.device)
        for n, f in empirical_fisher(model, batches, loop.loss).items():
            self.fisher[n] = self.fisher[n] + f if n in self.fisher else f
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}


def empirical_fisher(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                     loss: Callable[[Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
    """Diagonal empirical Fisher per parameter: sum over batches of B (dL/dtheta)^2 / #samples, in eval mode."""
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x, y in batches:
        grads = torch.autograd.grad(loss(x, y), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                fisher[n] += g.pow(2) * len(y)
        count += len(y)
    model.train(was_training)
    return {n: f / max(count, 1) for n, f in fisher.items()}


class SI(Method):
    """Synaptic Intelligence (Zenke et al. 2017): c sum_i Omega_i (theta_i - theta*_i)^2.

    omega_i accumulates -g_i Delta theta_i along the trajectory (g = gradient of the task loss alone);
    after each task Omega_i += max(0, omega_i / (Delta_i^2 + xi)), Delta = the task's total change.
    """

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__()
        self.args = args
        self.omega: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.path: dict[str, Tensor] = {}
        self.start: dict[str, Tensor] = {}
        self.before: dict[str, Tensor] = {}

    def before_task(self, task: int, model: ContinualNet) -> None:
        super().before_task(task, model)
        self.start = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.path = {n: torch.zeros_like(p) for n, p in model.named_parameters()}

    def penalty(self, model: ContinualNet, x: Tensor, task: int) -> Tensor | float:
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        if not self.omega:
            return 0.0
        return self.args.si_c * sum((self.omega[n] * (p - self.anchor[n]) ** 2).sum()
                                    for n, p in model.named_parameters() if n in self.omega)

    @torch.no_grad()
    def after_step(self, model: ContinualNet) -> None:
        for n, p in model.named_parameters():
            if p.grad is None or n not in self.before:
                continue
            grad = p.grad
            if n in self.omega:
                grad = grad - 2 * self.args.si_c * self.omega[n] * (self.before[n] - self.anchor[n])
            self.path[n] -= grad * (p - self.before[n])

    def after_task(self, model: ContinualNet, state: State, loop: Loop) -> None:
        for n, p in model.named_parameters():
            w = (self.path[n] / ((p.detach() - self.start[n]) ** 2 + SI_DAMPING)).clamp(min=0)
            self.omega[n] = self.omega[n] + w if n in self.omega else w
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}


class LwF(Method):
    """Learning without Forgetting (Li & Hoiem 2017): alpha * distillation(old heads, frozen copy of the previous model).

    As in FACIL, the old heads' logits are concatenated into one softmax at temperature T.
    """

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__()
        self.args = args
        self.teacher: ContinualNet | None = None

    def before_task(self, task: int, model: ContinualNet) -> None:
        super().before_task(task, model)
        if task > 0:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def penalty(self, model: ContinualNet, x: Tensor, task: int) -> Tensor | float:
        if self.teacher is None:
            return 0.0
        with torch.no_grad():
            feats = self.teacher.features(x)
            target = torch.cat([self.teacher.heads[i](feats) for i in range(self.task)], 1)
        feats = model.features(x)
        out = torch.cat([model.heads[i](feats) for i in range(self.task)], 1)
        return self.args.lwf_alpha * distillation(out, target, self.args.lwf_temperature)


class Eidetic(Method):
    """Eidetic Learning (Dronen & Balestriero 2025) on SNV's gates and Freezer.

    After training task t: prune plastic neurons step by step (--eidetic-step of each layer per step,
    lowest --importance magnitude/taylor score first; pruned = gate output 0), with up to
    --eidetic-recovery-epochs of training through the pruned network after each step; stop (undoing
    the step) once accuracy on --eidetic-stop-split < unpruned accuracy - --eidetic-threshold. The kept
    neurons join B_t (persistence: the Freezer, incl. their BatchNorm), task t runs through B_t with
    non-members at 0, the connections from non-members into B_t and head t are cut (resistance) and the
    pruned neurons are He-reinitialised. CIL: a task router (a linear head over task ids on the dense
    features) is retrained after every task on the training data of every task seen so far.
    """

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__()
        self.args, self.seed = args, seed
        self.router: nn.Linear | None = None

    def after_task(self, model: ContinualNet, state: State, loop: Loop) -> None:
        start, args, t = time.perf_counter(), self.args, loop.task
        split = loop.tasks[t].train if args.eidetic_stop_split == "train" else loop.tasks[t].val

        def accuracy() -> float:
            return split_accuracy(loop.logits, split, args.eval_batch_size, loop.device)

        unpruned = accuracy()
        floor = unpruned - args.eidetic_threshold
        zeros = torch.zeros(model.num_neurons, device=loop.device)
        kept, acc, steps = ~state.frozen, unpruned, 0
        x, y = loop.eval_set()
        state.subnets.append(((state.frozen | kept).to(loop.device), zeros))
        while True:
            with model.gated(*state.subnets[t]):
                scores = importance(args.importance, model, t, x, y, norm=args.magnitude_norm)
            candidate = prune_step(scores, kept, model.layer_sizes, args.eidetic_step)
            if torch.equal(candidate, kept):
                break
            before = copy.deepcopy(model.state_dict())
            state.subnets[t] = ((state.frozen | candidate).to(loop.device), zeros)
            new_acc = accuracy()
            for epoch in range(args.eidetic_recovery_epochs):
                if new_acc >= floor:
                    break
                loop.retrain(1, f"task {t + 1} (recovery, step {steps + 1})")
                new_acc = accuracy()
            if new_acc < floor:
                model.load_state_dict(before)
                break
            kept, acc, steps = candidate, new_acc, steps + 1
        members = state.frozen | kept
        state.subnets[t] = (members.to(loop.device), zeros)
        cut = cut_resistance(model, members, t)
        reinit_neurons(model, ~members, torch.Generator().manual_seed(self.seed * 1000 + t))
        state.frozen = members
        record = {"task": t + 1, "accuracy_unpruned": unpruned, "accuracy_pruned": acc, "steps": steps,
                  "kept": int(kept.sum()), "frozen_total": int(members.sum()),
                  "frozen_per_layer": snv_core.layer_counts(model, members), "cut_weights": cut}
        if args.scenario == "class_il":
            self.router, record["router_train_accuracy"] = self.train_router(model, loop)
        self.records.append({**record, "seconds": round(time.perf_counter() - start, 3)})

    def train_router(self, model: ContinualNet, loop: Loop) -> tuple[nn.Linear, float]:
        """A fresh linear task classifier on the dense features, trained on every seen task's training data."""
        router = nn.Linear(model.feature_dim, loop.task + 1).to(loop.device)
        he_init(router)
        optimizer = torch.optim.Adam(router.parameters(), lr=self.args.lr)
        gen = torch.Generator().manual_seed(self.seed * 1000 + loop.task)
        was_training = model.training
        model.eval()
        correct = seen = 0
        for epoch in range(self.args.eidetic_router_epochs):
            iters = [(j, task.train.batches(self.args.batch_size, shuffle=True, generator=gen, device=loop.device))
                     for j, task in enumerate(loop.tasks)]
            correct = seen = 0
            while True:
                batches = [(j, batch) for j, batch in ((j, next(it, None)) for j, it in iters) if batch is not None]
                if not batches:
                    break
                with torch.no_grad():
                    feats = torch.cat([model.features(x) for _, (x, _) in batches])
                labels = torch.cat([torch.full((len(y),), j, device=loop.device) for j, (_, y) in batches])
                out = router(feats)
                loss = F.cross_entropy(out, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                correct += int((out.argmax(1) == labels).sum())
                seen += len(labels)
        model.train(was_training)
        return router, correct / max(seen, 1)

    def route(self, model: ContinualNet, x: Tensor, logits: Tensor, upto: int) -> Tensor:
        """Hard routing once the router knows heads 0..upto: every block but the routed task's becomes -inf."""
        if self.router is None or self.router.out_features != upto + 1:
            return logits
        with torch.no_grad():
            pick = self.router(model.features(x)).argmax(1)
        keep = F.one_hot(pick, upto + 1).bool().unsqueeze(2)
        return logits.view(len(x), upto + 1, -1).masked_fill(~keep, -math.inf).view_as(logits)


class WeightMasks(Method):
    """Weight-level subnetworks (PackNet, WSN): finished task j runs with W * mask_j and its own BatchNorm copy.

    Weights in a finished task's mask are frozen (restored after every step); producer biases train in
    task 1 only. Subclasses define the current task's weights (`current`) and its final mask.
    """

    per_task = True

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__()
        self.args = args
        weights = {id(layer.producer.weight) for layer in model.layers}
        biases = {id(layer.producer.bias) for layer in model.layers if layer.producer.bias is not None}
        self.names = [n for n, p in model.named_parameters() if id(p) in weights]
        self.bias_names = [n for n, p in model.named_parameters() if id(p) in biases]
        self.norm_names = [f"{prefix}.{n}" for prefix, module in model.named_modules()
                           if isinstance(module, nn.BatchNorm2d) for n in module.state_dict()]
        self.used = {n: torch.zeros_like(model.get_parameter(n), dtype=torch.bool) for n in self.names}
        self.masks: list[dict[str, Tensor]] = []
        self.norms: list[dict[str, Tensor]] = []
        self.frozen: dict[str, Tensor] = {}
        self.saved: dict[str, Tensor] = {}

    def current(self, model: ContinualNet) -> dict[str, Tensor]:
        """Overrides of the producer weights for the task being trained ({} = the plain weights)."""
        return {}

    def forward(self, model: ContinualNet, x: Tensor, task: int) -> Tensor:
        if task < len(self.masks):
            overrides = {n: model.get_parameter(n) * m for n, m in self.masks[task].items()} | self.norms[task]
        else:
            overrides = self.current(model)
        return functional_call(model, overrides, (x, task)) if overrides else model(x, task)

    @torch.no_grad()
    def after_step(self, model: ContinualNet) -> None:
        for n, mask in self.frozen.items():
            p = model.get_parameter(n)
            p.copy_(torch.where(mask, self.saved[n], p))

    def finish(self, model: ContinualNet, mask: dict[str, Tensor]) -> None:
        """Store task's mask [per weight] and BatchNorm; freeze every weight in any mask so far, and the biases."""
        self.masks.append(mask)
        self.used = {n: self.used[n] | mask[n] for n in self.names}
        state = model.state_dict()
        self.norms.append({n: state[n].clone() for n in self.norm_names})
        self.frozen = self.used | {n: torch.ones_like(state[n], dtype=torch.bool) for n in self.bias_names}
        self.saved = {n: state[n].clone() for n in self.frozen}
        self.records.append({"task": self.task + 1, "mask_weights": sum(int(m.sum()) for m in mask.values()),
                             "used_weights": sum(int(u.sum()) for u in self.used.values()),
                             "total_weights": sum(u.numel() for u in self.used.values())})


class PackNet(WeightMasks):
    """PackNet (Mallya & Lazebnik 2018): after each task prune --packnet-prune of each layer's free weights by
    magnitude (to 0, free again for later tasks), retrain the rest --mask-finetune-epochs, then freeze them.
    Task j runs with every weight owned by tasks 1..j.
    """

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__(args, model, seed)
        self.pending: dict[str, Tensor] | None = None

    def current(self, model: ContinualNet) -> dict[str, Tensor]:
        if self.pending is None:
            return {}
        return {n: model.get_parameter(n) * m for n, m in self.pending.items()}

    def after_task(self, model: ContinualNet, state: State, loop: Loop) -> None:
        keep = {}
        with torch.no_grad():
            for n in self.names:
                p, free = model.get_parameter(n), ~self.used[n]
                kept = top_fraction(p.abs(), 1 - self.args.packnet_prune, among=free)
                p[free & ~kept] = 0.0
                keep[n] = self.used[n] | kept
        self.pending = keep
        if self.args.mask_finetune_epochs > 0:
            loop.retrain(self.args.mask_finetune_epochs, f"task {loop.task + 1} (packnet retrain)")
        self.pending = None
        self.finish(model, keep)


class WSN(WeightMasks):
    """Winning SubNetworks (Kang et al. 2022): task t uses W * m_t, m_t = the top --sparsity (c) of each layer's
    learned scores |s| (straight-through gradient), the scores persisting across tasks; weights in an
    earlier task's mask are reused frozen. Task-incremental only.
    """

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__(args, model, seed)
        scores = nn.ParameterList()
        for n in self.names:
            s = torch.empty_like(model.get_parameter(n))
            nn.init.kaiming_uniform_(s, a=math.sqrt(5))
            scores.append(nn.Parameter(s))
        model.add_module("wsn_scores", scores)

    def current(self, model: ContinualNet) -> dict[str, Tensor]:
        overrides = {}
        for n, s in zip(self.names, model.wsn_scores):
            a = s.abs()
            overrides[n] = model.get_parameter(n) * (top_fraction(a, self.args.sparsity) + a - a.detach())
        return overrides

    def after_task(self, model: ContinualNet, state: State, loop: Loop) -> None:
        self.finish(model, {n: top_fraction(s.abs(), self.args.sparsity) for n, s in zip(self.names, model.wsn_scores)})


BASELINES: dict[str, type[Method]] = {"eidetic": Eidetic, "packnet": PackNet, "wsn": WSN, "ewc": EWC, "si": SI,
                                      "lwf": LwF}


def build_method(args: argparse.Namespace, model: ContinualNet, seed: int) -> Method:
    """The hooks of args.method (no-ops for snv, sgd and joint)."""
    return BASELINES[args.method](args, model, seed) if args.method in BASELINES else Method()


# ----------------------------------------------------------------------------- command line

def add_arguments(add: Callable[..., None]) -> None:
    """The baselines' and ablations' options, added to train.py's parser through its `add`."""
    add("--importance", choices=IMPORTANCES, default=None,
        help="neuron score: snv's top-k (default shapley = SNV; others are ablations) or eidetic's pruning "
             "(magnitude or taylor, default taylor)")
    add("--magnitude-norm", type=int, choices=(1, 2), default=1, help="p of the magnitude score ||W_i||_p")
    add("--reset", choices=("none", "gxd"), default="none",
        help="gxd: before each new task, He-reinitialise the plastic neurons of lowest GXD utility")
    add("--reset-rate", type=float, default=0.1, help="--reset gxd: fraction of the plastic neurons reset per task")
    add("--eidetic-step", type=float, default=0.05, help="fraction of each layer's neurons pruned per step")
    add("--eidetic-threshold", type=float, default=0.01,
        help="stop pruning once accuracy < unpruned accuracy - threshold (absolute)")
    add("--eidetic-stop-split", choices=("train", "val"), default="train", help="split of the stopping accuracy")
    add("--eidetic-recovery-epochs", type=int, default=5,
        help="max epochs of recovery training after each pruning step (stops once above the threshold)")
    add("--eidetic-router-epochs", type=int, default=3,
        help="class_il: epochs of the task router on the training data of every task seen so far")
    add("--ewc-lambda", type=float, default=5000.0, help="EWC penalty weight")
    add("--si-c", type=float, default=1.0, help="SI penalty weight c")
    add("--lwf-alpha", type=float, default=1.0, help="LwF distillation weight")
    add("--lwf-temperature", type=float, default=2.0, help="LwF distillation temperature T")
    add("--packnet-prune", type=float, default=0.75,
        help="fraction of each layer's free weights pruned after each task (then --mask-finetune-epochs retraining)")


RANGES = (("--reset-rate", "(0, 1]"), ("--eidetic-step", "(0, 1]"), ("--eidetic-threshold", "[0, 1]"),
          ("--eidetic-recovery-epochs", ">= 0"), ("--eidetic-router-epochs", ">= 1"), ("--ewc-lambda", ">= 0"),
          ("--si-c", ">= 0"), ("--lwf-alpha", ">= 0"), ("--lwf-temperature", "> 0"), ("--packnet-prune", "(0, 1)"))
"""The baselines' numeric flags and their allowed values (checked by train.in_range)."""


def resolve_args(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """Fill --importance's per-method default; return (ok, message) checks of the baselines' other options."""
    given = args.importance
    args.importance = given or DEFAULT_IMPORTANCE.get(args.method)
    return [
        (given is None or args.method in DEFAULT_IMPORTANCE,
         f"--importance applies to --method snv or eidetic, not {args.method}"),
        (args.method != "eidetic" or args.importance in ("magnitude", "taylor"),
         f"--method eidetic prunes by --importance magnitude or taylor, not {args.importance}"),
        (args.method != "wsn" or args.scenario == "task_il",
         "--method wsn is task-incremental only (a task's weight mask needs its task id): use --scenario task_il"),
        (args.reset == "none" or args.method in RESET_METHODS,
         f"--reset gxd applies to --method {', '.join(RESET_METHODS)}, not {args.method}"),
        (args.world_size == 1 or resumable(args),
         "the baselines and --reset run in a single process only: run without torchrun"),
    ]


def resumable(args: argparse.Namespace) -> bool:
    """Whether the run is snv, sgd or joint without --reset: a checkpoint holds its whole state and torchrun can
    run it. A baseline or --reset keeps state of its own between tasks."""
    return args.method not in BASELINES and args.reset == "none"


def run_name(args: argparse.Namespace) -> str:
    """The default results-folder name of a run: snv, snv-random, eidetic-magnitude, snv+gxd, packnet, ..."""
    name = args.method
    if args.importance not in (None, DEFAULT_IMPORTANCE.get(args.method)):
        name += f"-{args.importance}"
    return name + ("+gxd" if args.reset == "gxd" else "")


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
    import train

    torch.manual_seed(seed)
    np.random.seed(seed)
    bench = datasets.get_benchmark(args.dataset, args.num_tasks, seed, args.data_dir, pmnist_first=args.pmnist_first)
    model = build_model(args.arch, bench.input_shape, args.width).to(device)
    model.add_head(bench.classes_per_task)
    state = train.State(torch.zeros(model.num_neurons, dtype=torch.bool))
    freezer = snv_core.Freezer(model, state.frozen.to(device), 0)
    epochs = train.train_phase(model, bench, 0, [0], args.epochs, freezer, state, args, device,
                               torch.Generator().manual_seed(seed), "task 1")
    val = bench.tasks[0].val
    mu = snv_core.mean_activations(model, val.batches(args.eval_batch_size, device=device))
    x, y = train.eval_set(val, args.shapley_eval_batches, device)
    n = model.num_neurons
    k = snv_core.capacity_k(args.sparsity, n)
    v = snv_core.MaskedAccuracy(model, 0, x, y, mu, impl=args.shapley_impl)
    shapley = snv_core.permutation_shapley(v, n, k, tau=args.truncation, use_bandit=False,
                                           max_orderings=args.max_permutations, seed=seed * 1000, progress=args.progress)
    start = time.perf_counter()
    removal = removal_effect(model, 0, x, y, mu)
    removal_seconds = time.perf_counter() - start
    top = snv_core.top_k(shapley.phi, k)
    scores = {"shapley": {"seconds": round(shapley.seconds, 3), "spearman_removal": spearman(shapley.phi, removal),
                          "topk_per_layer": snv_core.layer_counts(model, top)}}
    for kind in IMPORTANCES[1:]:
        res = score(kind, model, 0, x, y, mu, seed=seed * 1000, norm=args.magnitude_norm)
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
    """`python baselines.py rank-correlation [train.py options]`: <out-dir>/rank_correlation_seed<s>.json per seed."""
    import train

    train.git_commit()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "rank-correlation":
        print("usage: python baselines.py rank-correlation [train.py options]", file=sys.stderr)
        return 2
    parser = train.build_parser()
    parser.prog = "baselines.py rank-correlation"
    args = parser.parse_args(argv[1:])
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
