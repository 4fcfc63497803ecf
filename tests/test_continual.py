import pytest
import torch

from torchsal.config import make_config
from torchsal.continual import accuracy, permuted_tasks, run_sequence, split_tasks, summarise
from torchsal.data import load_dataset, make_splits


@pytest.fixture(scope="module")
def digits():
    return make_splits(load_dataset("digits"), 0)


def test_summary_of_a_hand_made_accuracy_matrix():
    s = summarise([[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.4, 0.7, 0.9]])
    assert s["average"] == pytest.approx((0.4 + 0.7 + 0.9) / 3)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.4) + (0.8 - 0.7)) / 2)


def test_split_tasks_partition_the_classes(digits):
    tasks = split_tasks(digits)
    assert [cls for _, cls in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sum(len(t.y_train) for t, _ in tasks) == len(digits.y_train)
    for t, cls in tasks:
        assert set(t.y_test.tolist()) == set(cls) and set(t.y_val.tolist()) == set(cls)


def test_permuted_tasks_apply_one_permutation_per_task(digits):
    tasks = permuted_tasks(digits, 3, seed=0)
    assert torch.equal(tasks[0][0].x_train, digits.x_train)
    for t, _ in tasks[1:]:
        assert not torch.equal(t.x_train, digits.x_train)
        assert torch.equal(t.x_train.sort(dim=1).values, digits.x_train.sort(dim=1).values)   # same values, moved
        # one permutation for every split: the feature a train column holds, the test column holds too
        j = int(t.x_train.var(0).argmax())
        column = int((digits.x_train == t.x_train[:, j:j + 1]).all(0).nonzero()[0])
        assert torch.equal(t.x_test[:, j], digits.x_test[:, column])
        assert torch.equal(t.y_test, digits.y_test)


def test_task_incremental_accuracy_restricts_the_argmax():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[5.0, 1.0, 2.0, 0.0]]).repeat(len(x), 1)

    x, y = torch.zeros(4, 1), torch.full((4,), 2)
    assert accuracy(Fixed(), x, y) == 0.0                                # class 0 wins over all classes
    assert accuracy(Fixed(), x, y, classes=[2, 3]) == 1.0               # within the task's classes, 2 wins


def test_split_sequence_forgets_under_class_incremental_evaluation(digits):
    result = run_sequence(make_config("bp", epochs=10), split_tasks(digits))
    ci, ti = result["class_incremental"], result["task_incremental"]
    assert len(ci["accuracy"]) == 5 and len(ci["accuracy"][0]) == 5
    assert ci["accuracy"][0][0] > 0.9                                   # learnt task 1 ...
    assert ci["forgetting"] > 0.5                                        # ... and forgot it (catastrophically)
    assert ti["average"] > ci["average"]                                 # knowing the task helps
