"""Class-incremental learning without replay: infer the task from the frozen subnetworks.

A mask-based method (SNV with masked inference, PackNet, WSN, Eidetic) keeps every finished task's
subnetwork intact, so its task-incremental accuracy survives; class-incremental evaluation fails only
because the task must be identified. Here each test image goes through every task's subnetwork and head
(one stacked forward for neuron subnetworks: model.gated with K coalitions), a rule scores each task,
the best-scored task is picked and that task's head picks the class.

The rules are registered in RULES (the --task-inference choices). Each maps the stacked per-task logits
[K, B, C] (and the per-task neuron activations [K, B, N]) to task scores [B, K]. `calibrated` and
`specific` also use statistics that task k recorded when it ended, from its OWN validation split only:
the mean and std of its raw score, and for `specific` the mean and std [N] of its specific neurons'
activations. Nothing else of a task's data is kept.

`specific` (this harness's own rule): later subnetworks contain the earlier ones plus more neurons, so
they are confident on earlier tasks' inputs as well. What is specific to task k is its own neurons (the
members of its subnetwork that are not members of task k-1's: S_k without B_{k-1}; for weight-mask
methods, where no neuron belongs to a task, every neuron). Their activations on task k's inputs follow
the distribution they were trained on; on another task's inputs they do not. The raw score is the
diagonal Gaussian log-likelihood -mean_i ((a_i - m_i) / s_i)^2 over those neurons (m, s from task k's
validation split), standardised by its own validation mean and std.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import datasets
import metrics
from baselines import State
from models import ContinualNet

STD_FLOOR = 1e-4
"""Smallest standard deviation a statistic may have (a constant neuron or score would divide by zero)."""


@dataclass
class TaskStats:
    """What task k leaves behind, measured on its own validation split when it ends (no sample dimension)."""

    specific: Tensor
    """[N] bool: task k's specific neurons."""
    act_mean: Tensor
    """[N]: mean activation of each neuron (spatial mean per sample for a conv channel) through task k's subnetwork."""
    act_std: Tensor
    """[N]: their standard deviation (at least STD_FLOOR)."""
    score_mean: dict[str, float] = field(default_factory=dict)
    """Per standardised rule: the mean of its raw score for task k on task k's validation samples."""
    score_std: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Outputs:
    """Every task's head through its own subnetwork on one batch."""

    logits: Tensor
    """[K, B, C]: task k's logits."""
    acts: Tensor
    """[K, B, N]: every neuron's activation (gate output; a conv channel's spatial mean) through task k's subnetwork."""


RawScore = Callable[[Outputs, list[TaskStats | None]], Tensor]
"""(outputs, per-task statistics) -> raw scores [B, K], larger = more likely the task."""


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
def heads(out: Outputs, stats: list[TaskStats | None]) -> Tensor:
    return out.logits.amax(2).T


@register_rule("maxprob", "the highest softmax probability of the task's head")
def maxprob(out: Outputs, stats: list[TaskStats | None]) -> Tensor:
    return F.softmax(out.logits, 2).amax(2).T


@register_rule("entropy", "the lowest softmax entropy of the task's head")
def entropy(out: Outputs, stats: list[TaskStats | None]) -> Tensor:
    logp = F.log_softmax(out.logits, 2)
    return (logp.exp() * logp).sum(2).T


@register_rule("calibrated", "the head's logsumexp (energy), standardised by its mean and std on the task's own "
                             "validation split", standardised=True)
def calibrated(out: Outputs, stats: list[TaskStats | None]) -> Tensor:
    return torch.logsumexp(out.logits, 2).T


@register_rule("specific", "the Gaussian log-likelihood of the task's specific neurons' activations (its own "
                           "validation mean and std), standardised on its own validation split",
               standardised=True)
def specific(out: Outputs, stats: list[TaskStats | None]) -> Tensor:
    K, B, _ = out.acts.shape
    scores = torch.full((B, K), -math.inf, dtype=out.acts.dtype, device=out.acts.device)
    for k, s in enumerate(stats):
        if s is not None:
            z = (out.acts[k][:, s.specific] - s.act_mean[s.specific]) / s.act_std[s.specific]
            scores[:, k] = -z.pow(2).mean(1)
    return scores


def scores(name: str, out: Outputs, stats: list[TaskStats | None]) -> Tensor:
    """[B, K] final scores of rule `name`; a standardised rule scores a task without statistics -inf."""
    rule = RULES[name]
    raw = rule.raw(out, stats)
    if not rule.standardised:
        return raw
    final = torch.full_like(raw, -math.inf)
    for k, s in enumerate(stats):
        if s is not None:
            final[:, k] = (raw[:, k] - s.score_mean[name]) / s.score_std[name]
    return final


# ----------------------------------------------------------------------------- the stacked forward

def specific_neurons(state: State, task: int, n: int) -> Tensor:
    """[N] bool: the neurons of task `task`'s subnetwork that task-1's lacks (all members if none are new; every
    neuron for weight-mask methods)."""
    if state.method.per_task:
        return torch.ones(n, dtype=torch.bool)
    members = state.subnets[task][0].cpu()
    new = members & ~state.subnets[task - 1][0].cpu() if task > 0 else members
    return new if bool(new.any()) else members


@torch.no_grad()
def outputs(model: ContinualNet, x: Tensor, tasks: range, state: State, max_rows: int) -> Outputs:
    """The heads of `tasks` (K of them), each through its own task's subnetwork, in eval mode; x [B, ...].

    Neuron subnetworks (SNV, Eidetic) run as stacked forwards of at most `max_rows` rows (x repeated, one
    coalition with its own constants per task); weight-mask methods (per_task) run each task's masked
    weights in turn. A task without a subnetwork yet (the fresh head before training) runs the plain network.
    """
    model.eval()
    captured: dict[int, Tensor] = {}

    def hook(l: int) -> Callable:
        def capture(module, inputs, out: Tensor) -> None:
            captured[l] = out.flatten(2).mean(2) if out.dim() > 2 else out
        return capture

    handles = [layer.gate.register_forward_hook(hook(l)) for l, layer in enumerate(model.layers)]
    try:
        def run(fn: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
            logits = fn()
            return logits, torch.cat([captured[l] for l in range(len(model.layers))], 1)

        pieces: list[tuple[Tensor, Tensor]] = []
        stacked = range(tasks.start, tasks.start if state.method.per_task else min(len(state.subnets), tasks.stop))
        if stacked:
            keep = torch.stack([state.subnets[k][0] for k in stacked])
            const = torch.stack([state.subnets[k][1] for k in stacked])
            chunks = []
            for xb in x.split(max(1, max_rows // len(stacked))):
                with model.gated(keep, const):
                    feats, acts = run(lambda: model.features(xb.repeat(len(stacked), *(1,) * (xb.dim() - 1))))
                feats, acts = feats.view(len(stacked), len(xb), -1), acts.view(len(stacked), len(xb), -1)
                chunks.append((torch.stack([model.heads[k](f) for k, f in zip(stacked, feats)]), acts))
            pieces.append((torch.cat([c[0] for c in chunks], 1), torch.cat([c[1] for c in chunks], 1)))
        for k in range(stacked.stop, tasks.stop):
            logits, acts = run(lambda: state.method.forward(model, x, k))
            pieces.append((logits.unsqueeze(0), acts.unsqueeze(0)))
    finally:
        for h in handles:
            h.remove()
    return Outputs(torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]))


# ----------------------------------------------------------------------------- one run's recording

class Recorder:
    """A class-incremental run's task inference: each task's statistics, and per rule its accuracy matrix and
    task-identification matrix (TI[i, j]: fraction of task j's test samples whose task the rule picks after
    training task i)."""

    def __init__(self, num_tasks: int, batch_size: int, device: torch.device) -> None:
        self.batch_size, self.device = batch_size, device
        self.stats: list[TaskStats] = []
        self.accuracy = {name: np.full((num_tasks, num_tasks), np.nan) for name in RULES}
        self.task_id = {name: np.full((num_tasks, num_tasks), np.nan) for name in RULES}

    @torch.no_grad()
    def task_end(self, model: ContinualNet, state: State, task: int, val: datasets.Split) -> None:
        """Record task `task`'s statistics from its own validation split, through its final subnetwork."""
        n = model.num_neurons
        spec, own = specific_neurons(state, task, n), range(task, task + 1)
        a = torch.cat([self.outputs(model, state, own, x).acts[0]
                       for x, _ in val.batches(self.batch_size, device=self.device)]).double()
        stats = TaskStats(spec, a.mean(0).float(), a.std(0, correction=0).clamp(min=STD_FLOOR).float())
        raws: dict[str, list[Tensor]] = {name: [] for name, rule in RULES.items() if rule.standardised}
        for x, _ in val.batches(self.batch_size, device=self.device):
            out = self.outputs(model, state, own, x)
            for name in raws:
                raws[name].append(RULES[name].raw(out, [stats])[:, 0].double().cpu())
        for name, values in raws.items():
            v = torch.cat(values)
            stats.score_mean[name] = float(v.mean())
            stats.score_std[name] = max(float(v.std(correction=0)), STD_FLOOR)
        self.stats.append(stats)

    def outputs(self, model: ContinualNet, state: State, tasks: range, x: Tensor) -> Outputs:
        """outputs() of `tasks` on x, its activations on the CPU, where the statistics are."""
        out = outputs(model, x, tasks, state, self.batch_size)
        return Outputs(out.logits, out.acts.cpu())

    @torch.no_grad()
    def evaluate(self, model: ContinualNet, state: State, split: datasets.Split, task: int, upto: int, row: int,
                 classes_per_task: int) -> dict[str, float]:
        """Every rule's accuracy on `task`'s split over heads 0..upto (stored at [row, task]); returns them by rule."""
        stats: list[TaskStats | None] = [self.stats[k] if k < len(self.stats) else None for k in range(upto + 1)]
        correct = {name: 0 for name in RULES}
        identified = {name: 0 for name in RULES}
        total = 0
        for x, y in split.batches(self.batch_size, device=self.device):
            out = self.outputs(model, state, range(upto + 1), x)
            y = y.cpu()
            logits = out.logits.cpu()
            for name in RULES:
                pick = scores(name, out, stats).argmax(1).cpu()
                cls = logits[pick, torch.arange(len(y))].argmax(1)
                identified[name] += int((pick == task).sum())
                correct[name] += int(((pick == task) & (cls == y)).sum())
            total += len(y)
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
            "statistics": [{"task": k + 1, "specific_neurons": int(s.specific.sum()), "score_mean": s.score_mean,
                            "score_std": s.score_std} for k, s in enumerate(self.stats)],
        }

    def state_dict(self) -> dict:
        """Everything needed to continue after a checkpoint (tensors, lists and floats only)."""
        return {"stats": [{"specific": s.specific, "act_mean": s.act_mean, "act_std": s.act_std,
                           "score_mean": s.score_mean, "score_std": s.score_std} for s in self.stats],
                "accuracy": {k: v.tolist() for k, v in self.accuracy.items()},
                "task_id": {k: v.tolist() for k, v in self.task_id.items()}}

    def load_state_dict(self, saved: dict) -> None:
        self.stats = [TaskStats(**s) for s in saved["stats"]]
        self.accuracy = {k: np.array(v, dtype=float) for k, v in saved["accuracy"].items()}
        self.task_id = {k: np.array(v, dtype=float) for k, v in saved["task_id"].items()}
