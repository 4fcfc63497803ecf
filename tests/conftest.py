import functools

import pytest
import torch

from torchsal.config import ModelConfig, RoutingConfig, RuleConfig
from torchsal.models import build_model
from torchsal.rules import build_rule


def tiny(rule: str = "sal", *, areas: int = 1, shared: bool = False, depth: int = 2, width: int = 4,
         in_features: int = 5, classes: int = 3, signal: str = "local", routing: str = "input", seed: int = 0):
    """A tiny model and rule whose feedback matrices differ from every transposed forward weight."""
    cfg = ModelConfig(depth=depth, width=width, shared=shared,
                      routing_config=RoutingConfig(areas=areas, routing_dim=4, routing=routing))
    model = build_model(in_features, classes, cfg, seed)
    return model, build_rule(model, RuleConfig(rule=rule, signal=signal), seed)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(6, 5, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.fixture(params=["gathered", "grouped"])
def layout(request, monkeypatch):
    """Small banks compute gathered per row (torchsal.dispatch.kernels.gather_pays); "grouped" turns that off, so the
    padded and per-area kernels of larger layers run on the tests' small shapes too."""
    from torchsal import dispatch

    if request.param == "grouped":
        monkeypatch.setattr(dispatch.kernels, "GATHERED_ELEMENTS", 0)
    return request.param


def count_compiled_kernel(monkeypatch, build):
    """Build what ``--compile`` compiles (torchsal.dispatch.compiled_call) with ``build(fn)`` instead of
    torch.compile, counting the calls of what it builds; small banks are not gathered, so that the tests' small
    shapes take the products of larger ones. Returns the calls, by the compiled function's name."""
    from torchsal import dispatch

    calls = []

    def counting(fn):
        built = build(fn)

        def call(*args):
            calls.append(fn.__name__)
            return built(*args)
        return call

    monkeypatch.setattr(dispatch.kernels, "GATHERED_ELEMENTS", 0)
    monkeypatch.setattr(dispatch.compile, "_compiled", functools.cache(counting))
    monkeypatch.setattr(dispatch.compile, "_COMPILE_FAILURE", [])
    return calls
