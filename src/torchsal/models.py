"""Model builders: the routed area MLP and the conv nets, each a ``BlockNet`` (torchsal.blocks) every rule trains.

``AreaMLP`` with ``areas=1, shared=False`` is the plain dense MLP (Linear-ReLU-...-Linear). For depth, hidden
layers after the first can be pre-norm residual blocks, ``h = h + relu(W norm(h))`` (one block counts as one
hidden layer), with a final norm before the head. The conv nets (``conv_modules``) are BioTorch's LeNet for MNIST,
its small CIFAR-10 CNN, a ResNet-20, Nøkland & Eidnes's VGG8b and VGG11b and a VGG depth family, written as
ordinary torch modules and converted to area layers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsal import compat
from torchsal.blocks import BlockNet, Trace
from torchsal.config import ModelConfig, RunConfig
from torchsal.data import Splits
from torchsal.dispatch import Groups, from_padded, give_memory, take_memory, to_padded
from torchsal.errors import ConfigError
from torchsal.layers import AreaLinear
from torchsal.stacks import GRADIENT_MEMORY, hand_out, stacked

log = logging.getLogger(__name__)

__all__ = ["AreaMLP", "BlockNet", "Trace", "build_model", "count_parameters"]


# Blocks whose area weights hold more elements than this run one by one, not as a stack: a stack saves each
# block's fixed cost (kernels and Python, about 0.1-0.2 ms), worth most of a block of 16 areas of 64 x 64 (a
# 128-layer step 18-25% faster) and less as blocks grow. Measured (benchmarks/stack_threshold.py, batch 128, stack
# step over block by block): 0.89-0.93 at 16 areas of 128 x 128, 0.97-0.98 at 256 x 256, 0.93 and 1.01 (shared
# path) at 512 x 512, 1.06-1.07 at 1024 x 1024; at 4096 x 4096 2.8 against 2.35 s (benchmarks/scale.py billion).
STACK_MAX_WEIGHTS = 2**20


class MLPBlock(nn.Module):
    """One layer of the MLP: ``relu(W norm(h))``, plus ``h`` for a residual block; the head has no activation."""

    def __init__(self, linear: AreaLinear, norm: nn.Module, residual: bool, activation: bool) -> None:
        super().__init__()
        self.norm, self.linear = norm, linear
        self.residual, self.activation = residual, activation

    def forward(self, h: Tensor) -> Tensor:
        a = self.linear(self.norm(h))
        if not self.activation:
            return a
        return h + torch.relu(a) if self.residual else torch.relu(a)

    def closed_form(self) -> bool:
        """True when ``learn`` forms this block's whole update: an area linear map of the input (no norm, whose
        parameters would need their own gradients), held whole by this process."""
        return isinstance(self.norm, nn.Identity) and isinstance(self.linear, AreaLinear) and not self.linear.sharded

    def local_forward(self, h: Tensor, groups: Groups | None) -> tuple[Tensor, tuple]:
        """The output without autograd, and what ``learn`` needs (torchsal.rules.closed_form)."""
        a, state = self.linear.local_forward(h, groups)
        if not self.activation:
            return a, (state, None)
        branch = a.relu_()
        return h + branch if self.residual else branch, (state, branch)

    def learn(self, state: tuple, grad: Tensor) -> None:
        """The update from the gradient of ``local_forward``'s output: through the ReLU into the linear map (the
        residual's identity carries no parameters)."""
        linear_state, branch = state
        if branch is not None:
            grad = compat.relu_backward(grad, branch)
        self.linear.learn(linear_state, grad)

    def stack_key(self) -> tuple | None:
        """Equal for blocks ``run_stack`` may run as one (torchsal.stacks); None for those it does not run."""
        norm, linear = self.norm, self.linear
        affine = isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None or \
            isinstance(norm, nn.RMSNorm) and norm.elementwise_affine
        if not self.activation or linear.sharded or not (affine or isinstance(norm, nn.Identity)) or \
                linear.weight.numel() > STACK_MAX_WEIGHTS:
            return None
        return (self.residual, type(norm), getattr(norm, "eps", None), linear.in_features, linear.out_features,
                linear.areas, linear.shared is not None, linear.weight.dtype)

    @staticmethod
    def run_stack(blocks: Sequence[MLPBlock], h: Tensor, groups: Groups | None) -> Tensor:
        """The outputs (L, B, width) of alike blocks, each on the detached output of the one before (the first on
        ``h``, rows grouped by ``groups``), as a local rule trains them: one pass without autograd, block by block
        in the padded layout (torchsal.dispatch: no block pads and unpads its rows), writing every block's input,
        norm and branch into stacked buffers, whose values autograd then takes as every block's output at once
        (``_Branches``: the gradients of all blocks in a few batched products)."""
        first = blocks[0]
        owners = [[b.linear.weight for b in blocks], [b.linear.bias for b in blocks],
                  [b.linear.shared for b in blocks] if first.linear.shared is not None else None]
        norm_owners = [[b.norm.get_parameter(n) for b in blocks] for n, _ in first.norm.named_parameters()]
        # (L, K, out, in), (L, K, out), (L, out, in); the norms' weight and bias (L, features)
        weight, bias, shared = (None if o is None else stacked(o) for o in owners)
        norm = [stacked(o) for o in norm_owners]
        x = h if groups is None else to_padded(h, groups)                           # (K * capacity, in)
        (count, areas, width), features = weight.shape[:3], x.shape[1]
        # block l's input at l, the run's outputs from 1 on (alike consecutive blocks: in = out = width)
        inputs, branch = x.new_empty(count + 1, *x.shape), x.new_empty(count, x.shape[0], width)
        normed = inputs[:count] if not norm_owners else torch.empty_like(inputs[:count])
        units = []                             # each block's norm before its affine map, for the norm's gradients
        identity = (x.new_ones(features), x.new_zeros(features))
        with torch.no_grad():
            inputs[0] = x
            # each block's views, made at once: input, output, norm, branch, weights, bias, shared weights, norm's
            extra = ([] if shared is None else [shared.mT]) + norm
            per_block = zip(inputs.unbind(0), inputs[1:].unbind(0), normed.unbind(0),
                            branch.view(count, areas, -1, width).unbind(0), weight.mT.unbind(0),
                            bias.unsqueeze(2).unbind(0), *(t.unbind(0) for t in extra))
            for h_in, h_out, n, out, w, b, *rest in per_block:
                if norm_owners:
                    units.append(first._normalized(h_in, n, identity, *rest[shared is not None:]))
                torch.baddbmm(b, n.view(areas, -1, features), w, out=out)
                out = out.view(h_in.shape[0], width)
                if shared is not None:
                    out.addmm_(n, rest[0])
                out.relu_()
                torch.add(h_in, out, out=h_out) if first.residual else h_out.copy_(out)
        unit = torch.stack(units) if units else None
        out = _Branches.apply(weight, bias, shared, *norm,
                              (inputs[1:], normed, unit, branch, owners, norm_owners, groups))
        return out if groups is None else from_padded(out, groups)

    def _normalized(self, t: Tensor, out: Tensor, identity: tuple[Tensor, Tensor], weight: Tensor,
                    bias: Tensor | None = None) -> Tensor:
        """This block's norm of ``t`` written into ``out``, with the given affine parameters; returns the norm
        before the affine map, whose products with the output's gradient are the affine parameters' gradients.
        ``identity`` (ones, zeros): torch 2.13's CPU layer norm without an affine map took 1.5x as long as with
        this one, which leaves every value as it is (12 against 8 us for 208 x 64, measured)."""
        features = (t.shape[-1],)
        if isinstance(self.norm, nn.LayerNorm):
            unit = F.layer_norm(t, features, *identity, eps=self.norm.eps)
            torch.addcmul(bias, unit, weight, out=out)
        else:
            unit = F.rms_norm(t, features, eps=self.norm.eps)
            torch.mul(unit, weight, out=out)
        return unit


class _Branches(torch.autograd.Function):
    """The outputs ``h + relu(n W[k].T + b[k] (+ n S.T))`` (or without ``h``, plain blocks) of L stacked blocks
    over padded rows, ``n`` their norms, all computed beforehand without autograd; no gradient goes to ``h`` (a local
    rule detaches every block input). The backward forms every block's gradients in a few batched products
    (weights (L * K, out, in) in their own layout; the norms' from the norm before its affine map, saved by the
    forward pass instead of recomputed) and hands each block's parameters their slices (``stacks.hand_out``,
    touched areas recorded): through autograd, a stacked gradient whose slices were handed out the step before was
    copied every step (autograd copies a gradient it does not own outright). The weight gradient is written into
    memory recycled across steps when every block's gradient was released (a fresh block per step cost its page
    faults: about 6 ms of a 128-layer step)."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, shared: Tensor | None, *norm_and_values) -> Tensor:  # noqa: ANN001
        *_, (outputs, normed, unit, branch, owners, norm_owners, groups) = norm_and_values
        ctx.save_for_backward(normed, unit, branch, weight, shared)
        ctx.owners, ctx.norm_owners, ctx.groups = owners, norm_owners, groups
        return outputs

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        normed, unit, branch, weight, shared = ctx.saved_tensors
        (weights, biases, shareds), groups = ctx.owners, ctx.groups
        count, areas = weight.shape[:2]
        # through the ReLU, into the branch's memory: a fresh (L, rows, width) block per step cost its page faults
        # (so do the norm's gradients below, in the memory of the norm's output once the products have read it;
        # a second backward through this graph then fails on the saved tensors' versions, as it should)
        grad_a = compat.relu_backward(grad, branch, into_output=True)
        per_area = grad_a.view(count * areas, -1, grad_a.shape[-1])
        if ctx.needs_input_grad[0]:
            recycled = all(p.grad is None for p in weights)
            grad_w = take_memory(weights[0], GRADIENT_MEMORY, weight.dtype, weight.shape) if recycled else \
                torch.empty_like(weight)
            torch.bmm(per_area.transpose(1, 2), normed.view(count * areas, -1, normed.shape[-1]),
                      out=grad_w.view(count * areas, *weight.shape[2:]))
            hand_out(weights, grad_w, groups)
            if recycled:                # taken again only once every block's gradient is released
                give_memory(weights[0], GRADIENT_MEMORY, grad_w)
        if ctx.needs_input_grad[1]:
            hand_out(biases, per_area.sum(1).view(count, areas, -1), groups)
        if shared is not None and ctx.needs_input_grad[2]:
            hand_out(shareds, torch.bmm(grad_a.transpose(1, 2), normed))
        if unit is not None and any(p.requires_grad for o in ctx.norm_owners for p in o):
            grad_n = torch.bmm(per_area, weight.flatten(0, 1), out=normed.view_as(per_area)).view_as(normed)
            if shared is not None:
                grad_n = grad_n.baddbmm_(grad_a, shared)
            if len(ctx.norm_owners) > 1:
                hand_out(ctx.norm_owners[1], grad_n.sum(1))                          # the norm's bias
            hand_out(ctx.norm_owners[0], grad_n.mul_(unit).sum(1))                 # its weight
        return (None,) * len(ctx.needs_input_grad)          # every gradient handed out above


class AreaMLP(BlockNet):
    """MLP whose every linear layer has K areas; a router picks one area per sample.

    Usage::

        config = ModelConfig(routing_config=RoutingConfig(areas=16))
        model = AreaMLP(64, 10, config, generator=torch.Generator().manual_seed(0))
        logits = model(x)
        trace = model.trace(x, detach=True)   # per-layer inputs detached: for local learning rules

    Args:
        in_features: input dimension d.
        num_classes: output classes C.
        config: depth, width, shared path and routing.
        generator: explicit generator for every random initialisation (weights, projection, prototypes).
        owned: the areas of every layer this process holds (area parallel); all of them by default.
    """

    def __init__(self, in_features: int, num_classes: int, config: ModelConfig,
                 generator: torch.Generator | None = None, owned: range | None = None) -> None:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        _check_resolved(config)
        dtype = getattr(torch, config.dtype)
        rc = config.routing_config
        sizes = [in_features] + [config.width] * config.depth + [num_classes]
        # Residual blocks: hidden layers 2..depth. Their branches start small (1/sqrt(depth)) so that the sum of
        # 128 branches does not swamp the signal at initialisation.
        residual = [config.block == "residual" and 0 < i < config.depth for i in range(len(sizes) - 1)]
        linears = [AreaLinear(n_in, n_out, rc.areas, config.shared, generator,
                              gain=1 / math.sqrt(config.depth) if res else 1.0, owned=owned, dtype=dtype)
                   for n_in, n_out, res in zip(sizes, sizes[1:], residual)]
        # Pre-norm of each residual block, and the final norm before the head.
        normed = [*residual[:-1], config.norm != "none"]
        blocks = [MLPBlock(linear, _norm(config.norm, n, dtype) if on and config.norm != "none" else nn.Identity(),
                           res, i < config.depth)
                  for i, (linear, n, on, res) in enumerate(zip(linears, sizes[:-1], normed, residual))]
        super().__init__(blocks, (in_features,), rc, generator, dtype,
                         shapes=[(n,) for n in sizes])
        self.config = config

    @property
    def sizes(self) -> list[int]:
        return [s[0] for s in self.shapes]

    @property
    def layers(self) -> list[AreaLinear]:
        return [block.linear for block in self.blocks]

    @property
    def norms(self) -> list[nn.Module]:
        return [block.norm for block in self.blocks]

    @property
    def residual(self) -> list[bool]:
        return [block.residual for block in self.blocks]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Model files written before the block layout named the layers ``layers.i`` and the norms ``norms.i``."""
        for key in [k for k in state_dict if k.startswith((prefix + "layers.", prefix + "norms."))]:
            kind, index, rest = key[len(prefix):].split(".", 2)
            state_dict[f"{prefix}blocks.{index}.{'linear' if kind == 'layers' else 'norm'}.{rest}"] = \
                state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _norm(kind: str, features: int, dtype: torch.dtype) -> nn.Module:
    return nn.LayerNorm(features, dtype=dtype) if kind == "layer" else nn.RMSNorm(features, dtype=dtype)


def lenet(in_shape: tuple[int, ...], classes: int) -> list[nn.Module]:
    """BioTorch's LeNet for MNIST (conv 6-16-120, 5x5, max-pool, fc 84); the first conv pads by 2, so a 28x28
    image meets the layers as LeNet-5's 32x32 does."""
    return [nn.Conv2d(in_shape[0], 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 120, 5), nn.ReLU(), nn.Flatten(),
            nn.Linear(120 * _side(in_shape, 28) ** 2, 84), nn.Linear(84, classes)]


def small_cnn(in_shape: tuple[int, ...], classes: int) -> list[nn.Module]:
    """BioTorch's small CIFAR-10 CNN: conv 32-64-128, 5x5, max-pool, fc 84."""
    return [nn.Conv2d(in_shape[0], 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 5), nn.ReLU(), nn.Flatten(),
            nn.Linear(128 * _side(in_shape, 32) ** 2, 84), nn.Linear(84, classes)]


def _side(in_shape: tuple[int, ...], native: int) -> int:
    """Side of the last conv's output map: 1 at the net's native image size."""
    if len(in_shape) != 3 or in_shape[1] != in_shape[2] or in_shape[1] < native:
        raise ConfigError(f"this conv net takes square images of at least {native}x{native}, got shape {in_shape}")
    return (in_shape[1] - native) // 4 + 1


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with batch norm and a shortcut (a 1x1 projection where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def resnet20(in_shape: tuple[int, ...], classes: int) -> list[nn.Module]:
    """ResNet-20 for CIFAR (He et al. 2016): a 3x3 conv, three stages of three basic blocks with 16, 32 and 64
    channels, global average pooling, a linear head; Kaiming-normal (fan-out) convolutions."""
    modules: list[nn.Module] = [nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for stage, cout in enumerate((16, 32, 64)):
        for i in range(3):
            modules.append(BasicBlock(cin, cout, 2 if stage and not i else 1))
            cin = cout
    for m in modules:
        for conv in (c for c in m.modules() if isinstance(c, nn.Conv2d)):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return [*modules, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)]


# Nøkland & Eidnes's (2019) VGG8b and VGG11b: the output channels of each conv, per pooling stage.
VGG_PLANS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8b": ((128, 256), (256, 512), (512,), (512,)),
    "vgg11b": ((128, 128, 128, 256), (256, 512), (512, 512), (512,))}
VGG_STAGE_WIDTHS = (128, 256, 512, 512)


def vgg_depth_plan(convs: int) -> tuple[tuple[int, ...], ...]:
    """The depth family (``--model vgg --depth N``): N convs over VGG8b's four pooling stages (128, 256, 512 and
    512 channels), spread evenly, earlier stages taking the extra ones: 4 (1, 1, 1, 1), 6 (2, 2, 1, 1), 8 (2, 2,
    2, 2), 11 (3, 3, 3, 2)."""
    if convs < len(VGG_STAGE_WIDTHS):
        raise ConfigError(f"--model vgg spreads its convs over {len(VGG_STAGE_WIDTHS)} pooling stages and needs at "
                          f"least {len(VGG_STAGE_WIDTHS)} conv layers: give --depth 4 or more (got {convs})")
    each, extra = divmod(convs, len(VGG_STAGE_WIDTHS))
    return tuple((width,) * (each + (stage < extra)) for stage, width in enumerate(VGG_STAGE_WIDTHS))


def vgg(in_shape: tuple[int, ...], classes: int, plan: tuple[tuple[int, ...], ...],
        width_mult: float = 1.0) -> list[nn.Module]:
    """A VGG-style net as Nøkland & Eidnes's VGG8b: 3x3 convolutions with batch norm and ReLU, a max-pool after
    each stage of ``plan``, then fc 1024 with batch norm and ReLU, and a linear head; every width times
    ``width_mult`` (0.25 and 0.5 fit CPU budgets; their dropout is left out)."""
    side = in_shape[1] // 2 ** len(plan)
    if len(in_shape) != 3 or in_shape[1] != in_shape[2] or side < 1:
        raise ConfigError(f"this VGG takes square images of at least {2 ** len(plan)}x{2 ** len(plan)}, "
                          f"got shape {in_shape}")
    modules: list[nn.Module] = []
    channels = in_shape[0]
    for stage in plan:
        for width in stage:
            out = max(1, round(width * width_mult))
            modules += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        modules.append(nn.MaxPool2d(2))
    hidden = max(1, round(1024 * width_mult))
    return [*modules, nn.Flatten(), nn.Linear(channels * side * side, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, classes)]


def conv_modules(config: ModelConfig, in_shape: tuple[int, ...], classes: int) -> list[nn.Module]:
    """The modules of conv net ``config.model`` for images of ``in_shape``."""
    if config.model in VGG_PLANS:
        return vgg(in_shape, classes, VGG_PLANS[config.model], config.width_mult)
    if config.model == "vgg":
        return vgg(in_shape, classes, vgg_depth_plan(config.depth), config.width_mult)
    return CONV_MODELS[config.model](in_shape, classes)


CONV_MODELS: dict[str, Callable[[tuple[int, ...], int], list[nn.Module]]] = {
    "lenet": lenet, "cnn": small_cnn, "resnet20": resnet20}


def _check_resolved(config: ModelConfig) -> None:
    if not isinstance(config.routing_config.areas, int):
        raise ConfigError("areas 'auto' follow the training set's size: resolve them first with "
                          "torchsal.config.resolve_areas(config, n_train), as the trainer does, or give a number")


def build_model(in_features: int, num_classes: int, config: ModelConfig, seed: int = 0,
                owned: range | None = None, in_shape: tuple[int, ...] | None = None) -> BlockNet:
    """The model for a run, initialised from its own seeded generator; with ``owned``, only those areas of each
    layer are held (with the values they have in the full model). Conv nets need the image shape ``in_shape``
    (channels, height, width)."""
    if config.model == "mlp":
        return AreaMLP(in_features, num_classes, config, torch.Generator().manual_seed(seed), owned)
    if in_shape is None or len(in_shape) != 3:
        raise ConfigError(f"--model {config.model} is a conv net: it needs an image dataset (mnist, fashion-mnist, "
                          "kmnist, cifar10, cifar100, svhn), or use --model mlp")
    _check_resolved(config)
    if owned is not None:
        raise ConfigError("--parallel area shards the routed MLP only; train conv nets with --parallel data")
    rc = config.routing_config
    with torch.random.fork_rng(devices=[]):      # torch's own initialisation, seeded, global RNG untouched
        torch.manual_seed(seed)
        modules = [m.to(getattr(torch, config.dtype)) for m in conv_modules(config, tuple(in_shape), num_classes)]
    return BlockNet.from_modules(modules, in_shape, rc.areas, config.shared, rc, torch.Generator().manual_seed(seed),
                                 conv_areas=config.conv_areas)


def count_parameters(in_features: int, num_classes: int, config: ModelConfig) -> int:
    """Total parameters of the model ``config`` describes, without allocating it (for memory checks and for
    matching a dense model's size to a routed one)."""
    rc, k = config.routing_config, config.routing_config.areas
    if not isinstance(k, int):
        raise ConfigError("count_parameters needs a number of areas; resolve areas 'auto' first (resolve_areas)")
    sizes = [in_features] + [config.width] * config.depth + [num_classes]
    layers = sum((k + config.shared) * a * b + k * b for a, b in zip(sizes, sizes[1:]))
    if config.norm != "none":
        blocks = (config.depth - 1 if config.block == "residual" else 0) + 1          # pre-norms + final norm
        layers += blocks * config.width * (2 if config.norm == "layer" else 1)
    if k == 1:
        return layers
    router_inputs = sizes[:1] if rc.routing == "input" else sizes[:-1]
    return layers + sum((a + 1) * rc.routing_dim for a in router_inputs)


def check_sizes(config: RunConfig, splits: Splits) -> None:
    """Refuse a model that cannot fit in memory; warn where areas outnumber the training samples."""
    areas, n = config.model.routing_config.areas, len(splits.y_train)
    if areas > n:
        log.warning("%d areas for %d training samples: some areas will never see a sample", areas, n)
    if config.model.model != "mlp":
        return                      # the conv nets are small (at most a few million parameters with 16 areas)
    counts = count_parameters(splits.in_features, splits.num_classes, config.model)
    # Weights + gradients + up to two optimizer moments (Adam), in the model's type, plus the data itself.
    need = 4 * counts * torch.finfo(getattr(torch, config.model.dtype)).bits // 8 + splits.x_train.numel() * 4
    available = _available_memory()
    if available and need > available:
        raise ConfigError(f"the model needs about {need / 2**30:.1f} GiB ({counts:,} parameters with gradients and "
                          f"optimizer state) but only {available / 2**30:.1f} GiB is available; reduce --width, "
                          "--depth or --areas")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
