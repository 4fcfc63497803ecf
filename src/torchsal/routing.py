"""Learned-frozen decoupled routing: a learnable projection, frozen prototypes, hard single-area selection.

    z = normalize(P x + c)          P: (r, d) learnable, r = routing dim
    s = z C^T                       C: (K, r) frozen unit prototypes (orthonormal rows when K <= r)
    area = argmax_j s_j             exactly one area per sample

The projection learns only from a local routing objective (no task gradient reaches it): cross-entropy between
``softmax(s / T)`` and a *balanced* soft assignment of the batch computed by Sinkhorn-Knopp on ``s`` (as in
SwAV). The balanced target pulls each sample towards an area while forcing the batch to spread evenly over all
areas, so the partition neither collapses into one area (what commitment plus a weak balance term did in our
prototype) nor drifts: prototypes never move and each sample is pulled towards the area it already prefers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsal.config import RoutingConfig
from torchsal.dispatch import accumulate_gradient, step_or_gradient, step_product_or_gradient
from torchsal.distributed import all_gather_rows
from torchsal.profiling import named_range


def route(z: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """Hard selection. ``z`` (B, r) and ``prototypes`` (K, r) unit rows -> ``(area (B,) int64, scores (B, K))``."""
    scores = z @ prototypes.T
    return scores.argmax(dim=1), scores


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Balanced soft assignment (B, K) of a batch to K areas: rows sum to 1, columns to B/K (approximately).

    Sinkhorn-Knopp on ``exp(scores / epsilon)``, as SwAV; a few iterations suffice (SwAV uses 3). Scores are
    cosines in [-1, 1], so the kernel lies within exp(+-1 / epsilon) = exp(+-20) at epsilon 0.05: no overflow or
    underflow in float32, and two kernels per half-iteration instead of the log domain's ten (the routing step's
    cost at small batches is the number of kernels, not their size). The textbook iteration's constant factors
    (columns to 1/K, rows to 1/B) cancel in the next normalisation, so each step normalises to 1.
    """
    q = torch.exp(scores.float() / epsilon)
    for _ in range(iterations):
        q.div_(q.sum(dim=0, keepdim=True))          # columns sum to 1 (to about B/K after the last row step)
        q.div_(q.sum(dim=1, keepdim=True))          # rows sum to 1
    return q


def routing_loss(scores: Tensor, temperature: float) -> Tensor:
    """Local routing objective: CE between ``softmax(scores / T)`` and the batch's balanced assignment."""
    return -(balanced_target(scores) * F.log_softmax(scores / temperature, dim=1)).sum(dim=1).mean()


def balanced_target(scores: Tensor) -> Tensor:
    """Sinkhorn's balanced assignment of this process's rows; in a data-parallel run it is computed over the
    global batch (every rank's scores)."""
    everyone, offset = all_gather_rows(scores.detach())
    return sinkhorn(everyone)[offset: offset + scores.shape[0]]


def _learned_routing(x: Tensor, weight: Tensor, bias: Tensor, prototypes: Tensor,
                     temperature: float) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """A learned router's forward pass without autograd: ``(area, routing loss, what its gradient needs)``."""
    u = F.linear(x, weight, bias)
    norm = torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min_(1e-12)
    z = u / norm
    scores = z @ prototypes.T
    target = balanced_target(scores)
    wide = torch.promote_types(scores.dtype, torch.float32)     # bfloat16 models: the loss in float32
    log_p = F.log_softmax(scores.to(wide) / temperature, dim=1)
    loss = torch.vdot(target.to(wide).flatten(), log_p.flatten()) / -scores.shape[0]
    return scores.argmax(dim=1), loss, (x, z, norm, prototypes, log_p, target)


def _projection_gradient(saved: tuple[Tensor, ...], grad: Tensor | float, temperature: float) -> Tensor:
    """The routing loss's gradient at the projection's output ``u``, from the loss's gradient ``grad``."""
    _, z, norm, prototypes, log_p, target = saved
    ds = log_p.exp().sub_(target.to(log_p.dtype)).mul_(grad / (log_p.shape[0] * temperature))
    z = z.to(ds.dtype)
    dz = ds @ prototypes.to(ds.dtype)
    return dz.sub_(z * (z * dz).sum(dim=1, keepdim=True)).div_(norm.to(ds.dtype))


def _step_or_gradients(x: Tensor, du: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of the projection's weight and bias (those that require one) from the gradient ``du`` at its
    output, or None for those plain SGD steps here (``dispatch.step_or_gradient``)."""
    return (step_product_or_gradient(weight, du.T, x) if weight.requires_grad else None,
            step_or_gradient(bias, du.sum(0)) if bias.requires_grad else None)


class _LearnedRouting(torch.autograd.Function):
    """A learned router's step in one node, ``(area, routing_loss(normalize(x P^T + c) C^T, T))``, its backward
    written out. Autograd of the plain expression ran about 60 small kernels (0.30 ms at batch 16 and 784
    features: more than half of a dense 784-256-10 training step); the closed form runs a dozen:

        ds = (softmax(s / T) - target) / (B T)          dz = ds C
        du = (dz - z (z . dz)) / |u|                    (the normalisation's Jacobian, |u| clamped as F.normalize)
        dP = du^T x,  dc = sum_i du_i
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, prototypes: Tensor,  # noqa: ANN001
                temperature: float) -> tuple[Tensor, Tensor]:
        area, loss, saved = _learned_routing(x, weight, bias, prototypes, temperature)
        ctx.save_for_backward(*saved)
        ctx.temperature, ctx.params = temperature, (weight, bias)
        ctx.mark_non_differentiable(area)
        return area, loss

    @staticmethod
    def backward(ctx, _: Tensor | None, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        du = _projection_gradient(ctx.saved_tensors, grad, ctx.temperature)
        return None, *_step_or_gradients(ctx.saved_tensors[0], du, *ctx.params), None, None


def make_prototypes(areas: int, dim: int, generator: torch.Generator) -> Tensor:
    """K unit prototypes in R^r: orthonormal rows when K <= r, random unit vectors otherwise."""
    g = torch.randn(max(areas, dim), dim, generator=generator)
    if areas <= dim:
        q, _ = torch.linalg.qr(g)           # (dim, dim) orthonormal columns
        return q[:areas].contiguous()       # rows of an orthogonal matrix are orthonormal
    return F.normalize(g[:areas], dim=1)


class Router(nn.Module):
    """Chooses one area per sample; ``forward`` returns ``(area, loss)``, the loss being the routing objective.

    Usage::

        router = Router(in_features=64, config=RoutingConfig(areas=16), generator=torch.Generator().manual_seed(0))
        area, loss = router(x)     # area: (B,) in [0, 16)

    The router sees a detached input: routing is a local module that no other objective trains.
    """

    def __init__(self, in_features: int, config: RoutingConfig, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.projection = nn.Linear(in_features, config.routing_dim, dtype=dtype)
        nn.init.normal_(self.projection.weight, std=in_features ** -0.5, generator=generator)
        nn.init.zeros_(self.projection.bias)
        self.projection.requires_grad_(config.router == "learned")
        self.register_buffer("prototypes", make_prototypes(config.areas, config.routing_dim, generator).to(dtype))

    @property
    def areas(self) -> int:
        return self.config.areas

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with named_range("torchsal.route"):      # a named range for profiles (benchmarks/scale.py)
            return self._route(x)

    def _route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.config.router == "random":
            area = torch.randint(self.areas, (x.shape[0],), device=x.device)
            return area, x.new_zeros(())
        if self.config.router == "learned" and self.training and torch.is_grad_enabled():
            return _LearnedRouting.apply(x.detach(), self.projection.weight, self.projection.bias,
                                         self.prototypes, self.config.routing_temperature)
        area, scores = route(F.normalize(self.projection(x.detach()), dim=1), self.prototypes)
        return area, scores.new_zeros(())

    def local_step(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """``forward`` without autograd: ``(area, loss, state)``, ``state`` being what ``learn`` needs (None when
        there is nothing to learn): the input and the loss's gradient at the projection's output, the loss taken
        with weight 1 as it enters the step's loss. For a step that forms its updates in closed form
        (torchsal.closed_form)."""
        with named_range("torchsal.route"), torch.no_grad():
            if self.config.router == "learned" and self.training:
                temperature = self.config.routing_temperature
                area, loss, saved = _learned_routing(x, self.projection.weight, self.projection.bias,
                                                     self.prototypes, temperature)
                return area, loss, (x, _projection_gradient(saved, 1.0, temperature))
            return *self._route(x), None

    @torch.no_grad()
    def learn(self, state: tuple[Tensor, Tensor]) -> None:
        """The projection's update from ``local_step``'s state, as the autograd step leaves it: accumulated into
        ``.grad``, or stepped in place under plain SGD (``optim.updates_in_backward``)."""
        with named_range("torchsal.route"):
            weight, bias = self.projection.weight, self.projection.bias
            for p, g in zip((weight, bias), _step_or_gradients(*state, weight, bias)):
                accumulate_gradient(p, g)

    def extra_repr(self) -> str:
        return f"areas={self.areas}, routing_dim={self.config.routing_dim}, router={self.config.router}"
