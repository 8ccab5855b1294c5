"""Class-incremental learning without replay: infer the task from the frozen subnetworks.

A mask-based method (SNV with masked inference, PackNet, WSN, Eidetic) keeps every finished task's
subnetwork intact, so its task-incremental accuracy survives; class-incremental evaluation fails only
because the task must be identified. Here each test image goes through every task's subnetwork and head
(one stacked forward for neuron subnetworks: model.gated with a coalition per task), a rule scores each task,
the best-scored task is picked and that task's head picks the class.

The rules are registered in RULES (the --task-inference choices). Each maps the stacked per-task logits
[K, B, C] (and, for `marginal`, the logits without each task's own part) to task scores [B, K]. The
standardised rules (`calibrated`, `marginal`) also use two scalars that task k recorded when it ended, from
its OWN validation split only: the mean and std of its raw score. Nothing else of a task's data is kept.

`marginal` (this harness's own rule): later subnetworks contain the earlier ones plus more neurons, so
they are confident on earlier tasks' inputs as well, but there that confidence comes from the neurons they
share with the earlier tasks. What is specific to task k is its own part of the network (for neuron
subnetworks S_k without B_{k-1}, the members task k-1's subnetwork lacks; for weight masks the weights no
earlier task uses). Its raw score is the marginal contribution of that part to the predicted class: head k's
largest logit through task k's subnetwork minus the same class's logit with task k's own part removed
(neurons replaced by their mean mu as in V(S), weights zeroed), standardised on task k's own validation split.
On task k's inputs its own neurons carry the evidence; on an earlier task's inputs they add little.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

import baselines
import datasets
import metrics
from baselines import State
from models import ContinualNet

STD_FLOOR = 1e-4
"""Smallest standard deviation a score's statistic may have (a constant score would divide by zero)."""


@dataclass
class TaskStats:
    """What task k leaves behind, measured on its own validation split when it ends: scalars only."""

    score_mean: dict[str, float] = field(default_factory=dict)
    """Per standardised rule: the mean of its raw score for task k on task k's validation samples."""
    score_std: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Outputs:
    """Every task's head through its own subnetwork on one batch."""

    logits: Tensor
    """[K, B, C]: task k's logits."""
    without: Tensor
    """[K, B, C]: task k's logits with its own part of the network removed (see `marginal`)."""


RawScore = Callable[[Outputs], Tensor]
"""Outputs of K tasks on B images -> raw scores [B, K], larger = more likely the task."""


@dataclass(frozen=True)
class Rule:
    """A task-inference rule: its raw score and whether it is standardised by each task's own validation statistics."""

    raw: RawScore
    help: str
    standardised: bool = False


RULES: dict[str, Rule] = {}
"""Every task-inference rule by name; `heads` (the paper's concatenated-head argmax) first, the default."""


def register_rule(name: str, help: str, standardised: bool = False) -> Callable[[RawScore], RawScore]:
    """Decorator: register `raw` as the rule `name`."""
    def register(raw: RawScore) -> RawScore:
        if name in RULES:
            raise ValueError(f"a task-inference rule named {name!r} is already registered")
        RULES[name] = Rule(raw, help, standardised)
        return raw
    return register


@register_rule("heads", "the largest logit of any head (the concatenated-head argmax)")
def heads(out: Outputs) -> Tensor:
    return out.logits.amax(2).T


@register_rule("maxprob", "the highest softmax probability of the task's head")
def maxprob(out: Outputs) -> Tensor:
    return F.softmax(out.logits, 2).amax(2).T


@register_rule("entropy", "the lowest softmax entropy of the task's head")
def entropy(out: Outputs) -> Tensor:
    logp = F.log_softmax(out.logits, 2)
    return (logp.exp() * logp).sum(2).T


@register_rule("calibrated", "the head's logsumexp (energy), standardised by its mean and std on the task's own "
                             "validation split", standardised=True)
def calibrated(out: Outputs) -> Tensor:
    return torch.logsumexp(out.logits, 2).T


@register_rule("marginal", "the drop of the head's top logit when the task's own neurons or weights are removed, "
                           "standardised on the task's own validation split", standardised=True)
def marginal(out: Outputs) -> Tensor:
    top = out.logits.argmax(2, keepdim=True)
    return (out.logits.gather(2, top) - out.without.gather(2, top)).squeeze(2).T


def scores(name: str, out: Outputs, stats: list[TaskStats | None]) -> Tensor:
    """[B, K] final scores of rule `name`; a standardised rule scores a task without statistics -inf."""
    rule = RULES[name]
    raw = rule.raw(out)
    if not rule.standardised:
        return raw
    final = torch.full_like(raw, -math.inf)
    for k, s in enumerate(stats):
        if s is not None:
            final[:, k] = (raw[:, k] - s.score_mean[name]) / s.score_std[name]
    return final


# ----------------------------------------------------------------------------- the stacked forward

def own_neurons(state: State, task: int) -> Tensor:
    """[N] bool: the members of task `task`'s subnetwork that task-1's lacks (all its members if none are new)."""
    members = state.subnets[task][0]
    new = members & ~state.subnets[task - 1][0] if task > 0 else members
    return new if bool(new.any()) else members


def without_own_weights(model: ContinualNet, method: baselines.WeightMasks, x: Tensor, task: int) -> Tensor:
    """[B, C]: finished task `task`'s logits through the weights of its mask that an earlier task's mask holds too."""
    earlier = {n: torch.zeros_like(m) for n, m in method.masks[task].items()}
    for mask in method.masks[:task]:
        earlier = {n: earlier[n] | mask[n] for n in earlier}
    overrides = {n: model.get_parameter(n) * (m & earlier[n]) for n, m in method.masks[task].items()}
    return functional_call(model, overrides | method.norms[task], (x, task))


def stacked_logits(model: ContinualNet, x: Tensor, keep: Tensor, const: Tensor, heads: Sequence[int],
                   max_rows: int) -> Tensor:
    """[K, B, C]: head heads[k] on x [B, ...] through coalition k (neurons outside keep [K, N] output const
    [K, N]), as stacked forwards of x repeated K times, at most max(`max_rows`, K) rows each (x in chunks)."""
    K, chunks = len(heads), []
    for xb in x.split(max(1, max_rows // K)):
        with model.gated(keep, const):
            feats = model.features(xb.repeat(K, *(1,) * (xb.dim() - 1))).view(K, len(xb), -1)
        chunks.append(torch.stack([model.heads[k](f) for k, f in zip(heads, feats)]))
    return torch.cat(chunks, 1)


@torch.no_grad()
def outputs(model: ContinualNet, x: Tensor, tasks: range, state: State, max_rows: int) -> Outputs:
    """The heads of `tasks` (K of them), each through its own task's subnetwork, with and without the task's own
    part, in eval mode; x [B, ...].

    Neuron subnetworks (SNV, Eidetic) run as stacked forwards of at most `max_rows` rows (x repeated, 2K
    coalitions, each with its task's constants); weight-mask methods (per_task) run each task's masked weights in
    turn. A task without a subnetwork yet (the fresh head before training) runs the plain network, `without` =
    its logits (no standardised rule scores it).
    """
    model.eval()
    method = state.method
    finished = len(method.masks) if isinstance(method, baselines.WeightMasks) else len(state.subnets)
    pieces: list[tuple[Tensor, Tensor]] = []
    stacked = range(tasks.start, tasks.start if method.per_task else min(finished, tasks.stop))
    if stacked:
        keep = torch.stack([state.subnets[k][0] for k in stacked])
        keep = torch.cat([keep, keep & ~torch.stack([own_neurons(state, k) for k in stacked])])
        const = torch.stack([state.subnets[k][1] for k in stacked]).repeat(2, 1)
        both = stacked_logits(model, x, keep, const, [*stacked, *stacked], max_rows).view(2, len(stacked), len(x), -1)
        pieces.append((both[0], both[1]))
    for k in range(stacked.stop, tasks.stop):
        logits = method.forward(model, x, k)
        without = without_own_weights(model, method, x, k) if method.per_task and k < finished else logits
        pieces.append((logits.unsqueeze(0), without.unsqueeze(0)))
    return Outputs(torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]))


# ----------------------------------------------------------------------------- one run's recording

class Recorder:
    """A class-incremental run's task inference: each task's statistics, and per rule its accuracy matrix and
    task-identification matrix (TI[i, j]: fraction of task j's test samples whose task the rule picks after
    training task i).

    Under torchrun (`world` > 1, `all_reduce` an in-place sum over ranks) each rank evaluates its share of every
    test batch and the counts are summed; the statistics come from the whole validation split on every rank."""

    def __init__(self, num_tasks: int, batch_size: int, device: torch.device, rank: int = 0, world: int = 1,
                 all_reduce: Callable[[Tensor], None] | None = None) -> None:
        self.batch_size, self.device = batch_size, device
        self.rank, self.world, self.all_reduce = rank, world, all_reduce
        self.stats: list[TaskStats] = []
        self.accuracy = {name: np.full((num_tasks, num_tasks), np.nan) for name in RULES}
        self.task_id = {name: np.full((num_tasks, num_tasks), np.nan) for name in RULES}

    @torch.no_grad()
    def task_end(self, model: ContinualNet, state: State, task: int, val: datasets.Split) -> None:
        """Record task `task`'s statistics from its own validation split, through its final subnetwork."""
        own, stats = range(task, task + 1), TaskStats()
        raws: dict[str, list[Tensor]] = {name: [] for name, rule in RULES.items() if rule.standardised}
        for x, _ in val.batches(self.batch_size, device=self.device):
            out = outputs(model, x, own, state, self.batch_size)
            for name in raws:
                raws[name].append(RULES[name].raw(out)[:, 0].double().cpu())
        for name, values in raws.items():
            v = torch.cat(values)
            stats.score_mean[name] = float(v.mean())
            stats.score_std[name] = max(float(v.std(correction=0)), STD_FLOOR)
        self.stats.append(stats)

    @torch.no_grad()
    def evaluate(self, model: ContinualNet, state: State, split: datasets.Split, task: int, upto: int,
                 row: int) -> dict[str, float]:
        """Every rule's accuracy on `task`'s split over heads 0..upto (stored at [row, task]); returns them by rule."""
        stats: list[TaskStats | None] = [self.stats[k] if k < len(self.stats) else None for k in range(upto + 1)]
        correct = {name: 0 for name in RULES}
        identified = {name: 0 for name in RULES}
        total = 0
        for x, y in split.batches(self.batch_size, device=self.device, rank=self.rank, world=self.world,
                                  complete=True):
            out = outputs(model, x, range(upto + 1), state, self.batch_size)
            y = y.cpu()
            logits = out.logits.cpu()
            for name in RULES:
                pick = scores(name, out, stats).argmax(1).cpu()
                cls = logits[pick, torch.arange(len(y))].argmax(1)
                identified[name] += int((pick == task).sum())
                correct[name] += int(((pick == task) & (cls == y)).sum())
            total += len(y)
        if self.all_reduce is not None:
            counts = torch.tensor([total, *correct.values(), *identified.values()])
            self.all_reduce(counts)
            total, *rest = counts.tolist()
            correct, identified = dict(zip(RULES, rest[:len(RULES)])), dict(zip(RULES, rest[len(RULES):]))
        for name in RULES:
            self.accuracy[name][row, task] = correct[name] / total
            self.task_id[name][row, task] = identified[name] / total
        return {name: correct[name] / total for name in RULES}

    def results(self, b: np.ndarray, joint_diag: np.ndarray | None, frozen: int | None, n: int) -> dict:
        """The results-file entry: per rule its matrices and metrics (as any CIL run's), and the per-task scalar
        statistics."""
        def listed(M: np.ndarray) -> list[list[float | None]]:
            return [[None if np.isnan(a) else float(a) for a in r] for r in M]

        return {
            "rules": {name: {"accuracy_matrix": listed(self.accuracy[name]), "task_id_matrix": listed(self.task_id[name]),
                             "metrics": metrics.compute_metrics(self.accuracy[name], b, joint_diag, frozen, n),
                             "task_id_final": float(np.mean(self.task_id[name][-1]))}
                      for name in RULES},
            "statistics": [{"task": k + 1, "score_mean": s.score_mean, "score_std": s.score_std}
                           for k, s in enumerate(self.stats)],
        }

    def state_dict(self) -> dict:
        """Everything needed to continue after a checkpoint (tensors, lists and floats only)."""
        return {"stats": [{"score_mean": s.score_mean, "score_std": s.score_std} for s in self.stats],
                "accuracy": {k: v.tolist() for k, v in self.accuracy.items()},
                "task_id": {k: v.tolist() for k, v in self.task_id.items()}}

    def load_state_dict(self, saved: dict) -> None:
        self.stats = [TaskStats(**s) for s in saved["stats"]]
        self.accuracy = {k: np.array(v, dtype=float) for k, v in saved["accuracy"].items()}
        self.task_id = {k: np.array(v, dtype=float) for k, v in saved["task_id"].items()}
