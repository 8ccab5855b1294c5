"""Shapley Neuron Valuation: V(S), exact and Monte Carlo Shapley values, top-k selection, freezing.

Notation (the paper's): N neurons (players); V(S) = validation accuracy of the trained network with
every neuron outside S replaced by its mean activation mu_i; phi_i = Shapley value of neuron i;
tau = truncation threshold; alpha = bandit confidence (z_alpha); c = capacity, k = floor(c N);
S_t = top-k neurons of task t; B_t = B_{t-1} U S_t = the cumulative frozen mask.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm import tqdm

from models import MLP, ContinualNet, NeuronBatchNorm2d, NeuronGate

SHAPLEY_IMPLS = ("fast", "naive", "incremental")
"""MaskedAccuracy's evaluators of V(S) (the first is the default)."""

FAST_CHUNK = 32
"""The fast V(S) evaluator's largest chunk of coalitions (run together, stage by stage)."""

ValueFn = Callable[[Tensor], Tensor]
"""V: coalitions as keep-masks [K, N] bool -> values [K] float64."""


def reuse_freed_memory() -> None:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS.

    The fast evaluator allocates megabyte-sized temporaries for every chunk of coalitions; with
    glibc's defaults each one is mmapped and page-faulted anew, which doubled its CPU time (half of
    it in the kernel). A no-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


@torch.no_grad()
def _captured(model: ContinualNet, batches: Iterable[tuple[Tensor, Tensor]], what: str,
              per_gate: Callable[[NeuronGate], Tensor]) -> Tensor:
    """[N]: `per_gate` of every gate after an eval-mode pass over `batches` under model.capturing()."""
    model.eval()
    with model.capturing() as gates:
        for x, _ in batches:
            model.features(x)
        if gates[0].count == 0:
            raise ValueError(f"{what} got no data: the split is empty")
        return torch.cat([per_gate(g) for g in gates])


def mean_activations(model: ContinualNet, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """mu: [N], each neuron's mean output (over batch, and H x W for a filter), in eval mode."""
    return _captured(model, batches, "mean_activations", lambda g: g.sums / g.count).float()


def silent_units(model: ContinualNet, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """[N] bool: neurons whose output is never positive on these inputs (at any position of a filter), in eval mode.

    In the MLP the gate is the ReLU's input, so these are the ReLUs that never fire: from these inputs no
    gradient reaches them or anything before them. In the ResNet this holds for each block's conv1; conv2 and
    the shortcut are summed before their ReLU.
    """
    return _captured(model, batches, "silent_units", lambda g: g.maxes <= 0)


@torch.no_grad()
def coalition_bytes(model: ContinualNet, x: Tensor) -> int:
    """Bytes of one coalition's activations on the evaluation set x [E, ...] at the model's widest stage: E times
    the largest per-image output of a stage half (stage_in or stage_out), measured on one probe image in eval
    mode, at x's element size."""
    was_training = model.training
    model.eval()
    widest, h = 0, x[:1]
    for s in range(len(model.stage_layers)):
        z = model.stage_in(s, h)
        h = model.stage_out(s, z)
        widest = max(widest, z.numel(), h.numel())
    model.train(was_training)
    return x.shape[0] * widest * x.element_size()


def fast_chunk(model: ContinualNet, x: Tensor, memory_gb: float, cap: int) -> int:
    """How many coalitions the fast V(S) evaluator runs at once: as many as `memory_gb` GiB hold activations of
    (coalition_bytes each), at least 1 and at most `cap`. The budget bounds one copy of the widest stage's
    activations; the stage's temporaries take a few times that at the peak."""
    if math.isinf(memory_gb):
        return cap
    return max(1, min(cap, int(memory_gb * 2 ** 30 // coalition_bytes(model, x))))


class MaskedAccuracy:
    """V(S) = accuracy of head `task` on a fixed evaluation set x [E, ...], y [E], neurons outside S = mu.

    impl="naive": one forward pass of the whole network per coalition (the reference).
    impl="fast": `chunk` coalitions at a time, stage by stage, recomputing an image's activations
    only where they can differ from the previous coalition's (see `_fast`). Consecutive coalitions
    of an ordering differ by one neuron, which changes the activations of only some images (in the
    MLP, those where its ReLU output differs from relu(mu_i)); the other images reuse the previous
    coalition's activations. Same values as naive.
    impl="incremental" (MLP with 2 or more hidden layers; other models raise ValueError): the K coalitions of a
    call in order, each from the previous one (see `_IncrementalMLP`). The second layer's pre-activations are
    naive's own (one batched F.linear over the images whose first-layer output changed); above it, a neuron
    joining or leaving S moves the next layer by a rank-t term on the images whose output changed, and the
    layers above are recomputed for those images from the members of S only. With B a rigorous bound on
    |naive's float32 logits - ours| (both roundings, gamma_{n+2} (|W| |h| + |b|) per layer, carried through |W|
    and the members of S), an image with label y counts as correct where z_L[y] - B[y] > z_L[c] + B[c] for every
    c != y, as wrong where z_L[c] - B[c] > z_L[y] + B[y] for some c; the others run naive's forward (`recomputed`
    counts them). So V(S) equals naive's exactly, ties included (a tie has margin 0 < 2B).
    `groups_in[s]`, `groups_out[s]` count the images each half of stage s ran for, in units of E (fast).
    The fast evaluator's chunk is `chunk` coalitions, fewer where `memory_gb` would not hold that many
    coalitions' activations of the widest stage (see `fast_chunk`).
    """

    def __init__(self, model: ContinualNet, task: int, x: Tensor, y: Tensor, mu: Tensor,
                 impl: str = "fast", chunk: int = FAST_CHUNK, memory_gb: float = math.inf) -> None:
        if impl not in SHAPLEY_IMPLS:
            raise ValueError(f"unknown Shapley implementation {impl!r}: use one of {', '.join(SHAPLEY_IMPLS)}")
        if impl == "incremental" and not (isinstance(model, MLP) and len(model.linears) >= 2):
            raise ValueError(f"the incremental Shapley evaluator supports the MLP (2 or more hidden layers) only, not "
                             f"this {type(model).__name__}: use --shapley-impl fast")
        self.model, self.task, self.x, self.y, self.mu = model, task, x, y, mu
        self.impl, self.chunk = impl, fast_chunk(model, x, memory_gb, chunk)
        self.evaluations = 0
        self.recomputed = 0
        self.mu_layers = model.split_neurons(mu)
        self.groups_in = [0.0] * len(model.stage_layers)
        self.groups_out = [0.0] * len(model.stage_layers)

    @torch.no_grad()
    def __call__(self, keeps: Tensor) -> Tensor:
        """keeps: [K, N] bool -> V: [K] float64 (fraction correct)."""
        self.model.eval()
        self.evaluations += keeps.shape[0]
        keeps = keeps.to(self.mu.device)
        if self.impl == "naive":
            return torch.stack([self._naive(keep) for keep in keeps]).cpu()
        if self.impl == "incremental":
            inc = _IncrementalMLP(self, keeps)
            values = inc.run()
            self.recomputed += inc.recomputed
            return values.cpu()
        z0 = self.model.stage_in(0, self.x)  # depends on no gate: shared by all chunks
        self.groups_in[0] += 1
        return torch.cat([self._fast(block, z0) for block in torch.split(keeps, self.chunk)]).cpu()

    def _naive(self, keep: Tensor) -> Tensor:
        """One coalition [N], one forward pass."""
        with self.model.gated(keep, self.mu):
            return (self.model(self.x, self.task).argmax(1) == self.y).double().mean()

    def _fast(self, keeps: Tensor, z0: Tensor) -> Tensor:
        """K coalitions [K, N] through the staged network (z0 [E, ...] = `stage_in(0, x)`), each
        image recomputed only where its activations change.

        After each stage, the activations of every (coalition k, image b) are stored once per
        distinct row: h [M, ...] holds the rows, `rows` [K, E] the row of h of each (k, b), and
        `image` [M] each row's image. Stage s's `stage_in` runs once per row of h. Its `stage_out`
        runs for all of coalition 0 and, for k > 0, for the images whose input row or whose gates
        of stage s differ from coalition k - 1's; where only the gates differ, an output row
        bitwise equal to coalition k - 1's is dropped and (k, b) points to that row instead (not
        after the last stage, where the head costs less than the comparison).
        Exact: in eval mode every operation of a stage (matrix multiply, convolution, BatchNorm,
        gate, ReLU, pooling) computes an image's output from that image's input alone, so equal
        input rows give bitwise-equal outputs. Every batch holds coalition 0's E images, so BLAS
        runs no batch smaller than the naive pass's (MKL computes batches of 1 to 3 rows in another
        summation order: with E < 4 the two paths may differ in the last bits of the logits).
        """
        model, e = self.model, self.x.shape[0]
        last = len(model.stage_layers) - 1
        layer_keeps = model.split_neurons(keeps)
        image = torch.arange(e, device=keeps.device)
        rows, z = image.expand(keeps.shape[0], e), z0
        for s, layers in enumerate(model.stage_layers):
            new_input = torch.ones_like(rows, dtype=torch.bool)
            new_input[1:] = rows[1:] != rows[:-1]
            new_gates = torch.zeros_like(new_input[:, :1])
            new_gates[0] = True
            for l in layers:
                new_gates[1:] |= (layer_keeps[l][1:] != layer_keeps[l][:-1]).any(1, keepdim=True)
            fresh = new_input | new_gates
            # the one host sync of a stage's recomputation: its size is data-dependent (the sparsity is the speed)
            coalition, image = fresh.nonzero().unbind(1)
            gates = {l: (layer_keeps[l].index_select(0, coalition), self.mu_layers[l]) for l in layers}
            with model.gated_layers(gates):
                h = model.stage_out(s, z.index_select(0, rows[coalition, image]))
            self.groups_out[s] += h.shape[0] / e
            rows = self._latest(fresh)
            if s < last:
                h, rows, image = self._drop_unchanged(h, rows, fresh, ~new_input[fresh], coalition, image)
                z = model.stage_in(s + 1, h)
                self.groups_in[s + 1] += z.shape[0] / e
        pred = model.heads[self.task](model.pool(h)).argmax(1)
        return (pred == self.y[image])[rows].double().mean(1)

    @staticmethod
    def _drop_unchanged(h: Tensor, rows: Tensor, fresh: Tensor, same_input: Tensor, coalition: Tensor,
                        image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Drop the rows of h that are bitwise equal to the previous coalition's.

        h [M', ...] holds the (coalition, image) pairs [M'] where `fresh` [K, E] is set, in
        row-major order, and `rows` [K, E] = `_latest(fresh)`. A pair is dropped where `same_input`
        [M'] (input row as the previous coalition's, gates not) and its row equals its predecessor's
        (a changed input row practically never gives an unchanged output): a masked comparison of
        every row (coalition 0's with itself, masked out), so only the compaction waits for the host.
        Returns h, rows and image [M] without the dropped rows; a dropped pair points to its
        predecessor's row.
        """
        prev = rows[(coalition - 1).clamp(min=0), image]
        kept = ~(same_input & MaskedAccuracy._bitwise_equal_rows(h, h.index_select(0, prev)))
        # compacting h is the saving (stage_in runs on the kept rows only): its size is data-dependent
        keep = kept.nonzero().squeeze(1)
        if keep.numel() == image.numel():
            return h, rows, image
        still_fresh = torch.zeros_like(fresh)
        still_fresh[coalition, image] = kept
        return h.index_select(0, keep), MaskedAccuracy._latest(still_fresh), image.index_select(0, keep)

    @staticmethod
    def _latest(fresh: Tensor) -> Tensor:
        """fresh [K, E] (row 0 all set) -> [K, E]: for each entry, the rank (among set entries,
        row-major) of the latest set entry at or above it in its column."""
        rank = fresh.flatten().cumsum(0).view_as(fresh) - 1
        return torch.where(fresh, rank, -1).cummax(0).values

    @staticmethod
    def _bitwise_equal_rows(a: Tensor, b: Tensor) -> Tensor:
        """a, b [M, ...] -> [M] bool: whether row m of a has the same bits as row m of b (so 0.0 != -0.0)."""
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        diff = (a.view(bits) ^ b.view(bits)).flatten(1)
        return (diff.amax(1) == 0) & (diff.amin(1) == 0)


def _gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): |fl(sum of n products) - exact| <= gamma_n * (sum of their magnitudes), any order."""
    return n * u / (1 - n * u)


U32 = 2.0 ** -24
UP = 1 + 2.0 ** -10  # inflation of a float32 sum of nonnegative terms (its relative error is far below)


class _IncrementalMLP:
    """The incremental evaluator over one block of coalitions keeps [K, N] of an MLP (see MaskedAccuracy).

    Layers: hidden l = 0..L-1 with pre-activations z_l [E, n_l] and outputs h_l = relu(where(keep_l, z_l, mu_l));
    linear l computes z_l from h_{l-1}; linear L (the head) the logits z_L [E, C]. z_0 and z_1 are naive's own
    float32 values, bit for bit (z_0 depends on no gate; z_1 comes from the F.linear call naive makes, on
    rows of h_0). For 2 <= l < L the state is `state[l]` = [z_l | b_l] [E, n_l + C]: our float32 z_l and b_l >= 0,
    the part of the bound on |naive's logits - ours| that layers 2..l contribute (see below); [z_L | B] is kept
    only for the images each coalition changes (`records`).

    Per coalition k, the first layer m with a toggled neuron decides the work, on the images R whose h_m changed:
    m = 0: z_1[R] = naive's rows; 1 <= m < L-1 with only layer m toggled (at most MAX_RANK neurons): a rank-t
    update z_{m+1}[R] += (h_new - h_old)[R, t] w_{m+1}[:, t]^T (the head is cheaper to recompute); a layer toggled
    above m: all images from there on. Every layer above is recomputed on R
    from the members M of the layer below only: z_{l+1} = relu(z_l[R, M]) w_{l+1}[:, M]^T + (w_{l+1}[:, ~M]
    relu(mu)[~M] + b), which costs |R| |M| n instead of E N n. Then image b with label y is surely correct when
    z_L[y] - B[y] > z_L[c] + B[c] for every c != y, surely wrong when z_L[c] - B[c] > z_L[y] + B[y] for some c
    (V needs no more); the other images (`recomputed`) run naive's forward.

    The bound, for the coalitions of a window of WINDOW (P_l is taken for their union U; it only grows with S):
    B = sum_{l=2..L} P_l e_l with P_L = I, P_{l-1} = P_l |w_l| D_{l-1}(U) (D: diag of U's members; a non-member
    outputs relu(mu) in both, a member is 1-Lipschitz), e_l >= |naive's z_l - ours| at layer l given the same
    h_{l-1}. Naive's float32 product is within gamma_{n+1} (|w_l| |h^_{l-1}| + |b_l|) of exact (u = 2^-24, gamma_n
    = n u / (1 - n u)), with |h^| <= h + D delta_{l-1} (delta: an a priori bound of |naive's z - ours| per
    neuron); ours, the members' product plus a float32 constant, within gamma_{n+2} (|w_l| h_{l-1} + |b_l|). So
    b_l = b_{l-1} + c_l Q_l h_{l-1}, Q_l = P_l |w_l|, c_l = 2 gamma_{n+2} + T_l u, computed in the same product as
    z_l (the rows [w_l; c_l Q_l] and, for l > 2, an identity that carries b_{l-1}); a rank update adds
    c_l Q_l[:, t] |d| + gamma_{2t+2} |d| max|w| P_l 1 for h_{l-1} changed by d = h_new - h_old at neurons t: z_old
    plus t products d w, summed in any order, is within t u |z_new| + gamma_{2t+2} |d| max|w| of exact (to first
    order; t <= MAX_RANK). T_l u pays the first term: T_l is the number of neurons the window's rank updates into
    z_l toggle, and over a row's updates since its z_l was last recomputed from h^0 (h >= 0, so each h <= h^0 +
    the |d| so far; |z| <= |w_l| h + |b_l|), sum t u P_l |z_new| <= T_l u (Q_l h^0 + Q_l sum |d| + P_l |b_l|).
    Constants (biases, the second-order delta terms) are added at the head. Every term is a float32 sum of
    nonnegative numbers, inflated by 2^-10 per layer.
    """

    WINDOW = 64  # coalitions sharing one P (see above)
    MAX_RANK = 8  # at most this many neurons toggled in one layer take the rank update
    GROUP = 1024  # rows per F.linear of naive's z_1 and per batch of the exact path (larger ones leave the cache)

    def __init__(self, acc: MaskedAccuracy, keeps: Tensor) -> None:
        model, head = acc.model, acc.model.heads[acc.task]
        self.acc, self.keeps, self.depth = acc, keeps, len(model.linears)
        self.w = [lin.weight for lin in model.linears] + [head.weight]
        self.b = [lin.bias for lin in model.linears] + [head.bias]
        self.abs_w = [w.abs() for w in self.w]
        self.wmax = [w.amax(0) for w in self.abs_w]  # [n_{l-1}]: max_j |w_l[j, i]|
        self.n = [w.shape[0] for w in self.w]
        self.classes = self.n[-1]
        self.mu = [torch.relu(m) for m in acc.mu_layers]  # a non-member's output
        self.layer_keeps = model.split_neurons(keeps)
        # the columns of state[l] (l >= 2): the C columns of b_l are always read, as members whose mu is 0
        self.mu_ext = [m if l < 2 else torch.cat([m, m.new_zeros(self.classes)]) for l, m in enumerate(self.mu)]
        ext = torch.ones(keeps.shape[0], self.classes, dtype=torch.bool, device=keeps.device)
        self.keep_ext = [lk if l < 2 else torch.cat([lk, ext], 1) for l, lk in enumerate(self.layer_keeps)]
        self.g = [_gamma(w.shape[1] + 2, U32) for w in self.w]
        self.rank_gamma = _gamma(2 * self.MAX_RANK + 2, U32)
        self.z0 = model.stage_in(0, acc.x)
        self.e, dev = acc.x.shape[0], keeps.device
        self.all = torch.arange(self.e, device=dev)
        self.state = [None, None] + [torch.empty(self.e, n + self.classes, device=dev) for n in self.n[2:-1]]
        # the products' rows [w_l; c_l Q_l (; carry)]^T and the rank updates' rows: start_window writes the
        # bound columns, the rest is the same for every window
        self.wq_t = [None, None] + [torch.zeros(self.n[l - 1] + self.classes * (l > 2), self.n[l] + self.classes,
                                                device=dev) for l in range(2, self.depth + 1)]
        self.rank_w = [None, None] + [torch.zeros(self.n[l - 1], 2, self.n[l] + self.classes, device=dev)
                                      for l in range(2, self.depth)]
        for l in range(2, self.depth + 1):
            self.wq_t[l][:self.n[l - 1], :self.n[l]] = self.w[l].T
            if l > 2:
                self.wq_t[l][self.n[l - 1]:, self.n[l]:] = torch.eye(self.classes, device=dev)
            if l < self.depth:
                self.rank_w[l][:, 0, :self.n[l]] = self.w[l].T
        self.bias = [None, None] + [torch.cat([self.b[l], self.b[l].new_zeros(self.classes)])
                                    for l in range(2, self.depth + 1)]
        self.z = [self.z0, None] + [s[:, :n] for s, n in zip(self.state[2:], self.n[2:-1])]
        self.schedule()
        self.delta = self.a_priori_deltas()
        self.cache: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * self.depth
        self.records: list[tuple[int, Tensor, Tensor]] = []
        self.recomputed = 0

    def schedule(self) -> None:
        """Per coalition k: `first[k]` (the first layer with a toggled neuron; depth if none), `toggled[k]` (its
        layers), where a neuron toggles `local[k]` = (the toggled neurons t of layer m = first[k], +1 where t joins
        and -1 where it leaves, relu(mu)[t]), `rank[k]` (whether k takes a rank update: 1 <= m < L-1, only layer m
        toggled, t <= MAX_RANK), `window_toggles[w][l]` (the neurons window w's rank updates into z_l toggle,
        l <= L) and `rank_toggles[l]` (their most over the windows)."""
        k_count, dev = self.keeps.shape[0], self.keeps.device
        coalition, neuron = (self.keeps[1:] != self.keeps[:-1]).nonzero().unbind(1)
        coalition = coalition + 1
        offsets = torch.tensor([0] + self.n[:-1], device=dev).cumsum(0)
        layer = torch.bucketize(neuron, offsets[1:], right=True)
        first = torch.full((k_count,), self.depth, dtype=torch.long, device=dev)
        first.scatter_reduce_(0, coalition, layer, "amin")
        self.first = first.tolist()
        counts = torch.bincount(coalition, minlength=k_count).tolist()
        self.toggled = [set(ls.tolist()) for ls in torch.split(layer, counts)]
        in_first = layer == first[coalition]  # the toggles of each coalition's first toggled layer
        coalition, neuron, layer = coalition[in_first], neuron[in_first], layer[in_first]
        parts = (neuron - offsets[layer], self.keeps[coalition, neuron] * 2.0 - 1.0, torch.cat(self.mu)[neuron])
        local_counts = torch.bincount(coalition, minlength=k_count).tolist()
        split = zip(*(x.split(local_counts) for x in parts))
        self.local = [None if m == self.depth else p for m, p in zip(self.first, split)]
        self.rank = [0 < m < self.depth - 1 and k % self.WINDOW > 0 and len(self.toggled[k]) == 1
                     and self.local[k][0].numel() <= self.MAX_RANK for k, m in enumerate(self.first)]
        windows = self.window_toggles = [[0] * (self.depth + 1) for _ in range(0, k_count, self.WINDOW)]
        for k in range(k_count):
            if self.rank[k]:
                windows[k // self.WINDOW][self.first[k] + 1] += self.local[k][0].numel()
        self.rank_toggles = [max(w[l] for w in windows) for l in range(self.depth)]

    def a_priori_deltas(self) -> list[Tensor]:
        """delta_l [n_l] >= |naive's z_l - ours| per neuron, for every image and coalition of the block (delta_0 =
        delta_1 = 0), from |z_l| <= z_bound_l = 2 (|w_l| h_bound_{l-1} + |b_l|), h_bound = max(z_bound, relu(mu)) per
        neuron, and the rounding of a window's rank updates: the second-order term of the bound."""
        z_bound = self.z0.abs().amax(0)
        out = [z_bound.new_zeros(n) for n in self.n[:2]]
        for l in range(1, self.depth):
            h_bound = torch.maximum(z_bound, self.mu[l - 1])
            b = self.b[l].abs()
            z_bound = 2 * (self.abs_w[l] @ h_bound + b) * UP
            if l >= 2:
                ranks = self.rank_toggles[l] * (self.rank_gamma * 2 * (self.abs_w[l] * h_bound).amax(1) + U32 * z_bound)
                out.append((self.abs_w[l] @ out[-1] + 2 * self.g[l] * (self.abs_w[l] @ (h_bound + out[-1]) + b)
                            + ranks) * UP * UP)
        return out

    def naive_z1(self) -> None:
        """Naive's z_1 rows for every coalition where h_0 changes (`rows1[k]`, None where it does not), from F.linear
        on batches of GROUP or more rows (at least E: coalition 0's E rows, or padding; with E < 4 one call per
        coalition on its E rows, as BLAS sums batches of 1 to 3 rows in another order)."""
        lin, e = self.acc.model.linears[1], self.e
        h0 = torch.relu(self.z0)
        h = torch.where(self.layer_keeps[0][0], h0, self.mu[0])
        batch = torch.empty(max(self.GROUP, e) + e, h.shape[1], device=h.device)  # rows queued for F.linear
        batch[:e] = h
        self.rows1, out, sizes = [self.all], [], [e]

        def flush() -> None:
            queued = sum(sizes)
            if queued < e:
                batch[queued:e] = h[:e - queued]
            out.extend(lin(batch[:max(queued, e)])[:queued].split(sizes))
            sizes.clear()

        if e < 4:
            flush()
        for k in range(1, self.keeps.shape[0]):
            if self.first[k] != 0:
                self.rows1.append(None)
                continue
            t, sign, mu = self.local[k]
            col = torch.where(sign > 0, h0.index_select(1, t), mu)
            rows = self.all if e < 4 else (col != h.index_select(1, t)).any(1).nonzero().squeeze(1)
            h.index_copy_(1, t, col)
            self.rows1.append(rows)
            queued = sum(sizes)
            torch.index_select(h, 0, rows, out=batch[queued:queued + rows.numel()])
            sizes.append(rows.numel())
            if e < 4 or queued + rows.numel() >= self.GROUP:
                flush()
        if sizes:
            flush()
        self.z1_rows = iter(out)

    def start_window(self, k: int) -> Tensor:
        """For coalitions k..k+WINDOW-1: P, the bound columns c_l Q_l^T of the product rows and the rank updates'
        rows, and the head's constant bound terms; every layer recomputed for coalition k. Returns its logits | bound
        [E, 2C]."""
        hi, dev = min(k + self.WINDOW, self.keeps.shape[0]), self.keeps.device
        union = [lk[k:hi].any(0).float() for lk in self.layer_keeps]
        prop = torch.eye(self.classes, device=dev)
        const = torch.zeros(self.classes, device=dev)
        for l in range(self.depth, 1, -1):
            q = prop @ self.abs_w[l] * UP
            coef = 2 * self.g[l] + U32 * self.window_toggles[k // self.WINDOW][l]  # c_l
            bound_rows = q.T * (coef * UP)  # [n_{l-1}, C]
            self.wq_t[l][:self.n[l - 1], self.n[l]:] = bound_rows
            if l < self.depth:  # per neuron of layer l-1: [w^T | 0] and [0 | c_l Q^T + gamma max|w| P_l 1]
                p1 = prop.sum(1) * UP
                self.rank_w[l][:, 1, self.n[l]:] = bound_rows + self.rank_gamma * UP * self.wmax[l].unsqueeze(1) * p1
            const += (coef * (prop @ self.b[l].abs()) + self.g[l] * (q @ (union[l - 1] * self.delta[l - 1]))) * UP
            prop = q * union[l - 1]
        self.bias[self.depth][self.classes:] = const * UP
        self.cache = [None] * self.depth
        for l in range(1, self.depth):
            out = self.fresh(l, k, self.all)
        return out

    def weights(self, l: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """For layer l's members M at coalition k: (M, and for l >= 2 the b_l columns; the product's rows for them
        [|M| (+C), n_{l+1} + C]; its constant: the non-members' relu(mu) times their rows, plus the bias)."""
        if self.cache[l] is None:
            keep = self.keep_ext[l][k]
            const = torch.addmv(self.bias[l + 1], self.wq_t[l + 1].T, self.mu_ext[l].masked_fill(keep, 0.0))
            cols = keep.nonzero().squeeze(1)
            self.cache[l] = (cols, self.wq_t[l + 1].index_select(0, cols), const)
        return self.cache[l]

    def fresh(self, l: int, k: int, rows: Tensor, src: Tensor | None = None) -> Tensor:
        """state[l+1][rows] = relu(z_l | b_l)[rows, M] [w; c Q; carry][:, M]^T + constant (in place where rows are
        all E); src: state[l][rows] where the caller has it. Returns state[l+1][rows] (for l = L-1: [z_L | B][rows],
        kept in no state)."""
        cols, rows_w, const = self.weights(l, k)
        if src is None:
            src = self.state[l] if l > 1 else self.z[1]
            src = src if rows.numel() == self.e else src.index_select(0, rows)
        kept, whole = l + 1 < self.depth, rows.numel() == self.e
        out = torch.addmm(const, src.index_select(1, cols).relu_(), rows_w,
                          out=self.state[l + 1] if kept and whole else None)
        if kept and not whole:
            self.state[l + 1].index_copy_(0, rows, out)
        return out

    def rank_update(self, m: int, t: Tensor, d: Tensor, rows: Tensor) -> Tensor:
        """state[m+1][rows] += d [w; 0][:, t]^T + |d| [0; c Q + own][:, t]^T for h_m changed by d [R, t] at neurons t
        (`rank_w`; own: the gamma |d| max|w| part of the update's own rounding), in place where rows are all E.
        Returns state[m+1][rows]."""
        whole = rows.numel() == self.e
        s = self.state[m + 1] if whole else self.state[m + 1].index_select(0, rows)
        s.addmm_(torch.stack([d, d.abs()], 2).flatten(1), self.rank_w[m + 1].index_select(0, t).flatten(0, 1))
        if not whole:
            self.state[m + 1].index_copy_(0, rows, s)
        return s

    def step(self, k: int, z1: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Move the state from coalition k-1 to k (z1: naive's z_1 rows of k where h_0 changed, already in z_1);
        returns the images R whose logits or bound changed and their logits | bound (None if none did)."""
        first = m = self.first[k]
        src = None
        if m == self.depth:
            return None
        if m == 0:
            rows, m, src = self.rows1[k], 1, z1
        else:
            t, sign, mu = self.local[k]
            d = self.z[m][:, t].relu_().sub_(mu).mul_(sign)  # h_new - h_old (0 exactly where unchanged)
            rows = d.any(1).nonzero().squeeze(1)
            if self.rank[k]:
                self.cache[m] = None
                if rows.numel() == 0:
                    return None
                src = self.rank_update(m, t, d.index_select(0, rows), rows)
                m += 1
        for l in range(m, self.depth):
            if l in self.toggled[k]:
                self.cache[l] = None
                if l > first:
                    rows, src = self.all, None
            if rows.numel():
                src = self.fresh(l, k, rows, src)
        return (rows, src) if rows.numel() else None

    def run(self) -> Tensor:
        """V [K] float64."""
        self.naive_z1()
        for k in range(self.keeps.shape[0]):
            z1 = None
            if k == 0:
                self.z[1] = next(self.z1_rows).clone()
            elif self.rows1[k] is not None:
                z1 = next(self.z1_rows)
                self.z[1].index_copy_(0, self.rows1[k], z1)
            if k % self.WINDOW == 0:
                self.records.append((k, self.all, self.start_window(k)))
            elif (changed := self.step(k, z1)) is not None:
                self.records.append((k, *changed))
        self.decide()
        self.exact()
        return (self.pred == self.acc.y.unsqueeze(1)).double().mean(0)

    def decide(self) -> None:
        """pred [E, K], from each image's latest re-decision: its label where naive's argmax is surely the label, -2
        where it is surely another class (some class's lowest logit exceeds the label's highest; which class wins
        does not change V), else -1 (for `exact`)."""
        rows = torch.cat([r for _, r, _ in self.records])
        coalition = torch.repeat_interleave(torch.tensor([k for k, _, _ in self.records], device=rows.device),
                                            torch.tensor([r.numel() for _, r, _ in self.records], device=rows.device))
        last = torch.cat([s for _, _, s in self.records])
        logits, bound = last[:, :self.classes], last[:, self.classes:]  # bound: B / UP
        y = self.acc.y[rows]
        label = y.clamp(0, self.classes - 1)  # a label outside the head is never the argmax: wrong (below)
        index = label.unsqueeze(1)
        high = torch.add(logits, bound, alpha=UP)  # float32: within u |.| of exact
        label_logit, label_bound = logits.gather(1, index).squeeze(1), bound.gather(1, index).squeeze(1)
        label_low = torch.add(label_logit, label_bound, alpha=-UP).double()
        other_high = high.scatter_(1, index, -math.inf).amax(1).double()
        verdict = torch.where(label_low > other_high + 2 * U32 * (label_low.abs() + other_high.abs()), label, -1)
        rest = (verdict == -1).nonzero().squeeze(1)  # not surely correct: surely wrong?
        label_high = torch.add(label_logit[rest], label_bound[rest], alpha=UP).double()
        other_low = torch.add(logits[rest], bound[rest], alpha=-UP).scatter_(1, index[rest], -math.inf)
        other_low = other_low.amax(1).double()
        verdict[rest] = torch.where(other_low > label_high + 2 * U32 * (other_low.abs() + label_high.abs()), -2, -1)
        verdict.masked_fill_(label != y, -2)
        k_count = self.keeps.shape[0]
        event = torch.zeros(self.e, k_count, dtype=torch.bool, device=rows.device)
        event[rows, coalition] = True
        value = torch.full((self.e, k_count), -1, dtype=torch.long, device=rows.device)
        value[rows, coalition] = verdict
        latest = torch.where(event, torch.arange(k_count, device=rows.device), 0).cummax(1).values
        self.pred = value.gather(1, latest)

    @torch.no_grad()
    def exact(self) -> None:
        """Naive's forward for the undecided (coalition, image) pairs, batched (at least E rows per batch, as in the
        fast path); with E < 4, whole naive passes."""
        acc, model = self.acc, self.acc.model
        image, coalition = (self.pred == -1).nonzero().unbind(1)
        if coalition.numel() == 0:
            return
        self.recomputed += coalition.numel()
        if self.e < 4:
            for k in coalition.unique().tolist():
                with model.gated(self.keeps[k], acc.mu):
                    self.pred[:, k] = model(acc.x, acc.task).argmax(1)
            return
        for c, i in zip(torch.split(coalition, self.GROUP), torch.split(image, self.GROUP)):
            m = c.numel()
            pad = torch.arange(max(self.e - m, 0), device=c.device) % m
            c_all, i_all = torch.cat([c, c[pad]]), torch.cat([i, i[pad]])
            h = self.z0.index_select(0, i_all)
            layer_keeps = model.split_neurons(self.keeps.index_select(0, c_all))
            for s in range(self.depth):
                z = h if s == 0 else model.stage_in(s, h)
                with model.gated_layers({s: (layer_keeps[s], acc.mu_layers[s])}):
                    h = model.stage_out(s, z)
            self.pred[i, c] = model.heads[acc.task](model.pool(h))[:m].argmax(1)


def exact_shapley(v: ValueFn, n: int) -> Tensor:
    """Eq. 5 by enumeration: phi_i = sum_{S in M minus i} |S|!(N-|S|-1)!/N! [V(S u {i}) - V(S)]. [N] float64."""
    if n > 20:
        raise ValueError(f"exact Shapley enumerates 2^N coalitions; N={n} is too large (max 20)")
    codes = torch.arange(2 ** n)
    bits = (codes.unsqueeze(1) >> torch.arange(n)) & 1
    values = torch.cat([v(chunk.bool()) for chunk in torch.split(bits, 4096)]).double()
    size = bits.sum(1)
    weight = torch.tensor([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) if s < n else 0.0
                           for s in range(n + 1)], dtype=torch.float64)
    phi = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        without = codes[bits[:, i] == 0]
        phi[i] = (weight[size[without]] * (values[without | (1 << i)] - values[without])).sum()
    return phi


@dataclass
class ShapleyResult:
    """Monte Carlo estimates phi [N] with their sample std and counts n_i, plus the cost of getting them."""

    phi: Tensor
    std: Tensor
    counts: Tensor
    orderings: int
    evaluations: int
    truncated_share: float
    seconds: float
    converged: bool

    def cost(self) -> dict:
        """The JSON-ready cost summary."""
        return {"orderings": self.orderings, "evaluations": self.evaluations,
                "truncated_share": round(self.truncated_share, 6), "seconds": round(self.seconds, 3),
                "converged": self.converged}


class _Marginals:
    """Running sums of recorded marginals per neuron: n_i, mean phi_i, sample std sigma_i."""

    def __init__(self, n: int) -> None:
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.sumsq = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.long)

    def add(self, idx: Tensor, m: Tensor) -> None:
        self.sums.index_add_(0, idx, m)
        self.sumsq.index_add_(0, idx, m * m)
        self.counts.index_add_(0, idx, torch.ones_like(idx))

    def merge(self, other: "_Marginals") -> None:
        self.sums += other.sums
        self.sumsq += other.sumsq
        self.counts += other.counts

    def mean(self) -> Tensor:
        return self.sums / self.counts.clamp(min=1)

    def std(self) -> Tensor:
        n = self.counts.double()
        var = (self.sumsq - n * self.mean() ** 2) / (n - 1).clamp(min=1)
        return var.clamp(min=0).sqrt()

    def active(self, k: int, radius: Tensor, threshold: str = "kth") -> Tensor:
        """Bandit active set A = {i : |phi_i - phi^(k)| < delta_i}; delta_i = inf where n_i < 2. [N] bool.

        threshold="kth": phi^(k) is the k-th largest estimate (the paper; that neuron itself never
        leaves A while sigma > 0). "midpoint": halfway between the k-th and (k+1)-th largest.
        """
        phi = self.mean()
        top = phi.topk(min(k + 1, phi.numel())).values
        phi_k = top[k - 1] if threshold == "kth" or k == phi.numel() else (top[k - 1] + top[k]) / 2
        radius = torch.where(self.counts < 2, torch.full_like(radius, math.inf), radius)
        return (phi - phi_k).abs() < radius

    def result(self, **cost) -> ShapleyResult:
        return ShapleyResult(self.mean(), self.std(), self.counts.clone(), **cost)


def z_value(alpha: float) -> float:
    """z_alpha, the two-sided normal quantile: 1.96 for alpha = 0.95."""
    if not 0 < alpha < 1:
        raise ValueError(f"confidence alpha must be in (0, 1), got {alpha}")
    return statistics.NormalDist().inv_cdf(1 - (1 - alpha) / 2)


def _evaluate(v: ValueFn, keeps: Tensor, chunk: int) -> Tensor:
    """V for many coalitions, `chunk` at a time. [K] float64."""
    if keeps.shape[0] == 0:
        return torch.empty(0, dtype=torch.float64)
    return torch.cat([v(block) for block in torch.split(keeps, chunk)]).double().cpu()


def _walk(v: ValueFn, pi: Tensor, active: Tensor, tau: float, v_empty: float, v_full: float, chunk: int,
          marg: _Marginals) -> tuple[int, int, int]:
    """One forward ordering pi [N]: record the marginals of active neurons in `marg`.

    Only the values V(S_p) that an active neuron's marginal needs are computed; a marginal whose
    base V(S) <= tau is truncated. Returns (evaluations, recorded, truncated).
    """
    n = pi.numel()
    act = active[pi]
    need = torch.zeros(n + 1, dtype=torch.bool)
    need[1:n] = act[:-1] | act[1:]
    pos = need.nonzero().squeeze(1)
    values = torch.full((n + 1,), math.nan, dtype=torch.float64)
    values[0], values[n] = v_empty, v_full
    keeps = torch.arange(n).unsqueeze(0) < pos.unsqueeze(1)
    values[pos] = _evaluate(v, keeps[:, pi.argsort()], chunk)
    steps = act.nonzero().squeeze(1)
    base, after = values[steps], values[steps + 1]
    keep = base > tau
    marg.add(pi[steps[keep]], (after - base)[keep])
    return int(pos.numel()), int(keep.sum()), int((~keep).sum())


def permutation_shapley(v: ValueFn, n: int, k: int, *, tau: float = 0.1, alpha: float = 0.95,
                        min_orderings: int = 5, max_orderings: int = 200, seed: int = 0,
                        antithetic: bool = False, use_bandit: bool = True, threshold: str = "kth",
                        chunk: int = 256, progress: bool = False, orderings: Tensor | None = None,
                        rank: int = 0, world_size: int = 1,
                        all_reduce: Callable[[Tensor], None] | None = None) -> ShapleyResult:
    """SNV's estimator (Eq. 9): phi_i = E_pi[V(S_i^pi u {i}) - V(S_i^pi)], orderings walked forward from {}.

    Truncation: a marginal whose base value V(S) <= tau is skipped (i joins S, nothing is recorded).
    Bandit (after `min_orderings`): delta_i = z_alpha sigma_i / sqrt(n_i); only neurons in
    A = {i : |phi_i - phi^(k)| < delta_i} are evaluated; stop when A is empty or at `max_orderings`.
    threshold: "kth" (the paper's phi^(k)) or "midpoint" (see `_Marginals.active`).
    `orderings` ([M, N], optional) replaces the seeded random orderings; antithetic pairs each
    ordering with its reverse. Distributed: orderings come in rounds of `world_size` (drawn
    identically on every rank); rank r walks the r-th of each round and `all_reduce` (an in-place
    sum over ranks) merges the per-neuron sums and counts, so every rank takes the same bandit
    decisions. With world_size = 1 the bandit is updated after every ordering.
    """
    if not 1 <= k <= n:
        raise ValueError(f"top-k needs 1 <= k <= N, got k={k}, N={n}")
    if threshold not in ("kth", "midpoint"):
        raise ValueError(f"unknown bandit threshold {threshold!r}: use 'kth' or 'midpoint'")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    z = z_value(alpha)
    full = torch.ones(1, n, dtype=torch.bool)
    v_empty, v_full = _evaluate(v, torch.cat([~full, full]), chunk).tolist()
    marg = _Marginals(n)
    stats = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)  # evaluations, recorded, truncated
    active = torch.ones(n, dtype=torch.bool)
    total = max_orderings if orderings is None else orderings.shape[0]
    bar = tqdm(total=total, desc="shapley", disable=not progress, leave=False)
    done, pi = 0, None
    while done < total and bool(active.any()):
        size = min(world_size, total - done)
        local = _Marginals(n)
        local_stats = torch.zeros(3, dtype=torch.float64)
        for r in range(size):
            if orderings is not None:
                pi = orderings[done + r]
            elif antithetic and (done + r) % 2 == 1:
                pi = pi.flip(0)
            else:
                pi = torch.randperm(n, generator=gen)
            if r == rank:
                local_stats += torch.tensor(_walk(v, pi, active, tau, v_empty, v_full, chunk, local), dtype=torch.float64)
        if all_reduce is not None:
            for t in (local.sums, local.sumsq, local.counts, local_stats):
                all_reduce(t)
        marg.merge(local)
        stats += local_stats
        done += size
        if use_bandit and done >= min_orderings:
            active = marg.active(k, z * marg.std() / marg.counts.double().clamp(min=1).sqrt(), threshold)
        bar.update(size)
        bar.set_postfix(active=int(active.sum()))
    bar.close()
    evaluations, recorded, truncated = (int(x) for x in stats.tolist())
    return marg.result(orderings=done, evaluations=evaluations,
                       truncated_share=truncated / max(recorded + truncated, 1),
                       seconds=time.perf_counter() - start, converged=not bool(active.any()))


def neuron_shapley(v: ValueFn, n: int, k: int, *, delta: float = 0.2, tolerance: float = 0.2,
                   patience: int = 6, value_range: float = 1.0, min_orderings: int = 5,
                   max_orderings: int = 200, seed: int = 0, chunk: int = 64,
                   progress: bool = False) -> ShapleyResult:
    """Neuron Shapley's TMAB estimator (Ghorbani & Zou 2020): orderings walked in reverse from the full set.

    Each ordering removes neurons one by one; the walk is truncated once `patience` consecutive
    values lie within `tolerance` of V({}) (the rest get marginal 0). Bandit radius: the empirical
    Bernstein bound sqrt(2 var ln(2/delta)/n) + 7 R ln(2/delta) / (3 (n-1)); as in TMAB-Shapley, a neuron
    leaves the active set once its interval excludes the boundary between the k-th and (k+1)-th largest
    estimates (so a well-separated top k stops the walk before `max_orderings`).
    """
    if not 1 <= k <= n:
        raise ValueError(f"top-k needs 1 <= k <= N, got k={k}, N={n}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    log_term = math.log(2 / delta)
    full = torch.ones(1, n, dtype=torch.bool)
    v_empty, v_full = _evaluate(v, torch.cat([~full, full]), chunk).tolist()
    evaluations, truncated = 2, 0
    marg = _Marginals(n)
    active = torch.ones(n, dtype=torch.bool)
    done = 0
    bar = tqdm(total=max_orderings, desc="neuron-shapley", disable=not progress, leave=False)
    while done < max_orderings and bool(active.any()):
        pi = torch.randperm(n, generator=gen)
        rank = pi.argsort()
        values = torch.full((n + 1,), v_empty, dtype=torch.float64)
        values[0] = v_full
        near, stop = 0, n
        for p in range(1, n, chunk):
            pos = torch.arange(p, min(p + chunk, n))
            vals = _evaluate(v, (torch.arange(n).unsqueeze(0) >= pos.unsqueeze(1))[:, rank], chunk)
            evaluations += int(pos.numel())
            for j, val in zip(pos.tolist(), vals.tolist()):
                values[j] = val
                near = near + 1 if abs(val - v_empty) <= tolerance else 0
                if near >= patience:
                    stop = j
                    break
            if stop < n:
                values[stop:] = values[stop]
                truncated += n - stop
                break
        marg.add(pi, values[:-1] - values[1:])
        done += 1
        if done >= min_orderings:
            cnt = marg.counts.double().clamp(min=2)
            var = marg.std() ** 2
            radius = (2 * var * log_term / cnt).sqrt() + 7 * value_range * log_term / (3 * (cnt - 1))
            active = marg.active(k, radius, "midpoint")
        bar.update(1)
    bar.close()
    return marg.result(orderings=done, evaluations=evaluations, truncated_share=truncated / max(done * n, 1),
                       seconds=time.perf_counter() - start, converged=not bool(active.any()))


def top_k(phi: Tensor, k: int) -> Tensor:
    """S_t: the k neurons with the largest phi (ties to the lower index). [N] bool."""
    order = torch.sort(phi, descending=True, stable=True).indices
    mask = torch.zeros(phi.shape[0], dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def outside(phi: Tensor, frozen: Tensor) -> Tensor:
    """phi with the members of B_{t-1} ranked last (-inf): top-k of it picks new neurons while any are free. [N]"""
    return phi.masked_fill(frozen, float("-inf"))


def layer_quotas(k: int, sizes: list[int]) -> list[int]:
    """k split across layers in proportion to their sizes n_l (largest remainders, ties to the earlier layer)."""
    n = sum(sizes)
    exact = [k * s / n for s in sizes]
    quotas = [math.floor(e) for e in exact]
    for l in sorted(range(len(sizes)), key=lambda l: quotas[l] - exact[l])[:k - sum(quotas)]:
        quotas[l] += 1
    return quotas


def top_k_per_layer(phi: Tensor, k: int, sizes: list[int]) -> Tensor:
    """S_t with layer quotas: k split in proportion to each layer's candidates (its neurons with phi above -inf:
    all n_l, or the free ones after `outside`), and in each layer its quota of neurons with the largest phi. So a
    k of at most the candidates takes only candidates. [N] bool."""
    layers = torch.split(phi, sizes)
    candidates = [int((p > float("-inf")).sum()) for p in layers]
    quotas = layer_quotas(k, candidates if sum(candidates) > 0 else sizes)
    return torch.cat([top_k(p, q) for p, q in zip(layers, quotas)])


def capacity_k(c: float, n: int) -> int:
    """k = floor(c N), at least 1."""
    if not 0 < c <= 1:
        raise ValueError(f"capacity c (--sparsity) must be in (0, 1], got {c}")
    return max(1, math.floor(c * n + 1e-9))


def scheduled_k(rho: float, free: int, tasks_left: int) -> int:
    """k_t = max(floor(rho F_t), floor(F_t / (T - t + 1))): rho of the F_t neurons outside B_{t-1}, and at least an
    equal share of them over the T - t + 1 tasks left, so the last task takes every free neuron."""
    return max(math.floor(rho * free + 1e-9), free // tasks_left)


class Freezer:
    """Keeps everything that belongs to frozen neurons B_t (and to finished heads) bit-identical.

    The paper's update theta <- theta - eta (dL/dtheta * M) zeroes the gradient of each frozen
    neuron's weight row and bias (and its BatchNorm's affine parameters); because weight decay,
    momentum and BatchNorm running statistics would still move them, `step` also restores those
    entries (and the running statistics) from a snapshot after every optimizer step. Within
    `training`, their BatchNorm channels normalise with the frozen running statistics, so that frozen
    neurons compute in training exactly what they compute at test.
    """

    def __init__(self, model: ContinualNet, frozen: Tensor, frozen_heads: int) -> None:
        self.entries: list[tuple[Tensor, Tensor, Tensor]] = []
        self.fixed: list[tuple[NeuronBatchNorm2d, Tensor]] = []
        self.frozen_rows: list[Tensor | None] = []  # per layer: the frozen neurons [n_l] bool, None if none
        for layer, mask in zip(model.layers, model.split_neurons(frozen.to(torch.bool))):
            mask = mask.to(layer.producer.weight.device)
            idx = mask.nonzero().squeeze(1)
            if idx.numel() == 0:
                self.frozen_rows.append(None)
                continue
            self.frozen_rows.append(mask)
            tensors = [layer.producer.weight, layer.producer.bias]
            if layer.bn is not None:
                tensors += [layer.bn.weight, layer.bn.bias, layer.bn.running_mean, layer.bn.running_var]
                self.fixed.append((layer.bn, mask))
            self.entries += [(t, idx, t.detach()[idx].clone()) for t in tensors if t is not None]
        for head in model.heads[:frozen_heads]:
            for p in head.parameters():
                self.entries.append((p, torch.arange(p.shape[0], device=p.device), p.detach().clone()))

    def mask_gradients(self) -> None:
        """dL/dtheta * M: zero the gradients of frozen entries."""
        for t, idx, _ in self.entries:
            if isinstance(t, nn.Parameter) and t.grad is not None:
                t.grad.index_fill_(0, idx, 0.0)

    @torch.no_grad()
    def restore(self, buffers_only: bool = False) -> None:
        """Write the snapshot back into frozen entries (undoes weight decay, momentum, BN statistics); with
        `buffers_only`, into the BatchNorm running statistics alone."""
        for t, idx, saved in self.entries:
            if not (buffers_only and isinstance(t, nn.Parameter)):
                t.index_copy_(0, idx, saved)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """One masked optimizer step: mask gradients, step, restore the frozen entries it may have moved."""
        self.mask_gradients()
        optimizer.step()
        self.restore_moved(optimizer)

    def restore_moved(self, optimizer: torch.optim.Optimizer) -> None:
        """After a step of `optimizer` with masked gradients: restore what it may have moved (BatchNorm
        statistics always; the frozen parameters where `may_move_zero_gradients`)."""
        if may_move_zero_gradients(optimizer):
            self.restore()
        elif self.fixed:  # frozen BatchNorm channels: their running statistics are among the entries
            self.restore(buffers_only=True)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Within the block, frozen neurons' BatchNorm normalises with its frozen statistics in train mode too."""
        for bn, mask in self.fixed:
            bn.fixed = mask
        try:
            yield
        finally:
            for bn, _ in self.fixed:
                bn.fixed = None


def may_move_zero_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step can change a parameter whose gradient has been zero since the optimizer was made.

    False for Adam/AdamW without weight decay and for SGD without weight decay and momentum: their state stays
    zero and the update is exactly 0 (p - 0 = p bit for bit). True otherwise (weight decay, SGD momentum, any
    other optimizer), where Freezer.step restores the frozen entries after every step.
    """
    safe = {torch.optim.Adam: ("weight_decay",), torch.optim.SGD: ("weight_decay", "momentum")}  # AdamW is an Adam
    keys = next((k for cls, k in safe.items() if isinstance(optimizer, cls)), None)
    return keys is None or any(group[k] != 0 for group in optimizer.param_groups for k in keys)


def layer_counts(model: ContinualNet, mask: Tensor) -> list[int]:
    """Number of True entries of a neuron mask [N] in each layer."""
    return [int(m.sum()) for m in model.split_neurons(mask)]
