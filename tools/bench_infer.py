"""Whole-model inference: refbnn's packed engine vs OpenVINO (same network, same weights) vs PyTorch
ResNet-18, in one run.

Models: Bi-Real-18 and FTBNN-18 at 224x224, the derived FTBNN-18 with 2 groups (about 90M OPs),
random weights with randomised BatchNorm statistics (so they matter), and the shipped MNIST model
``weights/ftbnn18.h5``. For each: batch 1 and 32, 1 and 2 threads (``--threads``):

Each row's peers are timed interleaved (rounds running each twice in a row, the second call timed:
:func:`timed_interleaved` says why), so they share the machine's conditions; the medians are
reported.

* ``refbnn``: :class:`refbnn.engine.Engine` and its time split by stage (binary convs, stem,
  shortcuts, elementwise + glue; :meth:`Engine.profile`, batch 1 and 32, one thread);
  ``refbnn bf16``: the same engine with the opt-in bf16 stem (``stem="bf16"``, docs/semantics.md
  7b: OpenVINO's default runs its real layers in bf16 on these CPUs too), with its own stage split;
* ``ov f32`` / ``ov default``: OpenVINO's CPU plugin on :func:`refbnn.interop.openvino.to_openvino`
  of the same network, with ``INFERENCE_PRECISION_HINT=f32`` and with the plugin's default
  (reported: bf16 on CPUs with AVX512-BF16 or AMX), one stream, ``INFERENCE_NUM_THREADS``;
* ``r18 fp32`` / ``r18 bf16``: PyTorch ResNet-18 (built here, no torchvision), fp32 and bf16
  (``torch.autocast("cpu", torch.bfloat16)``, channels_last), 224x224 rows only.

Then for ``weights/ftbnn18.h5``: batch-1 latency with one thread and with the default threads while
a CPU-bound process (``python -c 'while 1: pass'``) runs beside it, and images/s at batch 256 with
2 threads. Prints a table (median ms per batch; ratios to refbnn) and the issue's floors, writes JSON
(``--out``). Run it alone: ``flock -x /work/cpu.lock python tools/bench_infer.py --out ...``.

``--isa avx2`` runs every engine without AVX-512 (:func:`_bench_common.emulate_isa`: Numba's
target features, oneDNN's and PyTorch's ISA limits), so an AVX-512 host measures the code an
AVX2-only one would run, all peers alike; the JSON's ``emulated_isa`` and ``isa`` say so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _bench_common import cpu_name, emulate_isa, host_isa, source_revision, write_json


def timed(fn, min_runs=3, budget=1.0, max_runs=200):
    """(median seconds, all times) of ``fn()`` after one warm-up call."""
    fn()
    times = []
    t_end = time.perf_counter() + budget
    while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    s = sorted(times)
    return s[len(s) // 2], times


def timed_interleaved(fns: dict, min_runs=3, budget=1.0, max_runs=200):
    """Median seconds of each ``fns[name]()``, measured in rounds that run every function twice in
    a row and time the second call (the order rotating), so that the peers share the machine's
    conditions (this host is shared) but no timed call pays for the peer before it: a runtime's
    worker threads keep spinning for a while after its call (OpenVINO's TBB, Numba's and
    PyTorch's OpenMP), and the call after it waits for a core. Measured on the 2-core AMD EPYC,
    FTBNN-18 224x224, batch 1, 2 threads, medians of 60 rounds: refbnn 6.01 ms when every call
    followed an OpenVINO call, 3.24 ms as the second call of a pair, 3.14 ms in runs of five
    (OpenVINO f32: 4.37, 4.06, 3.75)."""
    names = list(fns)
    for f in fns.values():
        f()  # warm-up
    times = {k: [] for k in names}
    t_end = time.perf_counter() + budget * len(names)
    r = 0
    while r < min_runs or (time.perf_counter() < t_end and r < max_runs):
        for k in names[r % len(names):] + names[:r % len(names)]:
            fns[k]()  # untimed: the peer's threads settle, this one's wake
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
        r += 1
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


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


def set_threads(n, torch):
    import numba
    numba.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-results/infer.json")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--weights", default="weights/ftbnn18.h5")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--models", default="birealnet18,ftbnn18,ftbnn18_g2,shipped")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-openvino", action="store_true")
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: every engine without AVX-512 (module docstring)")
    p.add_argument("--markdown", metavar="JSON",
                   help="print the README's table and stage split of a saved run, then exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    emulated = emulate_isa(args.isa)
    # importing openvino puts its own libtbb in the process, which numba would then pick; keep the
    # layer a plain refbnn process gets (omp unless the user chose one)
    os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
    import numba
    import numpy as np
    from threadpoolctl import threadpool_limits

    from refbnn import engine as eng
    from refbnn import fileformat, models
    from refbnn.golden.model import randomize_state
    threadpool_limits(1)
    threads = [int(t) for t in args.threads.split(",") if int(t) <= numba.config.NUMBA_NUM_THREADS]
    batches = [int(b) for b in args.batches.split(",")]
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
    ovi = None
    if not args.no_openvino:
        try:
            from refbnn.interop import openvino as ovi
            ovi._ov()
        except ImportError:
            ovi = None

    cases = []
    for name in args.models.split(","):
        if name == "shipped":
            if Path(args.weights).exists():
                f = fileformat.load(args.weights)
                cases.append((f"mnist ftbnn18 ({args.weights})", eng.network_from_file(f),
                              lambda stem="float32", f=f: eng.Engine.from_file(f, stem=stem)))
            continue
        m = models.build(name, seed=0)
        randomize_state(m, 0)  # BatchNorm statistics that matter (refbnn.golden.model)
        m.eval()
        cases.append((f"{name} 224x224", eng.network_from_model(m),
                      lambda stem="float32", m=m: eng.Engine.from_model(m, stem=stem)))

    rows, stages, ov_precision = [], [], {}
    for label, net, make in cases:
        engine, engine_bf16 = make(), make("bf16")
        c, h, w = net.input_shape
        for b in batches:
            x = np.random.default_rng(b).standard_normal((b, c, h, w)).astype(np.float32)
            if ovi is not None:
                model = ovi.to_openvino(net)
                model.reshape([b, c, h, w])
            for t in threads:
                set_threads(t, torch)
                row = {"model": label, "batch": b, "threads": t}
                fns = {"refbnn_ms": lambda e=engine, v=x: e.forward(v),
                       "refbnn_bf16_ms": lambda e=engine_bf16, v=x: e.forward(v)}
                if ovi is not None:
                    # emulated AVX2: the plugin still sees the CPU's bf16 and picks it, which
                    # oneDNN limited to AVX2 cannot run; an AVX2 host's default is f32
                    dflt = "f32" if emulated else None
                    for prec, key in (("f32", "ov_f32_ms"), (dflt, "ov_default_ms")):
                        cm = ovi.compile_model(model, prec, t)
                        if key == "ov_default_ms":
                            ov_precision[label] = str(cm.get_property("INFERENCE_PRECISION_HINT"))
                        req = cm.create_infer_request()
                        fns[key] = lambda r=req, v=x: r.infer({0: v})
                row.update({k: 1e3 * v for k, v in timed_interleaved(fns, budget=args.budget).items()})
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            if 1 in threads:
                set_threads(1, torch)
                for stem, e in (("float32", engine), ("bf16", engine_bf16)):
                    split = e.profile(x, runs=5)
                    stages.append({"model": label, "batch": b, "threads": 1, "stem_precision": stem,
                                   **split})
                    print(json.dumps(stages[-1]), file=sys.stderr, flush=True)

    if torch is not None and any(r["model"].endswith("224x224") for r in rows):
        resnet = torch_resnet18(torch)
        for b in batches:
            x = torch.from_numpy(np.random.default_rng(b).standard_normal((b, 3, 224, 224))
                                 .astype(np.float32))
            xc = x.contiguous(memory_format=torch.channels_last)
            rc = torch_resnet18(torch).to(memory_format=torch.channels_last)
            rc.load_state_dict(resnet.state_dict())
            for t in threads:
                set_threads(t, torch)
                def bf16(m=rc, v=xc):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        m(v)
                with torch.no_grad():
                    tt = timed_interleaved({"fp32": lambda v=x: resnet(v), "bf16": bf16},
                                           budget=args.budget)
                fp32, b16 = tt["fp32"], tt["bf16"]
                for r in rows:
                    if r["batch"] == b and r["threads"] == t and r["model"].endswith("224x224"):
                        r["r18_fp32_ms"], r["r18_bf16_ms"] = 1e3 * fp32, 1e3 * b16

    shipped = shipped_checks(args, cases, threads, np) if any(
        lbl.startswith("mnist") for lbl, _, _ in cases) else {}
    report = {"cpu": cpu_name(), "isa": host_isa(), "source": source_revision(),
              "emulated_isa": args.isa if emulated else None, "emulation_env": emulated or None,
              "load_before": os.getloadavg(),
              "threading_layer": numba.threading_layer(), "numba_threads": numba.config.NUMBA_NUM_THREADS,
              "openvino": ovi._ov()[0].__version__ if ovi else None,
              "openvino_default_precision": ov_precision, "torch": torch.__version__ if torch else None,
              "rows": rows, "stages": stages, "shipped": shipped}
    report["floors"] = floors(rows, stages, shipped)
    print_table(report)
    write_json(Path(args.out), report)
    print(f"wrote {args.out}", file=sys.stderr)


def shipped_checks(args, cases, threads, np):
    """weights/ftbnn18.h5: batch-1 latency beside a CPU-bound process; batch-256 images/s."""
    from refbnn import engine as eng
    label, net, make = next(c for c in cases if c[0].startswith("mnist"))
    engine = make()
    c, h, w = net.input_shape
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, c, h, w)).astype(np.float32)
    x256 = rng.standard_normal((256, c, h, w)).astype(np.float32)
    out = {"model": label}
    import numba
    numba.set_num_threads(max(threads))
    med, _ = timed(lambda: engine.forward(x256), budget=2 * args.budget)
    out["batch256_images_per_s"] = 256 / med
    out["batch256_threads"] = max(threads)
    hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        time.sleep(0.3)
        for t, key in ((1, "latency_ms_1thread_beside_hog"),
                       (numba.config.NUMBA_NUM_THREADS, "latency_ms_default_threads_beside_hog")):
            numba.set_num_threads(t)
            _, times = timed(lambda: engine.forward(x1), budget=2 * args.budget, max_runs=20000)
            ms = np.array(times) * 1e3
            out[key] = {"median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
                        "runs": len(ms)}
    finally:
        hog.kill()
        hog.wait()
    numba.set_num_threads(1)
    _, times = timed(lambda: engine.forward(x1), budget=args.budget, max_runs=20000)
    out["latency_ms_1thread_quiet"] = float(np.median(np.array(times) * 1e3))
    del eng
    return out


def _row(rows, model, b, t):
    return next((r for r in rows if r["model"].startswith(model) and r["batch"] == b
                 and r["threads"] == t), None)


def floors(rows, stages, shipped):
    """The issue's floors, each ``{"floor": text, "value": measured, "met": bool}``."""
    out = []

    def add(text, value, met):
        out.append({"floor": text, "value": value, "met": bool(met)})

    for b in (1, 32):
        for t in (1, 2):
            r = _row(rows, "birealnet18 224", b, t)
            if r and "ov_f32_ms" in r:
                add(f"Bi-Real-18 b{b} t{t}: refbnn <= OpenVINO f32 (ms)",
                    [round(r["refbnn_ms"], 3), round(r["ov_f32_ms"], 3)], r["refbnn_ms"] <= r["ov_f32_ms"])
                best = min(r["refbnn_ms"], r.get("refbnn_bf16_ms", r["refbnn_ms"]))
                add(f"Bi-Real-18 b{b} t{t}: refbnn (float32 / bf16 stem) <= OpenVINO default "
                    "(goal beyond, ms)", [round(r["refbnn_ms"], 3),
                                          round(r.get("refbnn_bf16_ms", float("nan")), 3),
                                          round(r["ov_default_ms"], 3)],
                    best <= r["ov_default_ms"])
    for t in (1, 2):
        r = _row(rows, "birealnet18 224", 1, t)
        if r and "r18_fp32_ms" in r:
            rb = r["refbnn_ms"]
            add(f"Bi-Real-18 b1 t{t}: >= 10x PyTorch fp32 ResNet-18", round(r["r18_fp32_ms"] / rb, 2),
                r["r18_fp32_ms"] >= 10 * rb)
            add(f"Bi-Real-18 b1 t{t}: >= 3x PyTorch bf16 ResNet-18", round(r["r18_bf16_ms"] / rb, 2),
                r["r18_bf16_ms"] >= 3 * rb)
    for m in ("birealnet18", "ftbnn18 224", "ftbnn18_g2"):
        for t in (1, 2):
            r1, r32 = _row(rows, m, 1, t), _row(rows, m, 32, t)
            if r1 and r32:
                add(f"{m} t{t}: per-image ms at b32 <= b1", [round(r32["refbnn_ms"] / 32, 3),
                                                              round(r1["refbnn_ms"], 3)],
                    r32["refbnn_ms"] / 32 <= r1["refbnn_ms"])
        r1, r2 = _row(rows, m, 32, 1), _row(rows, m, 32, 2)
        if r1 and r2:
            add(f"{m} b32: 2 threads >= 1.7x 1-thread throughput",
                round(r1["refbnn_ms"] / r2["refbnn_ms"], 2), r1["refbnn_ms"] >= 1.7 * r2["refbnn_ms"])
    for s in stages:
        if s["batch"] == 1:
            frac = s["binary_convs"] / s["total"]
            stem = " (bf16 stem)" if s.get("stem_precision") == "bf16" else ""
            add(f"{s['model']} b1{stem}: binary convs >= 50% of the time", round(frac, 3),
                frac >= 0.5)
    if shipped:
        lat1 = shipped["latency_ms_1thread_beside_hog"]["median"]
        latd = shipped["latency_ms_default_threads_beside_hog"]["median"]
        add("ftbnn18.h5 b1 latency <= 0.15 ms, 1 thread, CPU hog beside (ms)", round(lat1, 4),
            lat1 <= 0.15)
        add("ftbnn18.h5 b1 latency <= 0.3 ms, default threads, CPU hog beside (ms)", round(latd, 4),
            latd <= 0.3)
        ips = shipped["batch256_images_per_s"]
        add(f"ftbnn18.h5 b256 >= 15,000 images/s ({shipped['batch256_threads']} threads)",
            round(ips), ips >= 15000)
    return out


def print_table(rep):
    isa = rep.get("isa", {})
    emu = f" running {rep['emulated_isa']} code only" if rep.get("emulated_isa") else ""
    print(f"CPU: {rep['cpu']}{emu} "
          f"({', '.join(k for k, v in isa.items() if v is True) or 'ISA unknown'}; "
          f"ops auto kernel {isa.get('ops_auto_kernel', '?')}); source {rep['source']}; "
          f"threading layer {rep['threading_layer']}; "
          f"OpenVINO {rep['openvino']} (default precision: "
          f"{sorted(set(rep['openvino_default_precision'].values()))}); torch {rep['torch']}")
    cols = [("refbnn_ms", "refbnn"), ("refbnn_bf16_ms", "rb bf16"), ("ov_f32_ms", "ov f32"),
            ("ov_default_ms", "ov dflt"),
            ("r18_fp32_ms", "r18 fp32"), ("r18_bf16_ms", "r18 bf16")]
    print(f"{'model':<34}{'b':>4}{'t':>3}" + "".join(f"{n:>10}" for _, n in cols)
          + f"{'img/s':>9}" + "".join(f"{n + '/rb':>12}" for _, n in cols[1:]))
    nan = float("nan")
    for r in rep["rows"]:
        rb = r["refbnn_ms"]
        print(f"{r['model'][:33]:<34}{r['batch']:>4}{r['threads']:>3}"
              + "".join(f"{r.get(k, nan):>10.3f}" for k, _ in cols) + f"{1e3 * r['batch'] / rb:>9.0f}"
              + "".join(f"{r.get(k, nan) / rb:>12.2f}" for k, _ in cols[1:]))
    print("\nrefbnn time by stage (ms, 1 thread):")
    keys = ["binary_convs", "stem", "shortcuts", "elementwise_glue", "total"]
    print(f"{'model':<34}{'b':>4}{'stem':>8}" + "".join(f"{k:>18}" for k in keys))
    for s in rep["stages"]:
        print(f"{s['model'][:33]:<34}{s['batch']:>4}{s.get('stem_precision', 'float32'):>8}" + "".join(
            f"{s[k]:>10.3f} ({100 * s[k] / s['total']:>3.0f}%)" for k in keys))
    if rep["shipped"]:
        print("\n" + json.dumps(rep["shipped"]))
    print("\nfloors:")
    for f in rep["floors"]:
        print(f"  [{'met' if f['met'] else 'NOT met'}] {f['floor']}: {f['value']}")


def markdown(rep) -> str:
    """The README's table of a run (median ms per batch; bold: refbnn at or below both OpenVINO
    columns) and its 1-thread stage split (ms: binary convs / stem / shortcuts / glue of total)."""
    cols = ("refbnn_ms", "refbnn_bf16_ms", "ov_f32_ms", "ov_default_ms", "r18_fp32_ms",
            "r18_bf16_ms")
    lines = ["| model, batch, threads | refbnn | refbnn, bf16 stem | OpenVINO f32 | "
             "OpenVINO default | ResNet-18 fp32 | ResNet-18 bf16 |", "|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        ov = min(r.get("ov_f32_ms", float("inf")), r.get("ov_default_ms", float("inf")))
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None or v != v:
                cells.append("-")
                continue
            text = f"{v:.2f}"
            cells.append(f"**{text}**" if c.startswith("refbnn") and v <= ov else text)
        name = r["model"].replace(" (weights/ftbnn18.h5)", ".h5")
        lines.append(f"| {name}, {r['batch']}, {r['threads']} | " + " | ".join(cells) + " |")
    lines.append("")
    for st in rep.get("stages", []):
        if st.get("threads", 1) != 1:
            continue
        parts = " / ".join(f"{st[k]:.2f}" for k in STAGES_ORDER)
        lines.append(f"- {st['model']}, batch {st['batch']}, {st['stem_precision']} stem: {parts} "
                     f"of {st['total']:.2f}")
    return "\n".join(lines)


STAGES_ORDER = ("binary_convs", "stem", "shortcuts", "elementwise_glue")


if __name__ == "__main__":
    main()
