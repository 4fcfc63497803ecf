"""Conv nets and users' own models (issue 18): area convolutions, every rule on blocks, conversion, errors."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsal.optim
from torchsal.blocks import BlockNet
from torchsal.config import ModelConfig, RoutingConfig, RuleConfig, check_applicable, make_config
from torchsal.data import crop_flip
from torchsal.dispatch import group_by_area
from torchsal.errors import ConfigError
from torchsal.evaluation import area_shares
from torchsal.layers import AreaConv2d
from torchsal.models import build_model, vgg_depth_plan
from torchsal.objectives import pooled as read_out
from torchsal.rules import build_rule

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3))


def batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g), torch.arange(n) % 3


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_one_area_conv_is_nn_conv2d():
    conv = nn.Conv2d(3, 5, (3, 2), stride=2, padding=1, dilation=1)
    area = BlockNet.from_modules([conv, nn.Flatten()], in_shape=(3, 7, 7)).blocks[0][0]
    assert isinstance(area, AreaConv2d) and area.weight.shape == (1, 5, 3, 3, 2)
    x = torch.randn(4, 3, 7, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    conv(x).square().sum().backward()
    area(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(area.weight.grad[0], conv.weight.grad)
    torch.testing.assert_close(area.bias.grad[0], conv.bias.grad)


@pytest.mark.parametrize("counts_on_host", [True, False])     # False: the padded kernel a GPU runs
def test_grouped_conv_equals_per_sample_reference(counts_on_host):
    torch.manual_seed(0)
    conv = AreaConv2d(2, 3, 3, areas=4, shared=False, padding=1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, 2, 5, 5)
    area = torch.tensor([2, 0, 2, 3, 0, 2, 2])          # area 1 empty
    groups = group_by_area(area, 4)
    if not counts_on_host:
        groups = dataclasses.replace(groups, on_host=False)
    out = conv(x[groups.order], groups)[groups.inverse]
    reference = torch.cat([F.conv2d(x[i: i + 1], conv.weight[k], conv.bias[k], padding=1)
                           for i, k in enumerate(area.tolist())])
    torch.testing.assert_close(out, reference)
    out.square().sum().backward()
    w = conv.weight.detach().requires_grad_()
    b = conv.bias.detach().requires_grad_()
    torch.cat([F.conv2d(x[i: i + 1], w[k], b[k], padding=1) for i, k in enumerate(area.tolist())]).square().sum() \
        .backward()
    torch.testing.assert_close(conv.weight.grad, w.grad)
    torch.testing.assert_close(conv.bias.grad, b.grad)
    assert conv.weight.touched_areas.tolist() == [True, False, True, True]


def test_conversion_keeps_what_the_model_computes():
    x, _ = batch()
    original = small_cnn().eval()
    for areas, shared in ((1, False), (4, False), (4, True)):
        model = BlockNet.from_modules(small_cnn(), (2, 6, 6), areas=areas, shared=shared).eval()
        torch.testing.assert_close(model(x), original(x))
    model = BlockNet.from_modules(small_cnn(), (2, 6, 6))
    assert len(model.blocks) == 3 and model.hidden_shapes == [(3, 3, 3), (4,)] and model.num_classes == 3


def test_bp_on_a_conv_model_is_autograd():
    x, y = batch()
    reference = small_cnn()
    F.cross_entropy(reference(x), y).backward()
    model = BlockNet.from_modules(small_cnn(), (2, 6, 6))
    build_rule(model, "bp")(model, x, y).loss.backward()
    for got, want in zip(grads(model), grads(reference), strict=True):
        torch.testing.assert_close(got.squeeze(0) if got.dim() > want.dim() else got, want)


def test_fa_with_its_feedback_set_to_the_forward_kernels_is_bp():
    x, y = batch()
    bp_model = BlockNet.from_modules(small_cnn(), (2, 6, 6))
    build_rule(bp_model, "bp")(bp_model, x, y).loss.backward()
    model = BlockNet.from_modules(small_cnn(), (2, 6, 6))
    rule = build_rule(model, "fa")
    feedback = rule._matrices("feedback")
    assert [f.shape for f in feedback] == [(4, 3, 3, 3), (3, 4)]
    with torch.no_grad():
        for f, layer in zip(feedback, model.area_layers()[1:], strict=True):
            assert not torch.equal(f, layer.weight[0])
            f.copy_(layer.weight[0])
    rule(model, x, y).loss.backward()
    for got, want in zip(grads(model), grads(bp_model), strict=True):
        torch.testing.assert_close(got, want)


def test_fa_with_random_kernels_differs_from_bp_below_the_top():
    x, y = batch()
    bp_model = BlockNet.from_modules(small_cnn(), (2, 6, 6))
    build_rule(bp_model, "bp")(bp_model, x, y).loss.backward()
    model = BlockNet.from_modules(small_cnn(), (2, 6, 6))
    build_rule(model, "fa")(model, x, y).loss.backward()
    assert not torch.allclose(model.area_layers()[0].weight.grad, bp_model.area_layers()[0].weight.grad)
    torch.testing.assert_close(model.area_layers()[-1].weight.grad, bp_model.area_layers()[-1].weight.grad)


def test_dfa_signal_on_a_feature_map_is_e_B():
    x, y = batch()
    model = BlockNet.from_modules(small_cnn(), (2, 6, 6))
    rule = build_rule(model, "dfa")
    rule(model, x, y).loss.backward()
    # by hand: block 0's output h, error e = softmax(logits) - onehot, its signal e B_0 viewed as h's shape
    conv = model.blocks[0]
    w = conv[0].weight.detach().clone().requires_grad_()
    h = F.max_pool2d(torch.relu(F.conv2d(x, w[0], conv[0].bias.detach()[0], padding=1)), 2)
    e = torch.softmax(model(x).detach(), 1) - F.one_hot(y, 3)
    g = (e @ rule._matrices("direct")[0]).view_as(h)
    ((h * g).sum() / len(x)).backward()
    torch.testing.assert_close(conv[0].weight.grad, w.grad)


@pytest.mark.parametrize("pool,side", [(2, 2), (1, 1), (8, 3)])   # block 0's map is 3x3: pool 8 reads it whole
def test_sal_local_signal_on_a_map_is_the_gradient_of_its_pooled_readout(pool, side):
    x, y = batch()
    model = BlockNet.from_modules(small_cnn(), (2, 6, 6))
    rule = build_rule(model, RuleConfig(rule="sal", signal="local", readout_pool=pool))
    assert rule._matrices("local")[0].shape == (3, 3 * side * side)       # 3 channels pooled to side x side
    h = model.trace(x).hidden[0].detach()
    g = rule.signal(0, h, None, F.one_hot(y, 3).float(), None, False)
    h_var = h.clone().requires_grad_()
    pooled = F.adaptive_avg_pool2d(h_var, side).flatten(1)
    torch.testing.assert_close(read_out(h_var, pool), pooled)
    F.cross_entropy(pooled @ rule._matrices("local")[0].T, y, reduction="sum").backward()
    torch.testing.assert_close(g, h_var.grad)


def test_readout_pool_is_refused_where_it_does_nothing():

    for rule, model, why in (("dfa", "cnn", "exist only with --rule sal"), ("sal", "mlp", "--model mlp has none")):
        with pytest.raises(ConfigError, match=f"--readout-pool .*{why}"):
            check_applicable(make_config(rule, model=model, readout_pool=4), {"readout_pool"})
    with pytest.raises(ConfigError, match="--readout-pool must be >= 1"):
        RuleConfig(readout_pool=0)


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "sal"])
def test_untouched_conv_areas_stay_bit_identical(rule):
    model = BlockNet.from_modules(small_cnn(), (2, 6, 6), areas=8)
    learn = build_rule(model, rule)
    optimizer = torchsal.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    x, y = batch(n=3)
    before = [layer.weight.detach().clone() for layer in model.area_layers()]
    used: set[int] = set()
    for _ in range(2):
        used |= set(model.trace(x).areas[0].tolist())    # (the router learns: the areas may change)
        optimizer.zero_grad()
        learn(model, x, y).loss.backward()
        optimizer.step()
    for layer, old in zip(model.area_layers(), before, strict=True):
        for k in range(8):
            assert torch.equal(layer.weight[k], old[k]) == (k not in used), (rule, k)
    assert len(used) < 8


def test_every_rule_trains_every_conv_model_a_step():
    for name, shape in (("lenet", (1, 28, 28)), ("cnn", (3, 32, 32)), ("resnet20", (3, 32, 32)),
                        ("vgg8b", (3, 32, 32)), ("vgg11b", (3, 16, 16)), ("vgg", (3, 16, 16))):
        config = ModelConfig(model=name, routing_config=RoutingConfig(areas=2), width_mult=1 / 32, depth=5)
        model = build_model(0, 10, config, in_shape=shape)
        x, y = torch.randn(4, *shape), torch.arange(4)
        for rule in ("bp", "fa", "dfa", "sal"):
            model.zero_grad(set_to_none=True)
            out = build_rule(model, rule)(model, x, y)
            out.loss.backward()
            assert out.logits.shape == (4, 10) and torch.isfinite(out.loss)
            # every parameter learns, batch norms inside blocks included (local rules: from their block's signal)
            assert [n for n, p in model.named_parameters() if p.grad is None] == [], (name, rule)


@pytest.mark.parametrize(("modules", "message"), [
    ([nn.Conv2d(2, 3, 3), nn.LSTM(3, 3), nn.Flatten(), nn.Linear(3, 3)], r"module 1, LSTM, is a layer torchsal "
                                                                        r"cannot train"),
    ([nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), nn.Flatten(), nn.Linear(64, 3)], r"module 0 \(0\), Conv2d, has "
                                                                                     r"groups=2"),
    ([nn.ReLU(), nn.Flatten()], r"no Linear or Conv2d layer"),
])
def test_unsupported_layers_are_named(modules, message):
    with pytest.raises(ConfigError, match=message):
        BlockNet.from_modules(modules, (2, 6, 6))


def test_a_wrong_input_shape_names_the_block_that_cannot_take_it():
    with pytest.raises(ConfigError, match=r"block 1 \(Sequential\) cannot take a sample of shape \(3, 2, 2\) "
                                          r"\(in_shape=\(2, 5, 5\)\)"):
        BlockNet.from_modules(small_cnn(), (2, 5, 5))


def test_a_model_class_with_its_own_forward_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="pass the model as an nn.Sequential or a list of modules"):
        BlockNet.from_modules(nn.Bilinear(3, 3, 3), (2, 6, 6))


def test_crop_flip_is_a_shifted_crop_or_its_mirror():
    x = torch.randn(20, 5 * 6 * 2)
    out = crop_flip(x, (2, 5, 6), torch.Generator().manual_seed(0)).view(20, 5, 6, 2)
    padded = F.pad(x.view(20, 5, 6, 2), (0, 0, 4, 4, 4, 4))
    flips = 0
    for i in range(20):
        crops = [padded[i, dy: dy + 5, dx: dx + 6] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(out[i], c) for c in crops)
        mirrored = any(torch.equal(out[i], c.flip(1)) for c in crops)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 3 <= flips <= 17


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="needs ../shared/data/mnist")
def test_the_own_cnn_example_trains_with_sal_and_dfa():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "own_cnn.py"), str(DATA), "80"],
                            capture_output=True, text=True, timeout=600, check=True)
    accuracies = {line.split()[0]: float(line.split()[-1]) for line in result.stdout.splitlines()}
    assert set(accuracies) == {"sal", "dfa"} and min(accuracies.values()) > 0.4, result.stdout
    code = [line for line in (ROOT / "examples" / "own_cnn.py").read_text().split('"""')[-1].splitlines()
            if line.strip() and not line.startswith(("import ", "from "))]
    assert len(code) < 15, code            # the promise: under 15 lines, imports aside


def test_layer_routing_on_a_conv_net_routes_each_block_from_its_pooled_input():
    model = BlockNet.from_modules(small_cnn(), (2, 6, 6), areas=4, routing=RoutingConfig(areas=4, routing="layer"))
    assert [router.projection.in_features for router in model.routers] == [72, 3, 4]     # image, channels, features
    x, y = batch()
    trace = model.trace(x)
    assert trace.rows is None and all(a is not None for a in trace.areas)
    build_rule(model, "sal")(model, x, y).loss.backward()
    assert all(layer.weight.grad is not None for layer in model.area_layers())


def test_area_shares_with_layer_routing_and_dense_convolutions():
    """Routers sit only before the blocks with areas; the shares a run reports are one list per router."""
    model = BlockNet.from_modules(small_cnn(), (2, 6, 6), areas=4, routing=RoutingConfig(areas=4, routing="layer"),
                                  conv_areas=False)
    x, _ = batch()
    assert model.router_blocks == [len(model.blocks) - 1] and None in model.trace(x).areas     # the Linear only
    shares = area_shares(model, x)                                  # one router: one list, one share per area
    assert len(shares) == 4 and sum(shares) == pytest.approx(1.0)


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="needs ../shared/data/mnist")
def test_a_conv_run_saves_a_model_that_eval_loads(tmp_path):
    run = [sys.executable, "-m", "torchsal"]
    common = ["--data-dir", str(DATA), "--threads", "1"]
    subprocess.run([*run, "train", "--dataset", "mnist", "--model", "lenet", "--rule", "dfa", "--max-steps", "20",
                    "--out", str(tmp_path / "run"), *common], check=True, capture_output=True, timeout=600)
    res = subprocess.run([*run, "eval", "--model", str(tmp_path / "run"), "--data-dir", str(DATA)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())["test_accuracy"]
    assert f"accuracy {stored:.4f}" in res.stdout, res.stdout
    bad = subprocess.run([*run, "train", "--dataset", "digits", "--model", "lenet", *common], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "--model lenet is a conv net: it needs an image dataset" in bad.stderr


def test_vgg_models_follow_their_published_plans_and_the_depth_family_spreads_its_convs():
    model = build_model(0, 10, ModelConfig(model="vgg8b", routing_config=RoutingConfig(areas=16)), in_shape=(3, 32, 32))
    convs = [layer.weight.shape[1] for layer in model.area_layers() if isinstance(layer, AreaConv2d)]
    linears = [tuple(layer.weight.shape[1:]) for layer in model.area_layers() if not isinstance(layer, AreaConv2d)]
    assert convs == [128, 256, 256, 512, 512, 512] and linears == [(1024, 512 * 2 * 2), (10, 1024)]
    assert len(model.blocks) == 8                         # VGG8b: eight layers, each its own block
    quarter = build_model(0, 10, ModelConfig(model="vgg11b", width_mult=0.25, routing_config=RoutingConfig(areas=16)),
                          in_shape=(3, 32, 32))
    assert [layer.weight.shape[1] for layer in quarter.area_layers()][:9] == [32, 32, 32, 64, 64, 128, 128, 128, 128]
    assert [len(stage) for stage in vgg_depth_plan(11)] == [3, 3, 3, 2]
    assert [len(stage) for stage in vgg_depth_plan(6)] == [2, 2, 1, 1]
    with pytest.raises(ConfigError, match="needs at least 4 conv layers: give --depth 4 or more"):
        vgg_depth_plan(3)
    with pytest.raises(ConfigError, match="--width-mult scales the VGG models, not --model cnn"):
        check_applicable(make_config("bp", model="cnn", width_mult=0.5), {"width_mult"})
    check_applicable(make_config("sal", model="vgg", depth=8), {"depth"})    # depth shapes the VGG family
