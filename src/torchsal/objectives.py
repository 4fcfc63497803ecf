"""Learned local objectives: what a hidden block's output should do, as a loss on that output alone.

A local rule (dfa, sal) cuts the graph at every block input, so a block learns only from a loss on its own output.
The ``readout`` objective (torchsal.rules.local) reads the output through a *fixed random* matrix; the objectives
here follow Nøkland & Eidnes 2019 ("Training neural networks with local error signals", ``anokland/local-loss``):

- ``pred``: a *learned* classifier per block (``LocalHead``) on the block's output average-pooled to at most
  ``pool`` x ``pool``, trained with the block by cross-entropy on the labels.
- ``sim``: similarity matching. A learned width-preserving layer (``SimilarityHead``: 3x3 conv on maps, linear on
  features) reads the output; the cosine-similarity matrix of what it reads within the batch is matched (mean
  squared error) to that of the one-hot labels: samples of a class should look alike, samples of different
  classes should not.
- ``predsim``: ``(1 - w) pred + w sim`` (``w = sim_weight``: 0.99 as in the paper; sal on conv nets: 0.7).

With ``feedback="fixed"`` (the *bpf* variants) each head layer still learns its own weights from its loss, but the
error reaches the layer's input through a fixed random tensor instead of the layer's transposed weights, so no
weight is transported anywhere: SAL's premise. With ``feedback="weights"`` a head's error goes back through the
head's own weights: a one-layer weight transport that stays inside the block's objective, as in predsim.

Heads are used only for learning: they are not part of the model's forward pass, nor of inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsal.feedback import feedback_point, random_tensor


def pooled_shape(shape: tuple[int, ...], pool: int) -> tuple[int, ...]:
    """What a local readout or head sees of a hidden output of ``shape``: features as they are, maps
    average-pooled to at most ``pool`` x ``pool``."""
    return shape if len(shape) == 1 else (shape[0], *(min(pool, side) for side in shape[1:]))


def pooled(h: Tensor, pool: int) -> Tensor:
    """(B, features): ``h`` itself, or a map average-pooled to at most ``pool`` x ``pool`` and flattened."""
    return h if h.dim() == 2 else F.adaptive_avg_pool2d(h, pooled_shape(h.shape[1:], pool)[1:]).flatten(1)


def similarity(x: Tensor) -> Tensor:
    """(B, B) cosine similarities of the rows of ``x`` (B, F) after centring each row, as predsim computes them."""
    centred = x - x.mean(1, keepdim=True)
    unit = centred / (centred.norm(dim=1, keepdim=True) + 1e-8)
    return (unit @ unit.T).clamp(-1, 1)


def similarity_loss(features: Tensor, onehot: Tensor) -> Tensor:
    """Mean squared difference between the similarity matrices of ``features`` and of the one-hot labels."""
    return F.mse_loss(similarity(features.float()), similarity(onehot.float()))


class FixedFeedbackLayer(nn.Module):
    """A learned linear map (weight ``(out, in)``) or 3x3 convolution (``(out, in, 3, 3)``, padding 1) of a local
    objective, initialised like torch's layers (uniform, bound 1/sqrt(fan_in)) from ``generator``. With
    ``fixed_feedback`` its error reaches its input through a fixed random tensor of the weight's shape instead of
    the weight itself (bpf); its own weights learn as usual."""

    def __init__(self, shape: tuple[int, ...], fixed_feedback: bool, generator: torch.Generator) -> None:
        super().__init__()
        fan_in = math.prod(shape[1:])
        self.weight = nn.Parameter(random_tensor(shape, fan_in, generator))
        self.bias = nn.Parameter(random_tensor(shape[:1], fan_in, generator))
        # bpf: the weights start equal to their fixed feedback, so the error path is aligned from the first step
        self.register_buffer("feedback", self.weight.detach().clone() if fixed_feedback else None)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.weight.dim() == 4
        source = x if self.feedback is None else x.detach()
        a = F.conv2d(source, self.weight, self.bias, padding=1) if conv else F.linear(source, self.weight, self.bias)
        if self.feedback is None:
            return a
        return feedback_point(x, a, self.feedback, _send_conv) if conv else feedback_point(x, a, self.feedback)


def _send_conv(grad: Tensor, feedback: Tensor, shape: torch.Size) -> Tensor:
    return torch.nn.grad.conv2d_input(shape, feedback.to(grad.dtype), grad, padding=1)


def _width_preserving(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The weight shape of a layer that keeps a block output's width: a 3x3 convolution on maps, linear else."""
    return (shape[0], shape[0], 3, 3) if len(shape) == 3 else (shape[0], shape[0])


class LocalHead(nn.Module):
    """A hidden block's learned local classifier: ``hidden`` 3x3 conv + ReLU layers on a map (linear + ReLU on
    features), average pooling to at most ``pool`` x ``pool``, then a linear map to the classes. With
    ``hidden=0`` it is predsim's linear head; with 1-2, Belilovsky et al.'s (2019) auxiliary heads.

    Usage::

        head = LocalHead((32, 14, 14), 10, pool=2, hidden=0, fixed_feedback=True, generator=g)
        loss = F.cross_entropy(head(h), y)      # h: a block's output (B, 32, 14, 14)

    Args:
        shape: one sample's block output, ``(features,)`` or ``(channels, height, width)``.
        classes: outputs of the classifier.
        pool: side a map is average-pooled to (at most) before the linear map.
        hidden: layers before the pooling, each keeping the block's width.
        fixed_feedback: send each layer's error to its input through a fixed random tensor, not its weights (bpf).
        generator: draws the weights and the fixed tensors.
    """

    def __init__(self, shape: tuple[int, ...], classes: int, pool: int, hidden: int, fixed_feedback: bool,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.pool = pool
        self.hidden = nn.ModuleList(FixedFeedbackLayer(_width_preserving(shape), fixed_feedback, generator)
                                    for _ in range(hidden))
        self.out = FixedFeedbackLayer((classes, math.prod(pooled_shape(shape, pool))), fixed_feedback, generator)

    def forward(self, h: Tensor) -> Tensor:
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.out(pooled(h, self.pool))


class SimilarityHead(nn.Module):
    """What the similarity term reads of a block output: a learned width-preserving layer (3x3 convolution on
    maps, linear on features), then on a map each channel's standard deviation over space, as Nøkland & Eidnes
    do: (B, features) rows whose similarities are matched to the labels'."""

    def __init__(self, shape: tuple[int, ...], fixed_feedback: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.project = FixedFeedbackLayer(_width_preserving(shape), fixed_feedback, generator)

    def forward(self, h: Tensor) -> Tensor:
        z = self.project(h)
        return z.flatten(1) if z.dim() == 2 or z.shape[2] * z.shape[3] == 1 else z.flatten(2).std(2)


class LocalObjective(nn.Module):
    """Every hidden block's learned local loss (``pred``, ``sim`` or ``predsim``) and the heads it learns with.

    Usage::

        objective = LocalObjective([(32, 14, 14), (84,)], 10, "predsim", generator=g)
        loss = objective(trace.hidden, labels)     # sum over blocks; its backward trains blocks and heads

    Args:
        shapes: each hidden block's output shape (one sample).
        classes: number of classes.
        kind: ``pred``, ``sim`` or ``predsim``.
        generator: draws the heads.
        pool: the side maps are pooled to before a classifier head.
        head_layers: hidden layers of each classifier head (0: linear).
        feedback: ``weights`` (a head's own, inside the objective) or ``fixed`` (bpf: fixed random tensors).
        sim_weight: predsim's weight ``w`` of the similarity term.
        single: one head of each kind for every block (their outputs must share a shape), as ``--readout single``.
    """

    def __init__(self, shapes: list[tuple[int, ...]], classes: int, kind: str, generator: torch.Generator,
                 pool: int = 2, head_layers: int = 0, feedback: str = "weights", sim_weight: float = 0.99,
                 single: bool = False) -> None:
        super().__init__()
        self.kind, self.classes, self.sim_weight, self.single = kind, classes, sim_weight, single
        fixed, served = feedback == "fixed", shapes[:1] if single else shapes
        self.heads = nn.ModuleList(LocalHead(s, classes, pool, head_layers, fixed, generator)
                                   for s in served if kind in ("pred", "predsim"))
        self.sim_heads = nn.ModuleList(SimilarityHead(s, fixed, generator)
                                       for s in served if kind in ("sim", "predsim"))

    def block_loss(self, index: int, h: Tensor, labels: Tensor) -> Tensor:
        """Block ``index``'s local loss on its output ``h`` (B, ...) for ``labels`` (B,), a batch mean."""
        which = 0 if self.single else index
        pred = F.cross_entropy(self.heads[which](h).float(), labels) if self.heads else None
        sim = similarity_loss(self.sim_heads[which](h), F.one_hot(labels, self.classes)) if self.sim_heads \
            else None
        if pred is None or sim is None:
            return pred if sim is None else sim
        return (1 - self.sim_weight) * pred + self.sim_weight * sim

    def forward(self, hidden: list[Tensor], labels: Tensor) -> Tensor:
        """The sum of every hidden block's local loss."""
        losses = [self.block_loss(i, h, labels) for i, h in enumerate(hidden)]
        return torch.stack(losses).sum() if losses else labels.new_zeros((), dtype=torch.float32)
