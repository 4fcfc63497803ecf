import math

import pytest
import torch
from conftest import tiny

from torchsal.diagnostics import alignment, area_statistics, interference, mean_pairwise_cosine


def test_backprop_is_perfectly_aligned_with_itself(batch):
    model, rule = tiny("bp", areas=3, shared=True)
    for layer in alignment(model, rule, *batch):
        assert layer["cosine"] == pytest.approx(1.0, abs=1e-6) and layer["degrees"] == pytest.approx(0.0, abs=0.1)


def test_constructed_feedback_gives_its_known_angle(batch):
    """DFA whose feedback is exactly -W_out sends the negated true gradient to the hidden layer: 180 degrees."""
    model, rule = tiny("dfa", depth=1)
    with torch.no_grad():
        rule.direct_0.copy_(-model.layers[1].weight[0])
    hidden, head = alignment(model, rule, *batch)
    assert hidden["degrees"] == pytest.approx(180.0, abs=0.1) and hidden["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert head["degrees"] == pytest.approx(0.0, abs=0.1)            # the output layer learns from its own loss


def test_measurements_do_not_change_training(batch):
    model, rule = tiny("sal", areas=3, shared=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    alignment(model, rule, *batch)
    interference(model, rule, *batch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_mean_pairwise_cosine_on_a_hand_made_example():
    vectors = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([-3.0, 0.0]), torch.zeros(2)]
    assert mean_pairwise_cosine(vectors) == pytest.approx(-1 / 3)   # pairs: 0, -1, 0; the zero vector is skipped
    assert math.isnan(mean_pairwise_cosine(vectors[:1]))


def test_class_updates_in_different_areas_do_not_interfere():
    """Two classes routed to different areas, no shared path: their updates of that layer are orthogonal."""
    model, rule = tiny("sal", areas=2, shared=False, depth=1)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    area, _ = model.routers[0](x)
    assert area.bincount(minlength=2).min() >= 2                      # (this seed's routing uses both areas)
    first = interference(model, rule, x, area)[0]                     # class = area
    assert first == pytest.approx(0.0, abs=1e-7)
    # the control: the same two classes, but each spread over both areas, do share the layer's parameters
    mixed = torch.arange(8) % 2
    assert set(zip(area.tolist(), mixed.tolist())) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert abs(interference(model, rule, x, mixed)[0]) > 1e-3


def test_area_statistics_on_fixed_routing():
    area = torch.tensor([0, 0, 1, 1, 1, 3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    stats = area_statistics(area, 4, labels, previous=torch.tensor([0, 1, 1, 1, 2, 3]))
    assert stats["shares"] == pytest.approx([2 / 6, 3 / 6, 0, 1 / 6])
    assert stats["used"] == 3 and stats["imbalance"] == pytest.approx(2.0)
    assert stats["purity"] == pytest.approx(5 / 6)                    # (2 * 1 + 3 * 2/3 + 1 * 1) / 6
    assert stats["changed"] == pytest.approx(2 / 6)
    even = area_statistics(torch.arange(8) % 4, 4)
    assert even["entropy"] == pytest.approx(1.0) and even["imbalance"] == pytest.approx(1.0)


def test_train_with_diagnostics_records_them_per_epoch():
    from torchsal import make_config, train

    plain = train(make_config("sal", epochs=2, areas=4), progress=False)
    m = train(make_config("sal", epochs=2, areas=4, diagnostics=True), progress=False).metrics
    first, second = (row["diagnostics"] for row in m["history"])
    assert len(first["alignment_degrees"]) == len(first["interference"]) == 2
    assert first["areas"][0]["used"] <= 4 and "changed" not in first["areas"][0] and "changed" in second["areas"][0]
    assert m["test_accuracy"] == plain.metrics["test_accuracy"]       # measuring does not change training
