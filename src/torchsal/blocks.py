"""Models as sequences of blocks, what every learning rule trains: the routed MLP, the conv nets, a user's own.

A *block* is a module that maps one hidden representation to the next (a linear or convolutional area layer with
what follows it: activation, pooling, normalisation, or a whole residual block); the last block is the *head*,
whose output is the logits. Local rules (dfa, sal) give each hidden block's output its own learning signal and cut
the graph at every block input, so no gradient leaves a block and the layers inside a block learn from it by
ordinary backprop; fa replaces every area layer's transposed weights by fixed ones; bp is plain autograd.

    model = BlockNet.from_modules(my_cnn, in_shape=(3, 32, 32), areas=16)   # any nn.Sequential of supported layers
    logits = model(x)
    trace = model.trace(x, detach=True)      # every block output, for a rule

Routing: one router on the input (``routing="input"``: the batch is grouped by area once and every area layer of
every block uses the sample's area) or one router per block on the block's input (``"layer"``: pooled over space
for feature maps). Area layers read the grouping from the block's context (``dispatch.routed``), so a block may be
any module a user wrote, as long as its layers are supported (``SUPPORTED``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from torchsal.config import RoutingConfig
from torchsal.dispatch import Groups, group_by_area, routed
from torchsal.errors import ConfigError
from torchsal.layers import AreaConv2d, AreaLayer, AreaLinear
from torchsal.routing import Router
from torchsal.stacks import alike_runs

# Layers a block may hold besides area layers (and Linear / Conv2d, which conversion turns into area layers), and
# parameter-free modules of the user's own. Normalisation layers train with their block.
SUPPORTED: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity, nn.ReLU, nn.ReLU6,
    nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh)


@dataclass
class Trace:
    """What one forward pass leaves for a learning rule.

    With input routing the batch is grouped by area once, before the first block, and every tensor of the trace
    is in that *grouped* row order (``rows``: the batch index of each row); with layer routing, or one area, rows
    keep the batch order (``rows`` is None). ``in_batch_order`` maps a tensor of the trace back.
    """

    logits: Tensor                    # (B, C), trace row order
    hidden: list[Tensor]              # h_l, each hidden block's output (B, ...), trace row order
    areas: list[Tensor | None]        # area (B,) used by each block (hidden blocks, then head), batch order
    groups: list[Groups | None]       # each block's grouping (None: one area)
    routing_loss: Tensor              # scalar, sum of the routers' local objectives
    rows: Tensor | None = None        # (B,) batch index of each trace row; None: batch order
    inverse: Tensor | None = None     # (B,) trace row of each sample
    # runs of hidden blocks computed as one stack: first block -> their outputs (L, B, ...), of which ``hidden``
    # holds views
    stacks: dict[int, Tensor] = field(default_factory=dict)

    def segments(self) -> list[tuple[range, Tensor | None]]:
        """The hidden blocks in consecutive segments: each stacked run with its outputs (L, B, ...), and the blocks
        between runs with None. A rule that handles a segment at once saves a copy of the stack's outputs and
        the per-block kernels (a 128-layer step's surrogate took 127 dot products and their backward a stack)."""
        out, start = [], 0
        for first, stacked in sorted(self.stacks.items()):
            if first > start:
                out.append((range(start, first), None))
            out.append((range(first, first + len(stacked)), stacked))
            start = first + len(stacked)
        if start < len(self.hidden):
            out.append((range(start, len(self.hidden)), None))
        return out

    def in_trace_order(self, t: Tensor) -> Tensor:
        """A per-sample tensor in batch order (labels, say), reordered like the trace's rows."""
        return t if self.rows is None else t[self.rows]

    def in_batch_order(self, t: Tensor) -> Tensor:
        return t if self.inverse is None else t[self.inverse]


def routing_features(h: Tensor) -> Tensor:
    """What a router sees of a block input: the features, feature maps averaged over space."""
    return h if h.dim() == 2 else h.flatten(2).mean(2)


class BlockNet(nn.Module):
    """A routed model made of blocks; the last block is the head.

    Args:
        blocks: the blocks in order (their area layers must have ``routing.areas`` areas, or one).
        in_shape: one sample's shape, e.g. ``(3, 32, 32)``; inputs may also come flat, channels last
            (``(B, H * W * C)``, as torchsal's datasets store images).
        routing: areas and routing (None: one area, a dense model).
        generator: draws the routers.
        dtype: the type inputs are converted to.
        shapes: each block's input shape, then the logits' (given by models that know them; else measured by
            running one zero sample).
    """

    def __init__(self, blocks: Sequence[nn.Module], in_shape: Sequence[int], routing: RoutingConfig | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 shapes: list[tuple[int, ...]] | None = None) -> None:
        super().__init__()
        if not blocks:
            raise ConfigError("a model needs at least one block (the head)")
        self.blocks = nn.ModuleList(blocks)
        self.in_shape, self.dtype = tuple(in_shape), dtype
        self.routing = routing if routing is not None else RoutingConfig(areas=1)
        wrong = [layer for layer in self.area_layers() if layer.areas not in (1, self.areas)]
        if wrong:
            raise ConfigError(f"{type(wrong[0]).__name__} has {wrong[0].areas} areas, the model routes to "
                              f"{self.areas}: build every area layer with the model's number of areas")
        self.shapes = shapes if shapes is not None else self._measure_shapes()
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        # the blocks a router sits before: the first (input routing), or each block holding areas (layer routing)
        with_areas = [i for i, b in enumerate(self.blocks) if any(m.areas > 1 for m in b.modules()
                                                                  if isinstance(m, AreaLayer))]
        self.router_blocks = [] if self.areas == 1 else [0] if self.routing.routing == "input" else with_areas
        self.routers = nn.ModuleList(
            Router(math.prod(self.shapes[i]) if i == 0 or len(self.shapes[i]) == 1 else self.shapes[i][0],
                   self.routing, generator, dtype)
            for i in self.router_blocks)
        self._router_of = {block: r for r, block in enumerate(self.router_blocks)}     # block -> its router
        # Run runs of alike hidden blocks as one under a local rule, where the blocks' class can (torchsal.stacks):
        # a part of the fast path (torchsal.execution sets it), off on the reference path.
        self.stack_alike_blocks = False
        self._runs: dict[int, range] | None = None

    @classmethod
    def from_modules(cls, modules: nn.Module | Sequence[nn.Module], in_shape: Sequence[int], areas: int = 1,
                     shared: bool = False, routing: RoutingConfig | None = None,
                     generator: torch.Generator | None = None, conv_areas: bool = True) -> BlockNet:
        """A user's model, an ``nn.Sequential`` (or a list) of modules, as a routed block model: each Linear and
        Conv2d becomes an area layer with ``areas`` areas (a copy of the original in every area; with ``shared``
        the original is the shared path and the areas start at zero, so the converted model computes what the
        original did), and a new block starts at every top-level module that holds one. With ``conv_areas``
        off, convolutions stay dense (one area: their kernels see every image) and only Linear layers are
        routed. ``routing`` (default: input routing with ``areas``) sets how samples are routed."""
        routing = routing if routing is not None else RoutingConfig(areas=areas)
        if routing.areas != areas:
            raise ConfigError(f"areas={areas} but routing has {routing.areas} areas")
        if isinstance(modules, nn.Sequential | nn.ModuleList | list | tuple):
            children = list(modules)
        else:
            raise ConfigError(f"pass the model as an nn.Sequential or a list of modules, its blocks in order (got a "
                              f"{type(modules).__name__}: a forward method of its own cannot be split into blocks)")
        children = [convert(m, areas, shared, conv_areas) for m in _checked(children)]
        dtype = next((p.dtype for m in children for p in m.parameters()), torch.float32)   # inputs follow it
        return cls(split_blocks(children), in_shape, routing, generator, dtype)

    @property
    def areas(self) -> int:
        return self.routing.areas

    @property
    def num_classes(self) -> int:
        return self.shapes[-1][0]

    @property
    def hidden_shapes(self) -> list[tuple[int, ...]]:
        """The shape of each hidden block's output (one sample)."""
        return self.shapes[1:-1]

    def area_layers(self) -> list[AreaLayer]:
        """Every area layer, in the order the blocks hold them."""
        return [m for m in self.blocks.modules() if isinstance(m, AreaLayer)]

    def forward(self, x: Tensor) -> Tensor:
        trace = self.trace(x)
        return trace.in_batch_order(trace.logits)

    def trace(self, x: Tensor, *, detach: bool = False,
              on_hidden: Callable[[int, Tensor, Groups | None, Tensor | None], None] | None = None) -> Trace:
        """Forward pass recording what rules need.

        Args:
            detach: cut the graph at every block input, so each block's graph holds only its own parameters.
            on_hidden: called with (block index, h_l, its block's grouping, the batch index of each row of h_l
                or None for batch order) as soon as hidden block l is computed; the hidden outputs are then not
                kept (lean memory: a block may update and free its graph at once).
        """
        x = self.prepared(x)
        routing_loss = None
        area, groups, rows, inverse, grouped = None, None, None, None, False
        hidden, areas, block_groups, stacks = [], [], [], {}
        # a local rule's graph: runs of alike blocks may go as one (torchsal.stacks)
        runs = self.alike_runs() if self.stack_alike_blocks and detach and on_hidden is None and \
            torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type) else {}
        h, i = x, 0
        while True:
            block = self.blocks[i]
            h_in = h.detach() if detach else h
            run = runs.get(i)
            if run is not None and (groups is None or grouped and groups.counts is not None):
                with routed(groups):
                    out = type(block).run_stack(self.blocks[run.start: run.stop], h_in, groups)
                stacks[len(hidden)] = out
                hidden.extend(out.unbind(0))
                areas.extend([area] * len(run))
                block_groups.extend([groups] * len(run))
                h, i = out[-1], run.stop
                continue
            r = self._router_of.get(i)
            if r is not None:   # input routing: router 0 only, its areas reused by every block
                area, loss = self.routers[r](h_in.flatten(1) if i == 0 else routing_features(h_in))
                routing_loss = loss if routing_loss is None else routing_loss + loss
                groups = group_by_area(area, self.areas)
                if self.routing.routing == "input":      # group the rows once, for every block
                    rows, inverse, grouped = groups.order, groups.inverse, True
                    h_in = h_in[rows]
            elif self.routing.routing == "layer":        # a block without areas: no grouping
                area, groups = None, None
            areas.append(area)
            block_groups.append(groups)
            with routed(groups):            # layer routing: the block's own grouping, batch order outside it
                h = block(h_in) if groups is None or grouped else block(h_in[groups.order])[groups.inverse]
            if i == len(self.blocks) - 1:
                return Trace(h, hidden, areas, block_groups, x.new_zeros(()) if routing_loss is None else routing_loss,
                             rows, inverse, stacks)
            if on_hidden is None:
                hidden.append(h)
            else:
                on_hidden(i, h, groups, rows)
            i += 1

    def alike_runs(self) -> dict[int, range]:
        """Runs of alike hidden blocks after the first (which takes the routed input), found once."""
        if self._runs is None:
            runs = alike_runs(self.blocks[1:-1])
            self._runs = {start + 1: range(run.start + 1, run.stop + 1) for start, run in runs.items()}
        return self._runs

    def prepared(self, x: Tensor) -> Tensor:
        """The input as the blocks take it: shaped (``_shaped``) and in the model's type (bfloat16 models take
        float32 data)."""
        return self._shaped(x).to(self.dtype)

    def _shaped(self, x: Tensor) -> Tensor:
        """The input as (B, *in_shape); images channels last in memory, the layout mkldnn convolves and pools
        fastest (max-pooling 4x faster than on contiguous maps, measured)."""
        if x.shape[1:] == self.in_shape:
            return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        if len(self.in_shape) == 3 and x.dim() == 2 and x.shape[1] == math.prod(self.in_shape):
            c, h, w = self.in_shape          # flat images are stored channels last: a view, no copy
            return x.view(x.shape[0], h, w, c).permute(0, 3, 1, 2)
        raise ValueError(f"expected input of shape (batch, {', '.join(map(str, self.in_shape))}), "
                         f"got {tuple(x.shape)}")

    @torch.no_grad()
    def _measure_shapes(self) -> list[tuple[int, ...]]:
        was_training = self.training
        self.eval()
        h = torch.zeros(1, *self.in_shape, dtype=self.dtype)
        groups = group_by_area(torch.zeros(1, dtype=torch.long), self.areas) if self.areas > 1 else None
        shapes = []
        with routed(groups):
            for i, block in enumerate(self.blocks):
                shapes.append(tuple(h.shape[1:]))
                try:
                    h = block(h)
                except RuntimeError as exc:
                    first = str(exc).strip().splitlines()[0][:200]
                    raise ConfigError(f"block {i} ({type(block).__name__}) cannot take a sample of shape "
                                      f"{shapes[-1]} (in_shape={self.in_shape}): {first}") from None
        self.train(was_training)
        if h.dim() != 2:
            raise ConfigError(f"the head must output (batch, classes) logits, got a map of shape {tuple(h.shape)}:"
                              " end the model with nn.Flatten() and a Linear layer")
        return [*shapes, tuple(h.shape[1:])]

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every process holds a copy of: all of them, except the areas of area-parallel layers."""
        sharded = {id(p) for layer in self.area_layers() if layer.sharded for p in (layer.weight, layer.bias)}
        return [p for p in self.parameters() if id(p) not in sharded]

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters of the whole model (all areas, also when this process holds only a shard of them, as
        under ``--parallel area``), parameters used per sample (one area per layer, shared paths, routers, the
        rest of the blocks) and, for a shard, the parameters this process holds."""
        held = sum(p.numel() for p in self.parameters())
        layers = self.area_layers()
        elsewhere = sum((layer.areas - len(layer.owned)) * (layer.weight[0].numel() + layer.bias[0].numel())
                        for layer in layers)
        in_areas = sum(p.numel() for layer in layers for p in layer.parameters())
        counts = {"params_total": held + elsewhere,
                  "params_active_per_sample": held - in_areas + sum(layer.active_parameters() for layer in layers)}
        return {**counts, "params_held_by_this_process": held} if elsewhere else counts


def _checked(children: list[nn.Module]) -> list[nn.Module]:
    """The modules, each checked to hold only layers a rule can train; one precise error otherwise."""
    for index, child in enumerate(children):
        for name, module in child.named_modules():
            where = f"module {index}" + (f" ({name})" if name else "") + f", {type(module).__name__},"
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                raise ConfigError(f"{where} has groups={module.groups} and padding_mode={module.padding_mode!r}: "
                                  "area convolutions support groups=1 and zero padding")
            known = isinstance(module, (nn.Linear, nn.Conv2d, AreaLayer, *SUPPORTED))
            if not known and any(True for _ in module.parameters(recurse=False)):
                raise ConfigError(
                    f"{where} is a layer torchsal cannot train: a block may hold Linear and Conv2d layers, "
                    "pooling, normalisation (BatchNorm, LayerNorm, GroupNorm, RMSNorm), activations, Flatten, "
                    "Dropout, and modules of your own made of these; replace it or keep it out of the model")
    return children


def convert(module: nn.Module, areas: int, shared: bool = False, conv_areas: bool = True) -> nn.Module:
    """``module`` with every Linear and Conv2d (itself, or inside it) replaced by an area layer holding a copy of
    its weights in every area (with ``shared``: the weights as the shared path, the areas at zero; without
    ``conv_areas``: convolutions as one dense area); the rest is kept, in place."""
    dense = isinstance(module, nn.Conv2d) and not conv_areas
    replaced = _area_layer(module, 1, False) if dense else _area_layer(module, areas, shared)
    if replaced is not None:
        return replaced
    for name, child in module.named_children():
        setattr(module, name, convert(child, areas, shared, conv_areas))
    return module


@torch.no_grad()
def _area_layer(module: nn.Module, areas: int, shared: bool) -> AreaLayer | None:
    """The area layer of a Linear or Conv2d (its weights copied; a layer without bias gets a zero bias)."""
    dtype = module.weight.dtype if isinstance(module, (nn.Linear, nn.Conv2d)) else None
    if isinstance(module, nn.Linear):
        layer: AreaLayer = AreaLinear(module.in_features, module.out_features, areas, shared, dtype=dtype)
    elif isinstance(module, nn.Conv2d):
        layer = AreaConv2d(module.in_channels, module.out_channels, module.kernel_size, areas, shared,
                           stride=module.stride, padding=module.padding, dilation=module.dilation, dtype=dtype)
    else:
        return None
    if shared:
        layer.shared.copy_(module.weight)
        layer.weight.zero_()
    else:
        layer.weight.copy_(module.weight.expand_as(layer.weight))
    layer.bias.copy_(module.bias.expand_as(layer.bias) if module.bias is not None else 0)
    return layer


def split_blocks(modules: list[nn.Module]) -> list[nn.Module]:
    """Group top-level modules into blocks: a block starts at each module that holds an area layer and takes
    the parameter-free modules after it (activation, pooling, flatten) and norms; what comes before the first one
    joins the first block. The last block is the head."""
    learned = [i for i, m in enumerate(modules) if any(isinstance(x, AreaLayer) for x in m.modules())]
    if not learned:
        raise ConfigError("the model has no Linear or Conv2d layer: nothing to train")
    starts = [0, *learned[1:]]
    ends = [*learned[1:], len(modules)]
    return [modules[s] if e - s == 1 else nn.Sequential(*modules[s:e]) for s, e in zip(starts, ends)]
