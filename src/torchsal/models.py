"""Model builders. One model class, the routed area MLP; every learning rule trains it unchanged.

``AreaMLP`` with ``areas=1, shared=False`` is the plain dense MLP (Linear-ReLU-...-Linear). For depth, hidden
layers after the first can be pre-norm residual blocks, ``h = h + relu(W norm(h))`` (one block counts as one
hidden layer), with a final norm before the head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchsal.config import ModelConfig
from torchsal.dispatch import Groups, group_by_area
from torchsal.errors import ConfigError
from torchsal.layers import AreaLinear
from torchsal.routing import Router


@dataclass
class Trace:
    """What one forward pass leaves for a learning rule.

    With input routing the batch is grouped by area once, before the first layer, and every tensor of the trace is
    in that *grouped* row order (``rows``: the batch index of each row); with layer routing, or one area, rows keep
    the batch order (``rows`` is None). ``in_batch_order`` maps a tensor of the trace back.
    """

    logits: Tensor                    # (B, C), trace row order
    hidden: list[Tensor]              # h_l, (B, width) per hidden layer, post-activation, trace row order
    areas: list[Tensor | None]        # area (B,) used by each linear layer (hidden layers, then head), batch order
    groups: list[Groups | None]       # each linear layer's grouping (None: one area)
    routing_loss: Tensor              # scalar, sum of the routers' local objectives
    rows: Tensor | None = None        # (B,) batch index of each trace row; None: batch order
    inverse: Tensor | None = None     # (B,) trace row of each sample

    def in_trace_order(self, t: Tensor) -> Tensor:
        """A per-sample tensor in batch order (labels, say), reordered like the trace's rows."""
        return t if self.rows is None else t[self.rows]

    def in_batch_order(self, t: Tensor) -> Tensor:
        return t if self.inverse is None else t[self.inverse]


class AreaMLP(nn.Module):
    """MLP whose every linear layer has K areas; a router picks one area per sample.

    Usage::

        model = AreaMLP(64, 10, ModelConfig(depth=1, width=256), generator=torch.Generator().manual_seed(0))
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
        super().__init__()
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if not isinstance(config.routing_config.areas, int):
            raise ConfigError("areas 'auto' follow the training set's size: resolve them first with "
                              "torchsal.config.resolve_areas(config, n_train), as the trainer does, or give a number")
        self.config = config
        self.dtype = dtype = getattr(torch, config.dtype)
        rc = config.routing_config
        sizes = [in_features] + [config.width] * config.depth + [num_classes]
        # Residual blocks: hidden layers 2..depth. Their branches start small (1/sqrt(depth)) so that the sum of
        # 128 branches does not swamp the signal at initialisation.
        self.residual = [config.block == "residual" and 0 < i < config.depth for i in range(len(sizes) - 1)]
        self.layers = nn.ModuleList(
            AreaLinear(n_in, n_out, rc.areas, config.shared, generator,
                       gain=1 / math.sqrt(config.depth) if res else 1.0, owned=owned, dtype=dtype)
            for n_in, n_out, res in zip(sizes, sizes[1:], self.residual))
        # Pre-norm of each residual block, and the final norm before the head.
        normed = [*self.residual[:-1], config.norm != "none"]
        self.norms = nn.ModuleList(_norm(config.norm, n, dtype) if on and config.norm != "none" else nn.Identity()
                                   for n, on in zip(sizes[:-1], normed))
        self.activation = nn.ReLU()
        routed_inputs = [] if rc.areas == 1 else sizes[:1] if rc.routing == "input" else sizes[:-1]
        self.routers = nn.ModuleList(Router(n, rc, generator, dtype) for n in routed_inputs)

    @property
    def sizes(self) -> list[int]:
        return [self.layers[0].in_features] + [layer.out_features for layer in self.layers]

    def forward(self, x: Tensor) -> Tensor:
        trace = self.trace(x)
        return trace.in_batch_order(trace.logits)

    def trace(self, x: Tensor, *, detach: bool = False, feedback: Sequence[Tensor | None] | None = None,
              on_hidden: Callable[[int, Tensor, Groups | None, Tensor | None], None] | None = None) -> Trace:
        """Forward pass recording what rules need.

        Args:
            detach: cut the graph at every layer input, so each layer's graph holds only its own parameters.
            feedback: per linear layer, a fixed (out, in) matrix that replaces the transposed weights on the
                way back to that layer's input (feedback alignment), or None.
            on_hidden: called with (layer index, h_l, its layer's grouping, the batch index of each row of h_l
                or None for batch order) as soon as hidden layer l is computed; the hidden outputs are then not
                kept (lean memory: a layer may update and free its graph at once).
        """
        self._check_input(x)
        x = x.to(self.dtype)                # inputs follow the weights (bfloat16 models take float32 data)
        routing_loss = x.new_zeros(())
        area, groups, rows, inverse, grouped = None, None, None, None, False
        hidden, areas, layer_groups = [], [], []
        h = x
        for i, layer in enumerate(self.layers):
            h_in = h.detach() if detach else h
            if i < len(self.routers):   # input routing: router 0 only, its areas reused by every layer
                area, loss = self.routers[i](h_in)
                routing_loss = routing_loss + loss
                groups = group_by_area(area, self.config.routing_config.areas)
                if len(self.routers) == 1:      # group the rows once, for every layer
                    rows, inverse, grouped = groups.order, groups.inverse, True
                    h_in = h_in[rows]
            areas.append(area)
            layer_groups.append(groups)
            h_norm = self.norms[i](h_in)
            fb = None if feedback is None else feedback[i]
            if groups is None or grouped:
                a = layer(h_norm, groups, fb)
            else:                           # layer routing: this layer's own grouping, batch order outside it
                a = layer(h_norm[groups.order], groups, fb)[groups.inverse]
            if i == len(self.layers) - 1:
                return Trace(a, hidden, areas, layer_groups, routing_loss, rows, inverse)
            h = h_in + self.activation(a) if self.residual[i] else self.activation(a)
            if on_hidden is None:
                hidden.append(h)
            else:
                on_hidden(i, h, groups, rows)
        raise AssertionError("unreachable: the model has at least one layer")

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"expected input of shape (batch, {self.sizes[0]}), got {tuple(x.shape)}")

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every process holds a copy of: all of them, except the areas of area-parallel layers."""
        sharded = {id(p) for layer in self.layers if layer.sharded for p in (layer.weight, layer.bias)}
        return [p for p in self.parameters() if id(p) not in sharded]

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters of the whole model (all areas, also when this process holds only a shard of them, as
        under ``--parallel area``), parameters used per sample (one area per layer, shared paths, routers) and,
        for a shard, the parameters this process holds."""
        router = sum(p.numel() for p in self.routers.parameters())
        held = sum(p.numel() for p in self.parameters())
        elsewhere = sum((layer.areas - len(layer.owned)) * (layer.in_features + 1) * layer.out_features
                        for layer in self.layers)
        counts = {"params_total": held + elsewhere,
                  "params_active_per_sample": router + sum(layer.active_parameters() for layer in self.layers)}
        return {**counts, "params_held_by_this_process": held} if elsewhere else counts


def _norm(kind: str, features: int, dtype: torch.dtype) -> nn.Module:
    return nn.LayerNorm(features, dtype=dtype) if kind == "layer" else nn.RMSNorm(features, dtype=dtype)


def build_model(in_features: int, num_classes: int, config: ModelConfig, seed: int = 0,
                owned: range | None = None) -> AreaMLP:
    """The model for a run, initialised from its own seeded generator; with ``owned``, only those areas of each
    layer are held (with the values they have in the full model)."""
    return AreaMLP(in_features, num_classes, config, torch.Generator().manual_seed(seed), owned)


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
