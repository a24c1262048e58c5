"""Benchmark the public ``refbnn.bconv2d`` (float input, float HWIO kernel) against PyTorch fp32.

Every binary 3x3 layer of ResNet-18 at 224x224 input (``bench_kernels.LAYERS``), batch 1 by
default, one thread: ``refbnn.bconv2d(x, kernel, stride, "same")`` as a user calls it, so every
call packs the float kernel and the float input, builds a ``BConv2DPlan`` and runs the binary
conv; beside it the parts (``pack_kernel`` alone; the plan's conv alone on a packed input), and
``torch.nn.functional.conv2d`` in fp32 on the same data (NCHW copies, padding 1). refbnn and
PyTorch run in separate worker processes (see ``bench_kernels.py`` for why), in the same run.
The issue's floor: ``bconv2d`` >= 5x faster than PyTorch fp32 on every layer.

    python tools/bench_bconv2d.py --out bench-results/bconv2d.json

Prints a table and writes JSON (median seconds per call, the CPU and the source revision).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from _bench_common import cpu_name, save_results
from bench_kernels import LAYERS, _median_time

FLOOR = 5.0


def _refbnn_times(refbnn, x, k, s, args) -> dict:
    h, c = x.shape[1], x.shape[3]
    r = {"bconv2d_s": _median_time(lambda: refbnn.bconv2d(x, k, s, "same"), args.min_time,
                                   args.repeats),
         "pack_kernel_s": _median_time(lambda: refbnn.pack_kernel(k), args.min_time, args.repeats)}
    plan = refbnn.BConv2DPlan(refbnn.pack_kernel(k), c, (h, h), s, "same")
    buf = plan.pack_input(x)
    r["conv_s"] = _median_time(lambda: plan.run_padded(buf), args.min_time, args.repeats)
    return r


def _torch_times(torch, x, k, s, args) -> dict:
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    kt = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())
    with torch.inference_mode():
        return {"torch_fp32_s": _median_time(
            lambda: torch.nn.functional.conv2d(xt, kt, stride=s, padding=1), args.min_time,
            args.repeats)}


def worker(args) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    if args.torch_only:
        import torch
        torch.set_num_threads(args.threads)
    else:
        import numba
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
        import refbnn
        numba.set_num_threads(args.threads)
    for h, c, o, s in LAYERS:
        x = rng.standard_normal((args.batch, h, h, c)).astype(np.float32)
        k = rng.standard_normal((3, 3, c, o)).astype(np.float32)
        r = dict(layer=f"{h}x{h}x{c}->{o}", stride=s, batch=args.batch, threads=args.threads)
        r.update(_torch_times(torch, x, k, s, args) if args.torch_only
                 else _refbnn_times(refbnn, x, k, s, args))
        print(json.dumps(r), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON to this path")
    p.add_argument("--threads", type=int, default=1, help="threads for both sides (default 1)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per measurement")
    p.add_argument("--min-time", type=float, default=0.02, help="seconds per timed repeat")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.threads, args.batch, args.repeats) < 1:
        p.error("--threads, --batch and --repeats must be >= 1")
    if args.worker:
        worker(args)
        return 0
    if importlib.util.find_spec("torch") is None:
        print("error: this benchmark compares against PyTorch, which is not installed",
              file=sys.stderr)
        return 1
    t = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, MKL_NUM_THREADS=t,
               NUMBA_NUM_THREADS=t)
    cmd = [sys.executable, __file__, "--worker", "--threads", t, "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--min-time", str(args.min_time)]
    sides = []
    for extra, e in (([], env), (["--torch-only"], dict(env, OMP_WAIT_POLICY="PASSIVE"))):
        proc = subprocess.run(cmd + extra, env=e, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            print("error: benchmark worker failed", file=sys.stderr)
            return 1
        sides.append([json.loads(line) for line in proc.stdout.splitlines()
                      if line.startswith("{")])
    rows = []
    for r, tr in zip(*sides):
        r.update(tr)
        r["speedup_vs_torch_fp32"] = r["torch_fp32_s"] / r["bconv2d_s"]
        rows.append(r)
    print(f"{'layer':>16} {'':2} {'bconv2d us':>10} {'pack_kernel':>11} {'conv us':>8} "
          f"{'torch32 us':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['layer']:>16} s{r['stride']} {r['bconv2d_s'] * 1e6:10.1f} "
              f"{r['pack_kernel_s'] * 1e6:11.1f} {r['conv_s'] * 1e6:8.1f} "
              f"{r['torch_fp32_s'] * 1e6:10.1f} {r['speedup_vs_torch_fp32']:7.1f}x")
    notes = [f"< {FLOOR:g}x torch fp32: {r['layer']} s{r['stride']} "
             f"{r['speedup_vs_torch_fp32']:.1f}x" for r in rows
             if r["speedup_vs_torch_fp32"] < FLOOR]
    print("\n".join([f"floor (>= {FLOOR:g}x PyTorch fp32, same run):"] + (notes or ["met"])))
    print(f"cpu: {cpu_name()}, threads {args.threads}, batch {args.batch}")
    if args.out:
        return save_results(args.out, {"threads": args.threads, "batch": args.batch,
                                       "notes": notes}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
