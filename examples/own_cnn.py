"""Train your own CNN with SAL and with DFA: torchsal turns its Conv2d and Linear layers into area layers (here the
Linear ones only hold areas: conv_areas=False), and SAL learns each block from predsim's local heads.

    python examples/own_cnn.py [DATA_DIR] [STEPS]
"""
import sys

import torch
from torch import nn

import torchsal

data = torchsal.make_splits(torchsal.load_dataset("mnist", sys.argv[1] if len(sys.argv) > 1 else None), seed=0)
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
for rule in ("sal", "dfa"):
    cnn = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10))
    model = torchsal.BlockNet.from_modules(cnn, (1, 28, 28), areas=16 if rule == "sal" else 1, conv_areas=False)
    learn = torchsal.build_rule(model, torchsal.RuleConfig(rule, objective="predsim" if rule == "sal" else "readout"))
    optimizer = torchsal.optim.Adam([*model.parameters(), *learn.parameters()], lr=1e-3)   # + sal's local heads
    for _ in range(steps):
        i = torch.randint(len(data.y_train), (64,))
        optimizer.zero_grad()
        learn.step(model, data.x_train[i], data.y_train[i])      # = learn(...).loss.backward()
        optimizer.step()
    print(f"{rule} test accuracy {torchsal.evaluate(model, data.x_test, data.y_test):.4f}")
