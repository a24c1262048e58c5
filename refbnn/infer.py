"""``python -m refbnn.infer MODEL.h5 [IMAGE ...]``: run a trained refbnn model.

* Without images: evaluate on the test split of the data set named in the file and print accuracy,
  throughput (images/s) and per-image latency (median and p90) at batch 1 and at a large batch.
* With images (any format and mode pillow reads): convert each as the file's ``input_spec`` says
  (grey or RGB, resized to the model's input size, ``(p/255 - mean)/std``) and print the top-k classes
  with probabilities; ``--json`` prints the same as JSON.

``--engine packed`` (default) runs the bit-packed XNOR-popcount engine (:mod:`refbnn.engine`);
``--engine reference`` runs the float NumPy training path in eval mode. Bad input (missing file, not
an image, not a refbnn file, unsupported version) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m refbnn.infer", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a refbnn .h5 model, checkpoint or packed file")
    p.add_argument("images", nargs="*", help="image files to classify (default: evaluate the test set)")
    p.add_argument("--engine", choices=("packed", "reference"), default="packed")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="grey models trained on light-on-dark digits (MNIST): invert dark-on-light "
                        "images; auto inverts when the image border is mostly light")
    p.add_argument("--data-dir", help="folder with the test split (else $REFBNN_DATA_DIR, cache, ...)")
    p.add_argument("--batch-size", type=int, default=256, help="large-batch size for the evaluation")
    p.add_argument("--latency-runs", type=int, default=200, help="single-image runs timed for latency")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of refbnn's kernels (default: all cores; BLAS always runs on one)")
    return p.parse_args(argv)


class UserError(Exception):
    pass


def load_runner(path, engine_kind):
    """(predict function NCHW float32 -> logits, LoadedFile)."""
    from refbnn import fileformat, models
    from refbnn.engine import Engine, EngineError

    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    try:
        f = fileformat.load(path)
    except fileformat.FormatError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    if engine_kind == "packed":
        # built from the config and the named tensors: a packed-only file needs no float model
        try:
            return Engine.from_file(f).forward, f
        except EngineError as e:  # e.g. sign_at_zero=0 (converted official Bi-Real Net checkpoints)
            raise UserError(f"{path}: {e}; --engine reference runs it on the float path") from None
        except models.ConfigError as e:
            raise UserError(f"{path}: {e}") from None
    try:
        model = models.build(f.config)
    except ValueError as e:
        raise UserError(f"{path}: model config: {e}") from None
    scales = {n: b.scale for n, b in f.binary.items() if b.scale is not None}
    state = f.state_dict if f.kind != "packed" else f.sign_state_dict()
    if f.kind == "packed":
        # latent weights are gone: alpha * sign reproduces both sign(W) and mean|W| = alpha
        for name, alpha in scales.items():
            a = np.asarray(alpha, np.float32).reshape(-1, *[1] * (state[name].ndim - 1))
            state[name] = (state[name] * a).astype(np.float32)
    model.load_state_dict(state)
    model.eval()
    return model.forward, f


def image_batch(paths, spec, invert):
    from PIL import Image, UnidentifiedImageError

    c, h, w = spec["shape"] if spec["layout"] == "NCHW" else (spec["shape"][2], *spec["shape"][:2])
    mode = "L" if spec["channel_order"] == "L" else "RGB"
    mean = np.asarray(spec["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, -1, 1, 1)
    out = np.empty((len(paths), c, h, w), np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im = im.convert(mode).resize((w, h), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{path}: not a readable image ({e})") from None
        if a.ndim == 2:
            a = a[None]
        else:
            a = a.transpose(2, 0, 1)
        if mode == "L" and (invert == "yes" or (invert == "auto" and _border_mean(a[0]) > 0.5)):
            a = 1.0 - a
        out[i] = a
    if spec["channel_order"] == "BGR":
        out = out[:, ::-1]
    return (out - mean) / std


def _border_mean(a):
    return float(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).mean())


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classify(args, predict, f):
    if f.input_spec is None:
        raise UserError(f"{args.model}: the file has no input_spec, so images cannot be converted")
    x = image_batch(args.images, f.input_spec, args.invert)
    probs = softmax(predict(x).astype(np.float64))
    names = f.class_names or [str(i) for i in range(probs.shape[1])]
    k = max(1, min(args.top_k, probs.shape[1]))
    results = []
    for path, p in zip(args.images, probs):
        top = np.argsort(-p, kind="stable")[:k]
        results.append({"file": path, "top": [{"index": int(i), "class": names[i],
                                              "probability": float(p[i])} for i in top]})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['file']}: " + ", ".join(f"{t['class']} ({t['probability']:.3f})" for t in r["top"]))


def evaluate(args, predict, f):
    from refbnn.data import DataError, batches, load_dataset

    if not f.dataset:
        raise UserError(f"{args.model}: the file names no dataset; pass image files instead")
    try:
        test = load_dataset(f.dataset, "test", data_dir=args.data_dir)
    except DataError as e:
        raise UserError(str(e)) from None
    spec = f.input_spec or {}
    norm = (spec["mean"][0], spec["std"][0]) if spec.get("mean") else "dataset"
    rng = np.random.default_rng(0)
    xs, ys = zip(*batches(test, args.batch_size, rng, shuffle=False, normalize=norm))
    predict(xs[0][:1])  # warm-up: JIT load, buffers
    t0 = time.perf_counter()
    correct = sum(int((predict(x).argmax(1) == y).sum()) for x, y in zip(xs, ys))
    seconds = time.perf_counter() - t0
    n = len(test)
    lat = []
    singles = np.concatenate(xs)[: max(args.latency_runs, 1)]
    for i in range(len(singles)):
        t = time.perf_counter()
        predict(singles[i:i + 1])
        lat.append(time.perf_counter() - t)
    lat_ms = np.array(lat) * 1e3
    big = xs[0]
    big_ms = []
    for _ in range(5):  # median of 5 calls: one call is at the mercy of the scheduler
        t = time.perf_counter()
        predict(big)
        big_ms.append((time.perf_counter() - t) / len(big) * 1e3)
    per_image_big = float(np.median(big_ms))
    result = {"model": args.model, "engine": args.engine, "dataset": f.dataset, "images": n,
              "accuracy": correct / n, "images_per_second": n / seconds,
              "batch1_latency_ms": {"median": float(np.median(lat_ms)),
                                    "p90": float(np.percentile(lat_ms, 90))},
              "large_batch": {"size": len(big), "ms_per_image": per_image_big}}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.model} ({args.engine} engine) on {f.dataset} test: accuracy {correct / n:.4f} "
              f"({correct}/{n})")
        print(f"throughput {n / seconds:,.0f} images/s at batch {args.batch_size}; "
              f"batch 1 latency median {np.median(lat_ms):.3f} ms, p90 {np.percentile(lat_ms, 90):.3f} ms; "
              f"batch {len(big)}: {per_image_big:.4f} ms/image")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.top_k < 1 or args.batch_size < 1:
            raise UserError("--top-k and --batch-size must be positive")
        from threadpoolctl import threadpool_limits
        if args.threads is not None:
            import numba
            if args.threads < 1:
                raise UserError("--threads must be >= 1")
            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        # refbnn's kernels (and refbnn.nn's GEMM split) use numba's threads; a multi-threaded BLAS
        # beside them keeps polling after each call and takes their cores. Measured, 2 threads,
        # weights/ftbnn18.h5 on MNIST: BLAS at 2 threads 2,688-2,910 images/s, at 1: 4,389.
        threadpool_limits(1)
        predict, f = load_runner(args.model, args.engine)
        if args.images:
            classify(args, predict, f)
        else:
            evaluate(args, predict, f)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
