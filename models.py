"""The paper's networks: a 4x200 MLP and ResNet-18, with one head per task and addressable neurons.

Every hidden Linear unit and every Conv2d output channel is a neuron (a Shapley player). Each such
layer is followed by a `NeuronGate` that can replace chosen neurons' outputs by constants: the removal
used by V(S) and by task-subnetwork inference (Eq. 1). In the ResNet the gate sits after the conv's
BatchNorm: in eval mode BN is a per-channel affine map, so replacing its output by its mean is exactly
the paper's replacement of the conv output by its mean, and a removed neuron's constant then no longer
depends on its (plastic) BatchNorm.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NeuronGate(nn.Module):
    """Identity unless gated: y = x where keep, else the constant mu (per neuron, broadcast over H x W).

    keep is [n] (one coalition) or [K, n] (K coalitions; the batch is then K groups of equal size); const is [n],
    or [K, n] with K coalitions (each its own constants, e.g. each task subnetwork's own mu).
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.keep: Tensor | None = None
        self.const: Tensor | None = None
        self.sums: Tensor | None = None
        self.maxes: Tensor | None = None
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, n] or [B, n, H, W]."""
        if self.sums is not None:
            dims = [0] + list(range(2, x.dim()))
            self.sums += x.detach().double().sum(dim=dims)
            self.maxes = torch.maximum(self.maxes, x.detach().double().amax(dim=dims))
            self.count += x.numel() // self.n
        if self.keep is None:
            return x
        spatial = (1,) * (x.dim() - 2)
        if self.keep.dim() == 1:
            return torch.where(self.keep.view(self.n, *spatial), x, self.const.view(self.n, *spatial).to(x.dtype))
        k = self.keep.shape[0]
        xs = x.view(k, x.shape[0] // k, *x.shape[1:])
        const = self.const.view(-1, 1, self.n, *spatial).to(x.dtype)
        return torch.where(self.keep.view(k, 1, self.n, *spatial), xs, const).view_as(x)


class NeuronBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose `fixed` channels ([C] bool) normalise with their running statistics in training too.

    snv_core.Freezer fixes the channels of frozen neurons B_t while later tasks train, so that they compute
    during training exactly the function they compute at test (eval mode); with batch statistics, later
    tasks would learn on frozen features they never see at test.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.fixed: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W]."""
        if not self.training or self.fixed is None:
            return super().forward(x)
        at_test = F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias,
                               False, 0.0, self.eps)
        return torch.where(self.fixed.view(1, -1, 1, 1), at_test, super().forward(x))


@dataclass
class NeuronLayer:
    """One layer of players: the module whose output rows are neurons, its BatchNorm and its gate."""

    name: str
    producer: nn.Linear | nn.Conv2d
    gate: NeuronGate
    bn: NeuronBatchNorm2d | None


class ContinualNet(nn.Module):
    """A backbone of gated neuron layers plus one linear head per task.

    The backbone is a chain of stages, then `pool` to the feature vector. Stage s is split into
    `stage_in` (what depends only on earlier stages' gates, e.g. the Linear of an MLP layer) and
    `stage_out` (the gates of layers `stage_layers[s]` onward).
    """

    feature_dim: int
    layers: list[NeuronLayer]
    stage_layers: list[list[int]]

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList()

    def stage_in(self, s: int, h: Tensor) -> Tensor:
        """The part of stage s before its first gate, on the previous stage's output (stage 0: on x)."""
        return h

    def stage_out(self, s: int, z: Tensor) -> Tensor:
        """The rest of stage s, from its first gate on."""
        raise NotImplementedError

    def pool(self, h: Tensor) -> Tensor:
        """Last stage's output -> [B, feature_dim]."""
        return h

    def features(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, feature_dim]."""
        h = x
        for s in range(len(self.stage_layers)):
            h = self.stage_out(s, self.stage_in(s, h))
        return self.pool(h)

    @property
    def num_neurons(self) -> int:
        """N: the number of players (hidden units and conv filters)."""
        return sum(layer.gate.n for layer in self.layers)

    @property
    def layer_sizes(self) -> list[int]:
        return [layer.gate.n for layer in self.layers]

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def add_head(self, num_classes: int) -> None:
        """Create the head of a new task (He-initialised)."""
        device = next(self.parameters()).device
        head = nn.Linear(self.feature_dim, num_classes).to(device)
        he_init(head)
        self.heads.append(head)

    def forward(self, x: Tensor, task: int) -> Tensor:
        """Task-incremental logits of `task`'s head: [B, C]."""
        return self.heads[task](self.features(x))

    def split_neurons(self, values: Tensor) -> list[Tensor]:
        """Split a per-neuron vector [..., N] into per-layer chunks [..., n_l]."""
        return list(torch.split(values, self.layer_sizes, dim=-1))

    @contextlib.contextmanager
    def gated_layers(self, gates: dict[int, tuple[Tensor, Tensor]]) -> Iterator[None]:
        """Within the block, layer l's neurons outside keep ([n_l] or [K, n_l]) output const [n_l]."""
        for l, (keep, const) in gates.items():
            self.layers[l].gate.keep, self.layers[l].gate.const = keep, const
        try:
            yield
        finally:
            for l in gates:
                self.layers[l].gate.keep = self.layers[l].gate.const = None

    def gated(self, keep: Tensor, const: Tensor) -> contextlib.AbstractContextManager[None]:
        """Within the block, neurons outside `keep` ([N] or [K, N] bool) output `const` ([N], or [K, N] with K
        coalitions: coalition k's own constants); with K coalitions the input is K groups of equal size."""
        pairs = zip(self.split_neurons(keep), self.split_neurons(const))
        return self.gated_layers(dict(enumerate(pairs)))

    @contextlib.contextmanager
    def capturing(self) -> Iterator[list[NeuronGate]]:
        """Within the block, gates accumulate the sum, maximum and count of their inputs (for mu, silent units)."""
        for layer in self.layers:
            device = layer.producer.weight.device
            layer.gate.sums = torch.zeros(layer.gate.n, dtype=torch.float64, device=device)
            layer.gate.maxes = torch.full((layer.gate.n,), -torch.inf, dtype=torch.float64, device=device)
            layer.gate.count = 0
        try:
            yield [layer.gate for layer in self.layers]
        finally:
            for layer in self.layers:
                layer.gate.sums = layer.gate.maxes = None


def he_init(module: nn.Module) -> None:
    """Kaiming-normal weights (fan_out for convs, fan_in for linears), zero biases, unit BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MLP(ContinualNet):
    """The PMNIST MLP: input -> `depth` x `width` ReLU layers (784-200-200-200-200 by default)."""

    def __init__(self, in_features: int = 784, width: int = 200, depth: int = 4) -> None:
        super().__init__()
        dims = [in_features] + [width] * depth
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.gates = nn.ModuleList(NeuronGate(width) for _ in range(depth))
        self.layers = [NeuronLayer(f"fc{i + 1}", lin, g, None) for i, (lin, g) in enumerate(zip(self.linears, self.gates))]
        self.stage_layers = [[i] for i in range(depth)]
        self.feature_dim = width
        he_init(self)

    def stage_in(self, s: int, h: Tensor) -> Tensor:
        return self.linears[s](h.flatten(1))

    def stage_out(self, s: int, z: Tensor) -> Tensor:
        return F.relu(self.gates[s](z))

    @torch.no_grad()
    def cross_entropy_grads(self, x: Tensor, y: Tensor, task: int, frozen: list[Tensor | None] | None = None
                            ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The mean cross-entropy [] of head `task` on x [B, 1, 28, 28], y [B], the parameters it depends on, and
        their gradients (same order), without autograd.

        The forward of the ungated network and a hand-written backward: the ATen calls autograd makes for F.linear,
        relu and F.cross_entropy, in its order and operand layouts (grad W = g^T a), so the gradients are those of
        loss.backward() bit for bit (test_snv.py checks torch.equal). `frozen`: per hidden layer, a bool mask
        [n_l] of frozen neurons (or None) whose weight rows and bias get gradient exactly 0, dL/dtheta * M as
        Freezer.mask_gradients writes it; the gradient still flows through them to the layers below.
        """
        linears = list(self.linears)
        head = self.heads[task]
        acts = [x.flatten(1)]  # acts[l]: the input of linears[l]; acts[-1]: the head's
        for lin in linears:
            acts.append(torch.relu(F.linear(acts[-1], lin.weight, lin.bias)))
        logp = torch.log_softmax(F.linear(acts[-1], head.weight, head.bias), 1)
        loss = F.nll_loss(logp, y)
        grad_logp = torch.zeros_like(logp).scatter_(1, y[:, None], -1.0 / len(y))
        g = torch.ops.aten._log_softmax_backward_data(grad_logp, logp, 1, logp.dtype)  # dL/dlogits [B, C]
        params, grads = [], []
        for i, layer in enumerate([head] + linears[::-1]):
            g_own = g
            if i > 0:  # through the ReLU whose output is this layer's output
                g = g_own = torch.ops.aten.threshold_backward(g, acts[-i], 0)
                if frozen is not None and frozen[-i] is not None:
                    g_own = g.masked_fill(frozen[-i], 0.0)
            params += [layer.weight, layer.bias]
            grads += [torch.mm(g_own.t(), acts[-1 - i]), g_own.sum(0)]
            if i < len(linears):  # no gradient for the input x
                g = torch.mm(g, layer.weight)
        return loss, params, grads


class BasicBlock(nn.Module):
    """ResNet basic block; each conv (and the 1x1 shortcut conv) is followed by BatchNorm, then a gate."""

    def __init__(self, cin: int, cout: int, stride: int, name: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gate1, self.bn1 = NeuronGate(cout), NeuronBatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gate2, self.bn2 = NeuronGate(cout), NeuronBatchNorm2d(cout)
        self.layers = [NeuronLayer(f"{name}.conv1", self.conv1, self.gate1, self.bn1),
                       NeuronLayer(f"{name}.conv2", self.conv2, self.gate2, self.bn2)]
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            conv, gate, bn = nn.Conv2d(cin, cout, 1, stride, bias=False), NeuronGate(cout), NeuronBatchNorm2d(cout)
            self.shortcut = nn.Sequential(conv, bn, gate)
            self.layers.append(NeuronLayer(f"{name}.shortcut", conv, gate, bn))

    def forward_in(self, x: Tensor) -> Tensor:
        """The block before its first gate: [bn1(conv1(x)), shortcut conv + BN of x (or x)] along channels."""
        skip = x if self.shortcut is None else self.shortcut[1](self.shortcut[0](x))
        return torch.cat([self.bn1(self.conv1(x)), skip], dim=1)

    def forward_out(self, z: Tensor) -> Tensor:
        """The block from its first gate on, given `forward_in`'s output."""
        pre, skip = z.split(self.conv2.out_channels, dim=1)
        out = self.gate2(self.bn2(self.conv2(F.relu(self.gate1(pre)))))
        return F.relu(out + (skip if self.shortcut is None else self.shortcut[2](skip)))


class ResNet18(ContinualNet):
    """ResNet-18. stem_kind="cifar": 3x3 stride-1 stem, no max-pool (32x32, 64x64); "imagenet": 7x7/2 + max-pool.

    With width w the stages have w, 2w, 4w, 8w channels: N = 4,800 neurons (20 convs) at w = 64.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, stem_kind: str = "cifar") -> None:
        super().__init__()
        if stem_kind not in ("cifar", "imagenet"):
            raise ValueError(f"unknown ResNet stem {stem_kind!r}: use 'cifar' or 'imagenet'")
        k, s, p = (3, 1, 1) if stem_kind == "cifar" else (7, 2, 3)
        self.conv1 = nn.Conv2d(in_channels, width, k, s, p, bias=False)
        self.gate1, self.bn1 = NeuronGate(width), NeuronBatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_kind == "imagenet" else nn.Identity()
        blocks, cin = [], width
        for stage, mult in enumerate((1, 2, 4, 8)):
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, width * mult, stride, f"layer{stage + 1}.{i}"))
                cin = width * mult
        self.blocks = nn.ModuleList(blocks)
        self.layers = [NeuronLayer("conv1", self.conv1, self.gate1, self.bn1)]
        self.stage_layers = [[0]]
        for block in self.blocks:
            self.stage_layers.append(list(range(len(self.layers), len(self.layers) + len(block.layers))))
            self.layers += block.layers
        self.feature_dim = cin
        he_init(self)

    def stage_in(self, s: int, h: Tensor) -> Tensor:
        return self.bn1(self.conv1(h)) if s == 0 else self.blocks[s - 1].forward_in(h)

    def stage_out(self, s: int, z: Tensor) -> Tensor:
        return self.maxpool(F.relu(self.gate1(z))) if s == 0 else self.blocks[s - 1].forward_out(z)

    def pool(self, h: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(h, 1).flatten(1)


ARCHS = ("mlp", "resnet18")


def build_model(arch: str, input_shape: tuple[int, int, int], width: int | None = None) -> ContinualNet:
    """The backbone for `arch` on inputs of shape (C, H, W); width None means the paper's (200 / 64)."""
    c, h, w = input_shape
    if arch == "mlp":
        return MLP(c * h * w, width or 200)
    if arch == "resnet18":
        return ResNet18(c, width or 64, "imagenet" if h >= 128 else "cifar")
    raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
