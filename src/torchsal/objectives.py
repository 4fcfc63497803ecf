"""Learned local objectives: what a hidden block's output should do, as a loss on that output alone.

A local rule (dfa, sal) cuts the graph at every block input, so a block learns only from a loss on its own output.
Today's ``local`` signal uses a *fixed random* readout (torchsal.rules.local); the objectives here follow
Nøkland & Eidnes 2019 ("Training neural networks with local error signals", ``anokland/local-loss``):

- ``pred``: a *learned* classifier per block (``LocalHead``) on the block's output average-pooled to at most
  ``pool`` x ``pool``, trained with the block by cross-entropy on the labels.
- ``sim``: the cosine-similarity matrix of the pooled outputs within the batch is matched (mean squared error) to
  that of the one-hot labels: samples of a class should look alike, samples of different classes should not.
- ``predsim``: ``(1 - w) pred + w sim`` (``w = sim_weight``, 0.99 as in the paper).

With ``feedback="fixed"`` (the *bpf* variants) each head layer still learns its own weights from its loss, but the
error reaches the layer's input through a fixed random tensor instead of the layer's transposed weights, so no
weight is transported anywhere: SAL's premise. With ``feedback="weights"`` the head's error goes back through the
head's own weights: a one-layer weight transport that stays inside the block's objective, as in predsim.

A head is used only for learning: it is not part of the model's forward pass, nor of inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsal.feedback import feedback_point, random_tensor

OBJECTIVES = ("readout", "pred", "sim", "predsim")
HEAD_FEEDBACK = ("weights", "fixed")


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


def _init(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> nn.Parameter:
    """torch's default initialisation of a Linear or Conv2d (uniform, bound 1/sqrt(fan_in)), from ``generator``."""
    return nn.Parameter(random_tensor(shape, fan_in, generator))


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
        fixed_feedback: send each layer's error to its input through a fixed random tensor (bpf), not its weights.
        generator: draws the weights and the fixed tensors.
    """

    def __init__(self, shape: tuple[int, ...], classes: int, pool: int, hidden: int, fixed_feedback: bool,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.pool, self.fixed_feedback = pool, fixed_feedback
        width, is_map = shape[0], len(shape) == 3
        kernel = (width, width, 3, 3) if is_map else (width, width)
        fan = width * 9 if is_map else width
        self.weights = nn.ParameterList(_init(kernel, fan, generator) for _ in range(hidden))
        self.biases = nn.ParameterList(_init((width,), fan, generator) for _ in range(hidden))
        features = math.prod(pooled_shape(shape, pool))
        self.out_weight = _init((classes, features), features, generator)
        self.out_bias = _init((classes,), features, generator)
        # the fixed tensors that carry the error back in place of each layer's weights (bpf): buffers, never learned
        for i in range(hidden):
            self.register_buffer(f"feedback_{i}", random_tensor(kernel, fan, generator) if fixed_feedback else None)
        self.register_buffer("out_feedback", random_tensor((classes, features), features, generator)
                             if fixed_feedback else None)

    def features(self, h: Tensor) -> Tensor:
        """(B, features) the linear map reads: ``h`` through the hidden layers, pooled and flattened."""
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            feedback = getattr(self, f"feedback_{i}")
            h = torch.relu(self._layer(h, w, b, feedback))
        return pooled(h, self.pool)

    def forward(self, h: Tensor) -> Tensor:
        return self._layer(self.features(h), self.out_weight, self.out_bias, self.out_feedback)

    @staticmethod
    def _layer(x: Tensor, weight: Tensor, bias: Tensor, feedback: Tensor | None) -> Tensor:
        conv = weight.dim() == 4
        affine = F.conv2d if conv else F.linear
        if feedback is None:
            return affine(x, weight, bias, padding=1) if conv else affine(x, weight, bias)
        a = affine(x.detach(), weight, bias, padding=1) if conv else affine(x.detach(), weight, bias)
        return feedback_point(x, a, feedback, _send_conv if conv else _send_linear)


def _send_linear(grad: Tensor, feedback: Tensor, shape: torch.Size) -> Tensor:  # noqa: ARG001
    return grad @ feedback


def _send_conv(grad: Tensor, feedback: Tensor, shape: torch.Size) -> Tensor:
    return torch.nn.grad.conv2d_input(shape, feedback, grad, padding=1)


class LocalObjective(nn.Module):
    """Every hidden block's learned local loss (``pred``, ``sim`` or ``predsim``) and the heads it learns with.

    Usage::

        objective = LocalObjective([(32, 14, 14), (84,)], 10, "predsim", generator=g)
        loss = objective(trace.hidden, labels)     # sum over blocks; its backward trains blocks and heads

    Args:
        shapes: each hidden block's output shape (one sample).
        classes: number of classes.
        kind: ``pred``, ``sim`` or ``predsim``.
        pool: the side maps are pooled to before a head or the similarity.
        head_layers: hidden layers of each head (0: linear).
        feedback: ``weights`` (the head's own, inside the objective) or ``fixed`` (bpf: fixed random tensors).
        sim_weight: predsim's weight ``w`` of the similarity term.
        single: one head for every block (their outputs must share a shape), as ``--readout single``.
        generator: draws the heads.
    """

    def __init__(self, shapes: list[tuple[int, ...]], classes: int, kind: str, generator: torch.Generator,
                 pool: int = 2, head_layers: int = 0, feedback: str = "weights", sim_weight: float = 0.99,
                 single: bool = False) -> None:
        super().__init__()
        self.kind, self.classes, self.pool, self.sim_weight = kind, classes, pool, sim_weight
        self.single = single
        needs_head = kind in ("pred", "predsim")
        self.heads = nn.ModuleList(LocalHead(s, classes, pool, head_layers, feedback == "fixed", generator)
                                   for s in (shapes[:1] if single else shapes) if needs_head)

    def block_loss(self, index: int, h: Tensor, labels: Tensor) -> Tensor:
        """Block ``index``'s local loss on its output ``h`` (B, ...) for ``labels`` (B,), a batch mean."""
        parts = []
        head = self.heads[0 if self.single else index] if self.heads else None
        if head is not None:
            pred = F.cross_entropy(head(h).float(), labels)
            parts.append(pred if self.kind == "pred" else (1 - self.sim_weight) * pred)
        if self.kind in ("sim", "predsim"):
            onehot = F.one_hot(labels, self.classes)
            sim = similarity_loss(pooled(h, self.pool), onehot)
            parts.append(sim if self.kind == "sim" else self.sim_weight * sim)
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def forward(self, hidden: list[Tensor], labels: Tensor) -> Tensor:
        """The sum of every hidden block's local loss."""
        losses = [self.block_loss(i, h, labels) for i, h in enumerate(hidden)]
        return torch.stack(losses).sum() if losses else labels.new_zeros((), dtype=torch.float32)
