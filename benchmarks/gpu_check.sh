#!/usr/bin/env bash
# One short device check (a lent GPU machine, its own python3 with torch): the CUDA tests and a step timing.
set -u
export PYTHONPATH=src
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 300 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -5
timeout 200 python3 - <<'PY'
import time, torch
from torchsal import make_config, build_model, build_rule
from torchsal.train import make_optimizer
for rule, areas, batch in (("bp", 1, 1024), ("sal", 16, 1024), ("sal", 16, 16), ("bp", 1, 16)):
    cfg = make_config(rule, areas=areas, width=1024, depth=2, batch_size=batch)
    model = build_model(784, 10, cfg.model).cuda(); r = build_rule(model, cfg.rule).cuda()
    opt = make_optimizer(list(model.parameters()), cfg.train)
    x, y = torch.randn(batch, 784, device="cuda"), torch.randint(10, (batch,), device="cuda")
    def step():
        opt.zero_grad(); r(model, x, y).loss.backward(); opt.step()
    for _ in range(10): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(50): step()
    torch.cuda.synchronize()
    print(f"{rule} areas={areas} batch={batch} width=1024 depth=2: {(time.perf_counter()-t)/50*1e3:.2f} ms/step (H100)")
PY
