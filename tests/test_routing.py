import math

import pytest
import torch
import torch.nn.functional as F

from torchsal.config import RoutingConfig
from torchsal.routing import Router, make_prototypes, route, sinkhorn


def make_router(areas=8, router="learned", dim=4):
    return Router(dim, RoutingConfig(areas=areas, routing_dim=16, router=router), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("router", ["learned", "frozen"])
def test_each_sample_goes_to_the_area_of_its_nearest_prototype(router):
    router = make_router(router=router)
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    area, _ = router(x)
    nearest = (F.normalize(router.projection(x), dim=1) @ router.prototypes.T).argmax(1)
    assert area.dtype == torch.long and torch.equal(area, nearest)
    assert len(area.unique()) >= 4                               # the projection spreads the samples


def test_routing_is_a_pure_function_of_the_input():
    router, x = make_router(), torch.randn(50, 4)
    batch_areas, _ = router(x)
    alone = torch.cat([router(x[i:i + 1])[0] for i in range(50)])
    assert torch.equal(batch_areas, alone)                       # independent of the rest of the batch
    assert torch.equal(batch_areas, router(x.flip(0))[0].flip(0))  # and of its order


def test_route_selects_nearest_prototype():
    prototypes = torch.eye(3)
    area, scores = route(torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.0, 0.8]]), prototypes)
    assert area.tolist() == [1, 2] and scores.shape == (2, 3)


def test_prototypes_are_orthonormal_when_they_fit():
    p = make_prototypes(16, 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(p @ p.T, torch.eye(16))
    p = make_prototypes(10, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.norm(dim=1), torch.ones(10))


def test_sinkhorn_balances_a_skewed_batch():
    scores = torch.randn(256, 8, generator=torch.Generator().manual_seed(0)).clamp(-3, 3) / 6
    scores[:, 0] += 0.5                                          # cosine-like scores; everyone prefers area 0
    assert (scores.argmax(1) == 0).float().mean() > 0.9
    q = sinkhorn(scores, iterations=50)
    torch.testing.assert_close(q.sum(1), torch.ones(256))
    torch.testing.assert_close(q.sum(0), torch.full((8,), 32.0), atol=0.5, rtol=0)


def test_learned_router_trains_its_projection_only_locally():
    router = make_router()
    x = torch.randn(64, 4, requires_grad=True)
    _, loss = router(x)
    loss.backward()
    assert router.projection.weight.grad is not None
    assert x.grad is None                                        # no gradient leaves the router


def test_frozen_and_random_routers_have_no_trainable_parameters():
    for kind in ("frozen", "random"):
        router = make_router(router=kind)
        assert not any(p.requires_grad for p in router.parameters())
        _, loss = router(torch.randn(8, 4))
        assert loss.item() == 0.0


def test_learned_routing_spreads_a_collapsed_start_over_all_areas():
    """Uncentred inputs send most samples to one area at first; the routing objective must fix that."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 4, generator=g) * 0.3 + torch.tensor([3.0, 2.0, 1.0, 0.0])
    router = make_router()
    before = torch.bincount(router(x)[0], minlength=8).max().item() / len(x)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(300):
        batch = x[torch.randint(len(x), (256,), generator=g)]
        _, loss = router(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    shares = torch.bincount(router(x)[0], minlength=8) / len(x)
    assert before > 0.5
    assert shares.min() > 0 and shares.max() <= 2 / 8


def test_sinkhorn_equals_the_log_domain_iteration():
    """The exp-domain iteration equals log-domain Sinkhorn-Knopp (no underflow for cosine scores at epsilon 0.05)."""
    scores = torch.nn.functional.normalize(torch.randn(64, 16), dim=1) @ make_prototypes(
        16, 16, torch.Generator().manual_seed(0)).T
    log_q = scores / 0.05
    for _ in range(3):
        log_q = log_q - log_q.logsumexp(dim=0, keepdim=True) - math.log(16)
        log_q = log_q - log_q.logsumexp(dim=1, keepdim=True) - math.log(64)
    torch.testing.assert_close(sinkhorn(scores), (log_q + math.log(64)).exp(), rtol=1e-4, atol=1e-6)


def test_a_shard_reports_the_whole_models_parameters():
    """Under --parallel area a process holds some areas; the run still reports the whole model's size."""
    from torchsal.config import ModelConfig, RoutingConfig
    from torchsal.models import build_model

    cfg = ModelConfig(depth=2, width=16, shared=True, routing_config=RoutingConfig(areas=8))
    whole, shard = build_model(20, 3, cfg), build_model(20, 3, cfg, owned=range(4, 8))
    assert shard.parameter_counts()["params_total"] == whole.parameter_counts()["params_total"]
    assert shard.parameter_counts()["params_held_by_this_process"] < whole.parameter_counts()["params_total"]
    assert "params_held_by_this_process" not in whole.parameter_counts()


def test_learned_routing_step_equals_autograd_of_its_objective():
    """The router's written-out backward gives the projection what autograd of the plain objective gives."""
    router = make_router(areas=8, dim=12).double()
    x = torch.randn(32, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    area, loss = router(x)
    loss.backward()
    fused = router.projection.weight.grad.clone(), router.projection.bias.grad.clone()
    router.zero_grad()
    z = torch.nn.functional.normalize(router.projection(x), dim=1)
    expected_area, scores = route(z, router.prototypes)
    target = sinkhorn(scores.detach()).double()
    expected = -(target * torch.log_softmax(scores / 0.1, dim=1)).sum(1).mean()
    expected.backward()
    assert torch.equal(area, expected_area)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fused[0], router.projection.weight.grad)
    torch.testing.assert_close(fused[1], router.projection.bias.grad)
