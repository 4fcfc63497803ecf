"""torchsal.optim: torch's own update on the touched areas only; stock optimizers that would move the others are
refused."""

import subprocess
import sys

import pytest
import torch

from torchsal import optim
from torchsal.dispatch import area_linear
from torchsal.errors import ConfigError
from torchsal.layers import AreaLinear

KINDS = {"sgd-momentum": (optim.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
         "adam": (optim.Adam, torch.optim.Adam, {"lr": 0.01}),
         "adamw": (optim.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1})}


def backward(weight, area, seed):
    x = torch.randn(len(area), weight.shape[2], generator=torch.Generator().manual_seed(seed))
    (area_linear(x, torch.tensor(area), weight) ** 2).sum().backward()


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("fused", [False, True])
def test_touched_areas_move_as_under_the_stock_optimizer_and_the_others_not_at_all(kind, fused):
    """Each touched area gets exactly the stock update of its slice; untouched areas and their state are
    bit-identical; when every area is touched the step is the stock step on the whole tensor."""
    ours_cls, stock_cls, hyper = KINDS[kind]
    weight = torch.nn.Parameter(torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0)))
    ours = ours_cls([weight], fused=fused, **hyper)
    reference = torch.nn.Parameter(weight.detach().clone())
    stock = stock_cls([reference], fused=fused, **hyper)
    for seed, area in enumerate([[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 4], [1, 1, 3]]):   # last step: areas 1, 3
        before = [weight.detach().clone(), {k: v.clone() for k, v in ours.state[weight].items()}]
        ours.zero_grad()
        backward(weight, area, seed)
        ours.step()
        if seed < 2:                                     # every area touched: the stock step, bit for bit
            stock.zero_grad()
            backward(reference, area, seed)
            stock.step()
            assert torch.equal(weight, reference)
    untouched = [0, 2, 4]
    assert torch.equal(weight[untouched], before[0][untouched])
    for key, value in ours.state[weight].items():
        if value.dim() > 0:
            assert torch.equal(value[untouched], before[1][key][untouched]), key
    # the touched areas: the stock update applied to their slices alone, from the state they had
    touched = [1, 3]
    alone = torch.nn.Parameter(before[0][touched].clone())
    alone.grad = weight.grad[touched].clone()
    stock_alone = stock_cls([alone], fused=fused, **hyper)
    stock_alone.state[alone] = {k: v[touched].clone() if v.dim() > 0 else v.clone() for k, v in before[1].items()}
    stock_alone.step()
    # (to rounding: a fused kernel may split a shorter tensor differently between vector and scalar code)
    torch.testing.assert_close(weight[touched], alone, rtol=1e-6, atol=1e-6)
    assert not torch.equal(alone, before[0][touched])


def test_a_stock_optimizer_that_would_move_untouched_areas_is_refused():
    weight = AreaLinear(3, 2, 4, shared=False).weight          # an area layer built installs the guard
    stock = torch.optim.AdamW([weight], lr=0.1)
    backward(weight, [0, 1], 0)
    with pytest.raises(ConfigError, match="use torchsal.optim.AdamW"):
        stock.step()
    plain = torch.optim.SGD([weight], lr=0.1)            # lr only: a zero gradient moves nothing, so allowed
    before = weight.detach().clone()
    plain.step()
    assert torch.equal(weight[2:], before[2:]) and not torch.equal(weight[:2], before[:2])


def test_importing_torchsal_leaves_every_optimizer_alone():
    """The guard comes with the first area layer, not with the import; then it looks only at optimizers that
    hold area parameters (a stock Adam on other parameters keeps stepping)."""
    code = ("import torch, torchsal\n"
            "from torch.optim.optimizer import _global_optimizer_pre_hooks as hooks\n"
            "assert not hooks, hooks\n"
            "layer = torchsal.layers.AreaLinear(3, 2, 4, shared=False)\n"
            "assert len(hooks) == 1\n"
            "p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.Adam([p], lr=0.1)\n"
            "p.sum().backward(); opt.step(); assert not torchsal.optim._holds_area_parameters(opt)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


IN_BACKWARD = {"sgd": (optim.SGD, {"lr": 0.5}),
               "adam": (optim.Adam, {"lr": 0.05, "fused": True}),
               "adamw": (optim.AdamW, {"lr": 0.05, "weight_decay": 0.1, "fused": True}),
               "adamw-amsgrad": (optim.AdamW, {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True, "fused": True})}


@pytest.mark.parametrize("batch", [6, 300])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("call", ["backward", "step"])
@pytest.mark.parametrize("kind", sorted(IN_BACKWARD))
def test_updates_applied_in_backward_equal_the_gradient_then_the_step(batch, mixed, call, kind, layout):
    """The trainer's fast path (updates_in_backward: plain SGD applied as one product per area; fused Adam area by
    area from each area's gradient formed in cache, whole for a parameter without areas or one whose every area had
    rows; no .grad written) moves every parameter, and leaves the
    optimizer's state, as computing the gradient and stepping does, and leaves untouched areas and their state
    bit-identical; 300 rows over 8 areas fold the shared path into the areas' product. ``step``: the same through
    the rule's one-call step (the closed form in fp32, autograd under autocast)."""
    from conftest import tiny

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 5, generator=g), torch.randint(3, (batch,), generator=g)
    cls, hyper = IN_BACKWARD[kind]
    states, used = [], set()
    for fast in (False, True):
        model, rule = tiny("sal", areas=8, shared=True, width=8)
        with torch.no_grad():                   # biases start at zero: random ones, so that a wrong step shows
            for name, p in model.named_parameters():
                if name.endswith("linear.bias"):
                    p.normal_(generator=torch.Generator().manual_seed(1))
        initial = {name: value.clone() for name, value in model.state_dict().items()}
        optimizer = cls(model.parameters(), **hyper)
        for _ in range(3):
            used |= set(model.routers[0](x)[0].tolist())
            optimizer.zero_grad()
            with optim.updates_in_backward(optimizer) if fast else torch.enable_grad(), \
                    torch.autocast("cpu", torch.bfloat16, enabled=mixed):      # --precision bf16-mixed
                if call == "step":
                    rule.step(model, x, y)
                else:
                    rule(model, x, y).loss.backward()
            optimizer.step()
        grads = {name: p.grad for name, p in model.named_parameters()}
        if fast:
            # stepped in their own backward, no .grad: the router's projection; the first layer's areas (plain SGD,
            # or Adam area by area where they are not gathered per row); under Adam every area parameter where
            # every area had rows (300 rows over 8 areas), stepped whole
            assert grads["routers.0.projection.weight"] is None
            assert (kind == "sgd" or layout == "grouped" or batch == 300) == (grads["blocks.0.linear.weight"] is None)
            if kind != "sgd" and batch == 300:
                assert all(grads[name] is None for name in grads if name.endswith(("linear.weight", "linear.bias")))
        else:
            assert all(g is not None for g in grads.values())
        states.append((model.state_dict(), {name: optimizer.state[p] for name, p in model.named_parameters()}))
    untouched = sorted(set(range(8)) - used)
    assert untouched or batch > 8, "the small batch must leave an area unused"
    (slow, slow_state), (fast, fast_state) = states
    for name, value in slow.items():
        torch.testing.assert_close(fast[name], value, rtol=1e-5, atol=1e-6, msg=name)
    areas = [name for name in slow if name.endswith(("linear.weight", "linear.bias"))]     # (K, ...) parameters
    assert len(areas) == 6
    for name in areas:
        assert torch.equal(fast[name][untouched], initial[name][untouched]), name
        for key, moment in fast_state[name].items():
            if moment.dim() > 0:
                assert not moment[untouched].any(), (name, key)
    for name, state in slow_state.items():
        assert state.keys() == fast_state[name].keys(), name
        for key, value in state.items():
            torch.testing.assert_close(fast_state[name][key], value, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_sync_free_masked_step_equals_the_view_step(kind, monkeypatch):
    """On a GPU the touched mask is never read on the host: the whole tensor steps and untouched areas and their
    state are put back. Forced here on CPU, it must give what the view step gives."""
    ours_cls, _, hyper = KINDS[kind]
    results = []
    for masked in (False, True):
        monkeypatch.setattr(optim, "_host_reads_free", lambda p, masked=masked: not masked)
        weight = torch.nn.Parameter(torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0)))
        opt = ours_cls([weight], **hyper)
        for seed, area in enumerate([[1, 1, 3], [0, 1, 2, 3, 4], [2, 4]]):
            opt.zero_grad()
            backward(weight, area, seed)
            opt.step()
        results.append((weight.detach().clone(), {k: v.clone() for k, v in opt.state[weight].items()}))
    (w_views, s_views), (w_masked, s_masked) = results
    torch.testing.assert_close(w_masked, w_views, rtol=1e-6, atol=1e-6)
    assert torch.equal(w_masked[[0]], w_views[[0]])                     # area 0: one touch, same update
    for key in s_views:
        torch.testing.assert_close(s_masked[key], s_views[key], rtol=1e-6, atol=1e-6)


def _block_and_apart(count=4, shape=(3, 2, 5), seed=0):
    """The same parameters twice: as views of one block (a layer stack's layout) and each on its own memory."""
    block = torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))
    in_block = [torch.nn.Parameter(view) for view in block.unbind(0)]
    apart = [torch.nn.Parameter(view.clone()) for view in block.unbind(0)]
    return in_block, apart


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(4, 4, 8), (3, 2, 5)])
def test_parameters_back_to_back_step_as_one_tensor(kind, fused, shape):
    """Parameters, gradients and state lying back to back in one block step as one flat tensor: the same update
    and state as the parameters held apart, bit for bit (a fused kernel rounds the last elements of a tensor in
    scalar code, so with sizes not a multiple of its vectors, to the last bit); their state becomes views of one
    block."""
    ours_cls, _, hyper = KINDS[kind]
    in_block, apart = _block_and_apart(shape=shape)
    same = torch.equal if not fused or shape == (4, 4, 8) else \
        (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=0))
    joined, separate = ours_cls(in_block, fused=fused, **hyper), ours_cls(apart, fused=fused, **hyper)
    for seed in range(3):
        grads = torch.randn(len(in_block), *shape, generator=torch.Generator().manual_seed(seed))
        for p, q, g in zip(in_block, apart, grads.unbind(0)):
            p.grad, q.grad = g, g.clone()                  # views of one gradient block, and copies
        joined.step()
        separate.step()
        for p, q in zip(in_block, apart):
            assert same(p, q)
            for key, value in separate.state[q].items():
                assert same(joined.state[p][key], value), key
    moments = [k for k, v in joined.state[in_block[0]].items() if torch.is_tensor(v) and v.dim() > 0]
    assert moments and all(optim.back_to_back([joined.state[p][k] for p in in_block]) is not None for k in moments)
    assert all(optim.back_to_back([separate.state[q][k] for q in apart]) is None for k in moments)


def _moment(opt, p):
    return next(k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim() > 0)


# What may change between steps under a join kept from the step before, done to the parameters in one block (first
# function) and to the same parameters held apart (second).
CHANGES = {
    "parameter moved": (lambda opt, ps: setattr(ps[1], "data", ps[1].data.clone()), lambda opt, ps: None),
    "state replaced": [(lambda opt, ps: opt.state[ps[2]].__setitem__(_moment(opt, ps[2]),
                                                                     opt.state[ps[2]][_moment(opt, ps[2])] * 0.5))] * 2,
    "state changed in place": [lambda opt, ps: opt.state[ps[0]][_moment(opt, ps[0])].add_(1.0)] * 2,
    "gradient apart": [lambda opt, ps: setattr(ps[3], "grad", ps[3].grad.clone())] * 2,
    "no gradient": [lambda opt, ps: setattr(ps[0], "grad", None)] * 2,
    "state reloaded": (lambda opt, ps: opt.load_state_dict(opt.state_dict()), lambda opt, ps: None),
    "step count changed": [lambda opt, ps: opt.state[ps[1]]["step"].sub_(1) if "step" in opt.state[ps[1]]
                           else None] * 2,
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_kept_join_gives_way_to_whatever_changed(kind, change):
    """The join found at one step is kept for the next while parameters, gradients and state lie as they did:
    whatever changed in between (a parameter moved, state replaced or reloaded, a gradient apart or missing, a step
    count apart), the steps after it are those of the parameters held apart, bit for bit, step counts included."""
    ours_cls, _, hyper = KINDS[kind]
    in_block, apart = _block_and_apart()
    joined, separate = ours_cls(in_block, **hyper), ours_cls(apart, **hyper)
    for seed in range(4):
        grads = torch.randn(4, 3, 2, 5, generator=torch.Generator().manual_seed(seed))
        for p, q, g in zip(in_block, apart, grads.unbind(0)):
            p.grad, q.grad = g, g.clone()
        if seed == 2:
            for apply, (opt, params) in zip(CHANGES[change], ((joined, in_block), (separate, apart))):
                apply(opt, params)
        joined.step()
        separate.step()
        for p, q in zip(in_block, apart):
            assert torch.equal(p, q), seed
            assert joined.state[p].keys() == separate.state[q].keys()
            for key, value in separate.state[q].items():
                assert torch.equal(torch.as_tensor(joined.state[p][key]), torch.as_tensor(value)), (seed, key)


@pytest.mark.parametrize("kind", ["adam", "sgd-momentum"])
def test_state_loaded_apart_is_joined_again_and_steps_alike(kind):
    """After ``load_state_dict`` the state lies apart: the next step joins it into one block and updates as
    before; a parameter stepped fewer times (other step count) steps on its own."""
    ours_cls, _, hyper = KINDS[kind]
    in_block, apart = _block_and_apart()
    first, separate = ours_cls(in_block, **hyper), ours_cls(apart, **hyper)
    for opt, params in ((first, in_block), (separate, apart)):
        for p, g in zip(params, torch.randn(4, 3, 2, 5, generator=torch.Generator().manual_seed(1)).unbind(0)):
            p.grad = g.clone()
        opt.step()
    reloaded = ours_cls(in_block, **hyper)
    reloaded.load_state_dict(first.state_dict())
    grads = torch.randn(4, 3, 2, 5, generator=torch.Generator().manual_seed(2))
    for p, q, g in zip(in_block, apart, grads.unbind(0)):
        p.grad, q.grad = g, g.clone()
    reloaded.step()
    separate.step()
    for p, q in zip(in_block, apart):
        assert torch.equal(p, q)
        for key, value in separate.state[q].items():
            assert torch.equal(reloaded.state[p][key], value), key
    if kind == "adam":                                    # one count behind: the run steps parameter by parameter
        reloaded.state[in_block[1]]["step"] -= 1
        for p, g in zip(in_block, grads.unbind(0)):
            p.grad = g
        steps = [float(reloaded.state[p]["step"]) for p in in_block]
        reloaded.step()
        assert [float(reloaded.state[p]["step"]) for p in in_block] == [s + 1 for s in steps]
