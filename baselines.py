"""The methods and neuron scores of the harness, each registered under its name in one place.

A neuron score is one function registered with `@register_score(name, *flags)`: it gets a `ScoreInput`
(the trained model, the task's evaluation set, mu, k, V) and returns phi [N] (higher = more important).
SNV freezes the top-k of the score chosen by --importance (default: Monte Carlo Shapley).

A method is one `Method` subclass registered with `@register_method`: class attributes say what it
freezes, which scenarios and scores it supports, and its own flags (with allowed ranges and help); its
hooks (FACIL-style) are before_task, data_tasks, forward (one head's logits), penalty (added to the
loss), after_step, after_task (selection, pruning, consolidation; gets a `Loop` of train.py's services)
and route (class-incremental task routing). train.py, report.py, run_experiments.sh and --help read
METHODS and SCORES; no other list of their names exists. This module never imports train.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import datasets
import snv_core
from models import ContinualNet, he_init

SCENARIOS = ("task_il", "class_il")
SI_DAMPING = 0.1
"""xi of Synaptic Intelligence: Omega += omega / (Delta^2 + xi)."""


# ----------------------------------------------------------------------------- registries

@dataclass(frozen=True)
class Flag:
    """One command-line option of a method or score: argparse keywords and, for a number, its allowed values."""

    name: str
    kwargs: dict
    allowed: str | None = None
    """'>= x', '> x' or an interval such as '(0, 1]' (checked by train.in_range); None for a choice or a switch."""

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")


@dataclass(frozen=True)
class ScoreInput:
    """What a neuron score sees: the trained model, head `task`, the evaluation set x [E, ...], y [E], the mean
    activations mu [N], the capacity k, the value function V(S) (coalitions [K, N] bool -> [K]), a seed, the run's
    options and, under torchrun, this rank's place (all_reduce: an in-place sum over ranks)."""

    model: ContinualNet
    task: int
    x: Tensor
    y: Tensor
    mu: Tensor | None = None
    k: int = 1
    v: snv_core.ValueFn | None = None
    seed: int = 0
    args: argparse.Namespace = field(default_factory=lambda: flag_defaults())
    rank: int = 0
    world: int = 1
    all_reduce: Callable[[Tensor], None] | None = None


ScoreFn = Callable[[ScoreInput], Any]
"""A neuron score: ScoreInput -> phi [N] float64, or a result with .phi [N] and .cost() (as snv_core.ShapleyResult)."""


@dataclass(frozen=True)
class Score:
    """A registered neuron score and its own flags."""

    fn: ScoreFn
    flags: tuple[Flag, ...] = ()


SCORES: dict[str, Score] = {}
"""Every neuron score by name, in registration order (the order of tables and --help)."""
METHODS: dict[str, type[Method]] = {}
"""Every method by name, in registration order (the order of tables and --help)."""


def register_score(name: str, *flags: Flag) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: register `fn` as the neuron score `name` (with its own flags)."""
    def register(fn: ScoreFn) -> ScoreFn:
        if name in SCORES:
            raise ValueError(f"a score named {name!r} is already registered")
        SCORES[name] = Score(fn, flags)
        return fn
    return register


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a Method subclass under its `name`."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"a method needs a unique name; {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


def all_flags() -> list[Flag]:
    """The flags of every registered score and method, each once."""
    flags = [f for s in SCORES.values() for f in s.flags] + [f for m in METHODS.values() for f in m.flags]
    return list({f.name: f for f in flags}.values())


def flag_defaults() -> argparse.Namespace:
    """The default of every score's and method's flag (for a ScoreInput made outside a run)."""
    return argparse.Namespace(**{f.dest: f.kwargs.get("default") for f in all_flags()})


# ----------------------------------------------------------------------------- neuron scores

def score(kind: str, inp: ScoreInput) -> ScoreResult | snv_core.ShapleyResult:
    """The registered score `kind` on `inp`, with its cost (a plain phi is wrapped with its wall-clock time)."""
    if kind not in SCORES:
        raise ValueError(f"unknown importance {kind!r}: choose one of {', '.join(SCORES)}")
    start = time.perf_counter()
    res = SCORES[kind].fn(inp)
    if isinstance(res, Tensor):
        return ScoreResult(res, kind, time.perf_counter() - start)
    return res


def importance(kind: str, model: ContinualNet, task: int, x: Tensor, y: Tensor, mu: Tensor | None = None, *,
               seed: int = 0, args: argparse.Namespace | None = None) -> Tensor:
    """phi [N] float64 of a score that needs no V(S) (all but shapley) on (x, y); options default to the flags'."""
    return score(kind, ScoreInput(model, task, x, y, mu, seed=seed, args=args or flag_defaults())).phi


@dataclass
class ScoreResult:
    """A score's phi [N] and what it cost (duck-types snv_core.ShapleyResult)."""

    phi: Tensor
    importance: str
    seconds: float

    def cost(self) -> dict:
        """The JSON-ready cost summary."""
        return {"importance": self.importance, "seconds": round(self.seconds, 3)}


@register_score(
    "shapley",
    Flag("--estimator", dict(choices=("snv", "neuron_shapley"), default="snv",
                             help="snv: forward walks + truncation + z-bandit; neuron_shapley: reverse walks + "
                                  "Bernstein bandit")),
    Flag("--truncation", dict(type=float, default=0.1, help="tau: skip marginals while V(S) <= tau"), "[0, 1)"),
    Flag("--confidence", dict(type=float, default=0.95, help="alpha of the bandit's z_alpha"), "(0, 1)"),
    Flag("--bandit-threshold", dict(choices=("kth", "midpoint"), default="kth",
                                    help="phi^(k): the k-th largest estimate (paper) or the midpoint of the k-th "
                                         "and (k+1)-th")),
    Flag("--max-permutations", dict(type=int, default=200, help="cap on Monte Carlo orderings per task"), ">= 1"),
)
def shapley(inp: ScoreInput) -> snv_core.ShapleyResult:
    """Monte Carlo Shapley values phi_i of V(S) (Eq. 9), by SNV's estimator or Neuron Shapley's."""
    if inp.v is None:
        raise ValueError("the shapley score needs the value function V(S) (ScoreInput.v)")
    a, n = inp.args, inp.model.num_neurons
    kw = dict(max_orderings=a.max_permutations, seed=inp.seed, progress=getattr(a, "progress", False))
    if a.estimator == "snv":
        return snv_core.permutation_shapley(inp.v, n, inp.k, tau=a.truncation, alpha=a.confidence,
                                            threshold=a.bandit_threshold, rank=inp.rank, world_size=inp.world,
                                            all_reduce=inp.all_reduce, **kw)
    return snv_core.neuron_shapley(inp.v, n, inp.k, **kw)


@register_score("random")
def random_score(inp: ScoreInput) -> Tensor:
    """U(0, 1) per neuron, drawn from the seed."""
    return torch.rand(inp.model.num_neurons, generator=torch.Generator().manual_seed(inp.seed), dtype=torch.float64)


@register_score("magnitude", Flag("--magnitude-norm", dict(type=int, choices=(1, 2), default=1,
                                                           help="p of the magnitude score ||W_i||_p")))
def magnitude(inp: ScoreInput) -> Tensor:
    """||incoming weight row||_p of each neuron."""
    return torch.cat([layer.producer.weight.detach().flatten(1).norm(p=inp.args.magnitude_norm, dim=1).cpu()
                      for layer in inp.model.layers]).double()


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


def per_layer(inp: ScoreInput, formula: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
    """[N] float64: formula(a [B, n, P], dL/da [B, n, P], mu [n] or None) -> [n] per layer (P = positions, 1 for a unit)."""
    acts, grads = gate_outputs(inp.model, inp.task, inp.x, inp.y)
    refs = inp.model.split_neurons(inp.mu.to(inp.x.device)) if inp.mu is not None else [None] * len(acts)
    return torch.cat([formula(a.flatten(2) if a.dim() > 2 else a.unsqueeze(2),
                              g.flatten(2) if g.dim() > 2 else g.unsqueeze(2), ref)
                      for a, g, ref in zip(acts, grads, refs)]).double().cpu()


@register_score("activation")
def activation(inp: ScoreInput) -> Tensor:
    """Mean max(a, 0): the neuron's ReLU output (a = the gate output, before the ReLU; one that never fires scores 0)."""
    return per_layer(inp, lambda a, g, ref: a.clamp(min=0).mean(dim=(0, 2)))


@register_score("taylor")
def taylor(inp: ScoreInput) -> Tensor:
    """Mean over samples of |mean over positions of a * dL/da| (Molchanov et al. 2017)."""
    return per_layer(inp, lambda a, g, ref: (a * g).mean(2).abs().mean(0))


@register_score("gxd")
def gxd(inp: ScoreInput) -> Tensor:
    """Mean over samples of |sum over positions of (a - mu) * dL/da|: the first-order loss change of replacing the
    neuron by its mean mu (SNV's removal)."""
    if inp.mu is None:
        raise ValueError("gxd needs the reference mu")
    return per_layer(inp, lambda a, g, ref: ((a - ref.view(1, -1, 1)) * g).sum(2).abs().mean(0))


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
    """Accuracy of `logits` (x -> [B, C], local labels) on a split, without gradient; counted on the device and
    read once."""
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for x, y in split.batches(batch_size, device=device):
            correct += (logits(x).argmax(1) == y).sum()
    return int(correct) / len(split)


# ----------------------------------------------------------------------------- the method interface

@dataclass
class Loop:
    """train.py's services for the task just trained: its data, retraining it, its own head's logits and its loss."""

    task: int
    tasks: list[datasets.Task]
    """Tasks 0..task (their data)."""
    num_tasks: int
    device: torch.device
    eval_set: Callable[[], tuple[Tensor, Tensor]]
    """() -> (x, y): this task's fixed evaluation set (Shapley's), for data-driven scores."""
    retrain: Callable[[int, str], int]
    """(epochs, label) -> epochs run: train_phase on this task (early stopping, best weights restored)."""
    logits: Callable[[Tensor], Tensor]
    """x -> [B, C]: this task's head through its subnetwork, if it has one."""
    loss: Callable[[Tensor, Tensor], Tensor]
    """(x, y) -> the scenario's training loss of this task on a batch."""
    rank: int = 0
    world: int = 1
    all_reduce: Callable[[Tensor], None] | None = None
    """Under torchrun: this rank, the number of ranks, an in-place sum over ranks (None in one process)."""


class Method:
    """A continual-learning method's hooks; the base class trains the current task plainly and freezes nothing."""

    name: ClassVar[str] = ""
    """--method NAME; results folders and tables use it."""
    label: ClassVar[str] = ""
    """Its row label in the report."""
    help: ClassVar[str] = ""
    """One line for --help."""
    scenarios: ClassVar[tuple[str, ...]] = SCENARIOS
    importances: ClassVar[tuple[str, ...] | None] = ()
    """The --importance scores it accepts, its default first; None = every registered score, shapley first."""
    flags: ClassVar[tuple[Flag, ...]] = ()
    freezes_heads: ClassVar[bool] = False
    """Finished tasks' heads are frozen."""
    freezes_neurons: ClassVar[bool] = False
    """It keeps a frozen-neuron set B_t (reported as CAP)."""
    resumable: ClassVar[bool] = False
    """A checkpoint holds its whole state: --resume continues it and torchrun can run it."""
    resettable: ClassVar[bool] = False
    """--reset gxd may be combined with it (it owns no weights and reinitialises nothing itself)."""
    per_task: ClassVar[bool] = False
    """True: every head runs through its own task's network, so heads cannot share one feature pass (CIL)."""
    records_key: ClassVar[str] = "method_records"
    """The results-file key of its per-task records."""
    task_inference: ClassVar[bool] = False
    """Finished tasks run through frozen subnetworks (TIL is exact), so class-incremental evaluation can infer the
    task from them (train.py --task-inference, task_inference.py)."""

    def __init__(self, args: argparse.Namespace | None = None, model: ContinualNet | None = None,
                 seed: int = 0) -> None:
        self.args, self.seed = args, seed
        self.task = 0
        self.records: list[dict] = []

    @classmethod
    def infers_tasks(cls, args: argparse.Namespace) -> bool:
        """Whether a run with these options has frozen per-task subnetworks to infer the task from."""
        return cls.task_inference

    @classmethod
    def default_importance(cls) -> str | None:
        """The score --importance defaults to (None: the method takes no score)."""
        return next(iter(SCORES)) if cls.importances is None else next(iter(cls.importances), None)

    def data_tasks(self, task: int) -> list[int]:
        """The tasks whose training data train task `task`."""
        return [task]

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
        """Called once task `loop.task` is trained, before it is evaluated (selection, pruning, consolidation)."""

    def route(self, model: ContinualNet, x: Tensor, logits: Tensor, upto: int) -> Tensor:
        """CIL evaluation logits [B, (upto+1) C] after task routing."""
        return logits


@dataclass
class State:
    """What the loop carries between tasks: B_t, for masked inference each task's subnetwork, the method's hooks."""

    frozen: Tensor
    subnets: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    method: Method = field(default_factory=Method)


@register_method
class Joint(Method):
    """The upper bound: task t trains on the data of tasks 1..t (the tasks take turns, one batch each)."""

    name, label, help = "joint", "Joint (upper bound)", "the joint-training upper bound"
    resumable = True

    def data_tasks(self, task: int) -> list[int]:
        return list(range(task + 1))


@register_method
class SGD(Method):
    """The lower bound: plain fine-tuning on each task in turn."""

    name, label, help = "sgd", "SGD (lower bound)", "the fine-tuning lower bound"
    resumable = resettable = True


@register_method
class SNV(Method):
    """Shapley Neuron Valuation: after training task t, mu on its validation data, phi by --importance (Monte Carlo
    Shapley), S_t = top-k(phi) with k = floor(c N) (or --capacity-rate's k_t), B_t = B_{t-1} u S_t. Masked inference: task t runs through its
    subnetwork (members of B_t kept, the others = mu), first trained through it for --mask-finetune-epochs."""

    name, label, help = "snv", "SNV", "Shapley Neuron Valuation (the paper)"
    importances = None
    flags = (
        Flag("--inference", dict(choices=("masked", "dense"), default="masked",
                                 help="snv: masked = task t runs through its subnetwork (Eq. 1); dense = the "
                                      "paper-literal full network")),
        Flag("--selection", dict(choices=("global", "per-layer"), default="global",
                                 help="snv: S_t = the top k over the whole network (the paper) or per layer, k split "
                                      "across layers in proportion to their sizes")),
        Flag("--candidates", dict(choices=("all", "free"), default="all",
                                  help="snv: S_t is picked among every neuron, B_{t-1} included (the paper), or only "
                                       "among neurons not yet in B_{t-1}, so that each task adds k new neurons")),
        Flag("--capacity-rate", dict(type=float, default=None, metavar="RHO",
                                     help="snv with --candidates free: task t takes k_t = max(floor(rho F_t), "
                                          "floor(F_t / (T - t + 1))) of the F_t neurons not yet in B_{t-1} (front-"
                                          "loaded like PackNet, which keeps 0.25 of what is free); default: k = "
                                          "floor(c N) for every task (the paper)"), "(0, 1]"),
        Flag("--reuse", dict(choices=("on", "off"), default="on",
                             help="snv, masked: task t's subnetwork is B_{t-1} u S_t (on) or S_t alone (off); B_t "
                                  "grows the same either way")),
    )
    freezes_heads = freezes_neurons = resumable = resettable = task_inference = True
    records_key = "shapley"

    @classmethod
    def infers_tasks(cls, args: argparse.Namespace) -> bool:
        return args.inference == "masked"

    def after_task(self, model: ContinualNet, state: State, loop: Loop) -> None:
        args, t = self.args, loop.task
        mu, selected, record = self.select(model, state, loop)
        members = state.frozen | selected
        if args.inference == "masked":
            subnet = members if args.reuse == "on" else selected
            state.subnets.append((subnet.to(loop.device), mu.to(loop.device)))
            if args.mask_finetune_epochs > 0:
                keeper = snv_core.Freezer(model, ~subnet.to(loop.device), 0)
                record["mask_finetune_epochs"] = loop.retrain(args.mask_finetune_epochs,
                                                              f"task {t + 1}/{loop.num_tasks} (mask)")
                keeper.restore()
        state.frozen = members
        record["frozen_total"] = int(members.sum())
        record["frozen_per_layer"] = snv_core.layer_counts(model, members)
        self.records.append(record)

    def select(self, model: ContinualNet, state: State, loop: Loop) -> tuple[Tensor, Tensor, dict]:
        """mu [N], S_t [N] bool and the task's record: phi by --importance on the task's evaluation set."""
        args, t, n = self.args, loop.task, model.num_neurons
        k = (snv_core.capacity_k(args.sparsity, n) if args.capacity_rate is None
             else snv_core.scheduled_k(args.capacity_rate, n - int(state.frozen.sum()), loop.num_tasks - t))
        mu = snv_core.mean_activations(model, loop.tasks[t].val.batches(args.eval_batch_size, device=loop.device))
        x, y = loop.eval_set()
        v = snv_core.MaskedAccuracy(model, t, x, y, mu, impl=args.shapley_impl, memory_gb=args.shapley_memory_gb)
        res = score(args.importance, ScoreInput(model, t, x, y, mu, k, v, seed=self.seed * 1000 + t, args=args,
                                                rank=loop.rank, world=loop.world, all_reduce=loop.all_reduce))
        phi = res.phi if args.candidates == "all" else snv_core.outside(res.phi, state.frozen.to(res.phi.device))
        selected = (snv_core.top_k(phi, k) if args.selection == "global"
                    else snv_core.top_k_per_layer(phi, k, model.layer_sizes))
        record = {**res.cost(), "k": k, "selected": int(selected.sum()),
                  "newly_frozen": int((selected & ~state.frozen).sum()),
                  "v_full": float(v(torch.ones(1, n, dtype=torch.bool))[0]),
                  "v_members": float(v((state.frozen | selected).unsqueeze(0))[0]),
                  "selected_per_layer": snv_core.layer_counts(model, selected),
                  "phi": [round(float(p), 6) for p in res.phi]}
        return mu, selected, record


class WeightMasks(Method):
    """Weight-level subnetworks (PackNet, WSN): finished task j runs with W * mask_j and its own BatchNorm copy.

    Weights in a finished task's mask are frozen (restored after every step); producer biases train in
    task 1 only. Subclasses define the current task's weights (`current`) and its final mask.
    """

    per_task = freezes_heads = task_inference = True

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__(args, model, seed)
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


@register_method
class PackNet(WeightMasks):
    """PackNet (Mallya & Lazebnik 2018): after each task prune --packnet-prune of each layer's free weights by
    magnitude (to 0, free again for later tasks), retrain the rest --mask-finetune-epochs, then freeze them.
    Task j runs with every weight owned by tasks 1..j.
    """

    name, label, help = "packnet", "PackNet", "PackNet: magnitude pruning and weight freezing (Mallya & Lazebnik 2018)"
    flags = (Flag("--packnet-prune", dict(type=float, default=0.75,
                                          help="packnet: fraction of each layer's free weights pruned after each task "
                                               "(then --mask-finetune-epochs retraining)"), "(0, 1)"),)

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


@register_method
class WSN(WeightMasks):
    """Winning SubNetworks (Kang et al. 2022): task t uses W * m_t, m_t = the top --sparsity (c) of each layer's
    learned scores |s| (straight-through gradient), the scores persisting across tasks; weights in an
    earlier task's mask are reused frozen. Task-incremental, or class-incremental with a --task-inference rule.
    """

    name, label, help = "wsn", "WSN", "Winning SubNetworks: learned weight masks (Kang et al. 2022), task-incremental"
    scenarios = ("task_il",)

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


@register_method
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

    name, label, help = "eidetic", "Eidetic", "Eidetic Learning: prune, freeze, cut, route (Dronen & Balestriero 2025)"
    importances = ("taylor", "magnitude")
    flags = (
        Flag("--eidetic-step", dict(type=float, default=0.05, help="eidetic: fraction of each layer's neurons pruned "
                                                                   "per step"), "(0, 1]"),
        Flag("--eidetic-threshold", dict(type=float, default=0.01, help="eidetic: stop pruning once accuracy < "
                                                                        "unpruned accuracy - threshold (absolute)"),
             "[0, 1]"),
        Flag("--eidetic-stop-split", dict(choices=("train", "val"), default="train",
                                          help="eidetic: split of the stopping accuracy")),
        Flag("--eidetic-recovery-epochs", dict(type=int, default=5, help="eidetic: max epochs of recovery training "
                                                                         "after each pruning step (stops once above "
                                                                         "the threshold)"), ">= 0"),
        Flag("--eidetic-router-epochs", dict(type=int, default=3, help="eidetic, class_il: epochs of the task router "
                                                                       "on the training data of every task seen so "
                                                                       "far"), ">= 1"),
    )
    freezes_heads = freezes_neurons = task_inference = True

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__(args, model, seed)
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
                scores = importance(args.importance, model, t, x, y, args=args)
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
            correct, seen = torch.zeros((), dtype=torch.int64, device=loop.device), 0
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
                correct += (out.argmax(1) == labels).sum()
                seen += len(labels)
        model.train(was_training)
        return router, int(correct) / max(seen, 1)

    def route(self, model: ContinualNet, x: Tensor, logits: Tensor, upto: int) -> Tensor:
        """Hard routing once the router knows heads 0..upto: every block but the routed task's becomes -inf."""
        if self.router is None or self.router.out_features != upto + 1:
            return logits
        with torch.no_grad():
            pick = self.router(model.features(x)).argmax(1)
        keep = F.one_hot(pick, upto + 1).bool().unsqueeze(2)
        return logits.view(len(x), upto + 1, -1).masked_fill(~keep, -math.inf).view_as(logits)


@register_method
class EWC(Method):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017), online form: (lambda/2) sum_i F_i (theta_i - theta*_i)^2.

    F = sum over finished tasks of the diagonal empirical Fisher (batch gradients squared, FACIL's
    approximation, with the true labels); theta* = the weights after the last task.
    """

    name, label, help = "ewc", "EWC", "Elastic Weight Consolidation (Kirkpatrick et al. 2017)"
    flags = (Flag("--ewc-lambda", dict(type=float, default=5000.0, help="ewc: penalty weight"), ">= 0"),)
    resettable = True

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__(args, model, seed)
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


@register_method
class SI(Method):
    """Synaptic Intelligence (Zenke et al. 2017): c sum_i Omega_i (theta_i - theta*_i)^2.

    omega_i accumulates -g_i Delta theta_i along the trajectory (g = gradient of the task loss alone);
    after each task Omega_i += max(0, omega_i / (Delta_i^2 + xi)), Delta = the task's total change.
    """

    name, label, help = "si", "SI", "Synaptic Intelligence (Zenke et al. 2017)"
    flags = (Flag("--si-c", dict(type=float, default=1.0, help="si: penalty weight c"), ">= 0"),)
    resettable = True

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__(args, model, seed)
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


@register_method
class LwF(Method):
    """Learning without Forgetting (Li & Hoiem 2017): alpha * distillation(old heads, frozen copy of the previous model).

    As in FACIL, the old heads' logits are concatenated into one softmax at temperature T.
    """

    name, label, help = "lwf", "LwF", "Learning without Forgetting (Li & Hoiem 2017)"
    flags = (Flag("--lwf-alpha", dict(type=float, default=1.0, help="lwf: distillation weight"), ">= 0"),
             Flag("--lwf-temperature", dict(type=float, default=2.0, help="lwf: distillation temperature T"), "> 0"))
    resettable = True

    def __init__(self, args: argparse.Namespace, model: ContinualNet, seed: int) -> None:
        super().__init__(args, model, seed)
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


def build_method(args: argparse.Namespace, model: ContinualNet, seed: int) -> Method:
    """The hooks of args.method."""
    return METHODS[args.method](args, model, seed)


# ----------------------------------------------------------------------------- command line

def method_help() -> str:
    """--method's help: every registered method's one line."""
    return "; ".join(f"{name}: {m.help}" for name, m in METHODS.items())


def importance_help() -> str:
    """--importance's help: the scores each method that takes one accepts, and its default."""
    return "the neuron score of a method that takes one (" + "; ".join(
        f"{name}: {', '.join(m.importances or SCORES)}, default {m.default_importance()}"
        for name, m in METHODS.items() if m.importances != ()) + ")"


def flag_ranges() -> tuple[tuple[str, str], ...]:
    """(flag, allowed) of every registered numeric flag (checked by train.in_range)."""
    return tuple((f.name, f.allowed) for f in all_flags() if f.allowed is not None)


def resolve_args(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """Fill --importance's per-method default; return (ok, message) checks of the method's options."""
    method, given = METHODS[args.method], args.importance
    args.importance = given or method.default_importance()
    accepted = tuple(SCORES) if method.importances is None else method.importances
    return [
        (given is None or given in accepted,
         f"--method {args.method} takes no --importance" if not accepted else
         f"--method {args.method} takes --importance {' or '.join(accepted)}, not {given}"),
        (args.scenario in method.scenarios or (args.scenario == "class_il" and args.task_inference != "heads"
                                               and method.infers_tasks(args)),
         f"--method {args.method} supports --scenario {' or '.join(method.scenarios)} only, not {args.scenario}"
         + (" (class_il only with a --task-inference rule other than heads)" if method.task_inference else "")),
        (args.capacity_rate is None or (args.method == "snv" and args.candidates == "free"),
         "--capacity-rate schedules the new neurons of --method snv --candidates free: add --candidates free"),
        (args.reset == "none" or method.resettable,
         f"--reset gxd applies to --method {', '.join(n for n, m in METHODS.items() if m.resettable)}, "
         f"not {args.method}"),
        (args.world_size == 1 or resumable(args.method, args.reset),
         f"--method {args.method}{' with --reset ' + args.reset if args.reset != 'none' else ''} runs in a single "
         "process only: run without torchrun"),
    ]


def resumable(method: str, reset: str) -> bool:
    """Whether a checkpoint holds a run's whole state (--resume continues it, torchrun can run it): the method's
    `resumable`, without --reset (whose resets keep state of their own between tasks)."""
    return METHODS[method].resumable and reset == "none"


def run_name(args: argparse.Namespace) -> str:
    """The default results-folder name of a run: snv, snv-random, eidetic-magnitude, snv+gxd, packnet, snv@marginal, ..."""
    name = args.method
    if args.importance not in (None, METHODS[args.method].default_importance()):
        name += f"-{args.importance}"
    name += "+gxd" if args.reset == "gxd" else ""
    return name + (f"@{args.task_inference}" if args.task_inference != "heads" else "")
