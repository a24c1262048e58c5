"""Whole-model inference: refbnn's packed engine vs its float path vs PyTorch, in one run.

Models: the shipped MNIST FTBNN-18 (``weights/ftbnn18.h5``, if present), and ImageNet-size (224x224)
FTBNN-18 and Bi-Real-18 with random weights (BatchNorm statistics randomised so they matter). For each,
batch 1 and 32, one thread (``--threads``):

* ``packed``: :mod:`refbnn.engine` (XNOR-popcount kernels, BN folded, NHWC);
* ``float``: refbnn's NumPy training path in eval mode (binary convs run on the packed kernels there
  too, so this is not a pure-float baseline);
* ``torch twin``: PyTorch fp32 running the same architecture with the same weights
  (``refbnn.interop.torch``: sign as a float op, float conv of +-1 values);
* ``torch resnet18``: PyTorch fp32 ResNet-18 with its usual ReLU blocks (the architecture binary
  networks replace), built here so that torchvision is not needed.

Prints a table of median milliseconds per batch and images/s, with ratios to the packed engine, and
writes JSON (``--out``, temp file then rename). The issue's floor: packed Bi-Real-18 at batch 1 at
least 4x faster than PyTorch fp32 ResNet-18, same run, same thread count.

    python tools/bench_infer.py --out bench-results/infer.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _bench_common import cpu_name, source_revision, write_json


def median_ms(fn, min_runs=3, budget=2.0):
    fn()  # warm-up: compile or load kernels, allocate buffers
    times = []
    t_end = time.perf_counter() + budget
    while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]


def randomise_bn(model, seed=0):
    import numpy as np

    from refbnn import nn
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean = rng.normal(0, 0.3, c).astype(np.float32)
            m.running_var = rng.uniform(0.5, 2.0, c).astype(np.float32)
            m.weight.data = rng.normal(1.0, 0.2, c).astype(np.float32)
            m.bias.data = rng.normal(0, 0.1, c).astype(np.float32)
    return model.eval()


def torch_resnet18(torch):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, c in enumerate((64, 128, 256, 512)):
        layers += [Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1)]
        cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers).eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-results/infer.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default="weights/ftbnn18.h5")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per measurement")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numba
    import numpy as np
    from threadpoolctl import threadpool_limits

    from refbnn import models
    from refbnn.engine import compile_model
    numba.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    try:
        import torch
        torch.set_num_threads(args.threads)
        from refbnn.interop.torch import to_torch_state, twin
    except ImportError:
        torch = None

    cases = []
    if Path(args.weights).exists():
        from refbnn import fileformat
        f = fileformat.load(args.weights)
        m = models.build(f.config)
        m.load_state_dict(f.state_dict)
        cases.append((f"mnist ftbnn18 ({args.weights})", m.eval()))
    for name in ("ftbnn18", "birealnet18"):
        cases.append((f"{name} 224x224 (random)", randomise_bn(models.build(name, seed=0))))
    resnet = torch_resnet18(torch) if torch is not None else None

    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    for label, model in cases:
        engine = compile_model(model)
        tw = None
        if torch is not None:
            tw = twin(model.config)
            tw.load_state_dict(to_torch_state(model.state_dict()))
            tw.eval()
        c, h, w = model.config["input_shape"]
        for b in batches:
            x = np.random.default_rng(b).standard_normal((b, c, h, w)).astype(np.float32)
            row = {"model": label, "batch": b, "threads": args.threads}
            row["packed_ms"] = median_ms(lambda e=engine, v=x: e.forward(v), budget=args.budget)
            row["float_ms"] = median_ms(lambda m=model, v=x: m.forward(v), budget=args.budget)
            if tw is not None:
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    row["torch_twin_ms"] = median_ms(lambda t=tw, v=xt: t(v), budget=args.budget)
                    if h == 224:
                        row["torch_resnet18_ms"] = median_ms(lambda v=xt: resnet(v), budget=args.budget)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    header = f"{'model':<36}{'batch':>6}{'packed ms':>11}{'img/s':>9}{'float ms':>10}{'twin ms':>10}" \
             f"{'resnet18 ms':>13}{'float/pk':>9}{'twin/pk':>9}{'r18/pk':>8}"
    print(header)
    for r in rows:
        pk = r["packed_ms"]
        tw_ms, rn = r.get("torch_twin_ms"), r.get("torch_resnet18_ms")
        print(f"{r['model']:<36}{r['batch']:>6}{pk:>11.3f}{1e3 * r['batch'] / pk:>9.0f}{r['float_ms']:>10.2f}"
              f"{(tw_ms or float('nan')):>10.2f}{(rn or float('nan')):>13.2f}{r['float_ms'] / pk:>9.1f}"
              f"{(tw_ms or float('nan')) / pk:>9.1f}{(rn or float('nan')) / pk:>8.1f}")
    write_json(Path(args.out), {"uptime_load": os.getloadavg(), "cpu": cpu_name(),
                                "source": source_revision(), "rows": rows})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
