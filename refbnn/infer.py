"""``python -m refbnn.infer MODEL.h5 [IMAGE ...]``: run a trained refbnn model.

* Without images: evaluate on the test split of the data set named in the file and print accuracy,
  throughput (images/s) and per-image latency (median and p90) at batch 1 and at a large batch.
* With images (any format and mode pillow reads): convert each as the file's ``input_spec`` says
  (EXIF orientation, transparency, 16-bit grey, grey or RGB, resized to the model's input size,
  ``(p/255 - mean)/std``; ``--invert auto`` by default: see :mod:`refbnn.predictor`) and print the
  top-k classes with probabilities; ``--json`` prints the same as JSON.

``--engine packed`` (default) runs the bit-packed XNOR-popcount engine (:mod:`refbnn.engine`);
``--engine reference`` runs the float NumPy training path in eval mode. The loading is
:func:`refbnn.load`. Bad input (a bad flag, missing file, not an image, an image too large, not a
refbnn file, unsupported version, a ``--data-dir`` without the test split) prints one line and
exits with status 2.
"""

from __future__ import annotations

import json
import time

import numpy as np

from refbnn import cli_util
from refbnn.cli_util import ArgumentParser, UserError, fail
from refbnn.predictor import ENGINES, INVERT, STEM_PRECISIONS, image_batch  # noqa: F401 - image_batch: for callers


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m refbnn.infer", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a refbnn .h5 model, checkpoint or packed file")
    p.add_argument("images", nargs="*", help="image files to classify (default: evaluate the test set)")
    p.add_argument("--engine", choices=ENGINES, default="packed")
    p.add_argument("--stem", choices=STEM_PRECISIONS, default="float32",
                   help="the packed engine's stem arithmetic: float32 (default: the reference's "
                        "numbers) or bf16 (opt-in: faster on AVX512-BF16 CPUs, image and stem "
                        "weights rounded to bfloat16; docs/semantics.md 7b)")
    p.add_argument("--top-k", type=cli_util.int_in(1, 100_000), default=3,
                   help="classes printed per image (default 3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--invert", choices=INVERT, default="auto",
                   help="grey models trained on light-on-dark digits (MNIST): invert dark-on-light "
                        "images; auto (default) inverts when the image border is mostly light")
    p.add_argument("--data-dir", type=cli_util.existing_dir,
                   help="folder with the test split (or <dataset>/ with it); nothing else is searched "
                        "then (default: $REFBNN_DATA_DIR, the cache, ...)")
    p.add_argument("--no-download", action="store_true", help="never try to download the test split")
    p.add_argument("--batch-size", type=cli_util.int_in(1, 4096), default=256,
                   help="large-batch size for the evaluation (default 256)")
    p.add_argument("--latency-runs", type=cli_util.int_in(1, 100_000), default=200,
                   help="single-image runs timed for latency (default 200)")
    p.add_argument("--threads", type=cli_util.threads, default=None,
                   help="threads of refbnn's kernels (default: all cores; BLAS always runs on one)")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def load_runner(path, engine_kind):
    """``(predict function NCHW float32 -> logits, LoadedFile)`` (kept for older callers; use
    :func:`refbnn.load`). Raises :class:`UserError` with a one-line message."""
    m = _load(path, engine_kind)
    return m._forward, m.file


def _load(path, engine, stem="float32"):
    from refbnn.predictor import load

    try:
        return load(path, engine, stem)
    except (FileNotFoundError, ValueError) as e:  # FormatError is a ValueError
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e}") from None


def classify(args, model):
    try:
        probs = model.predict_files(args.images, args.invert)
    except ValueError as e:  # an ImageError, or a file without input_spec
        raise UserError(str(e)) from None
    k = min(args.top_k, probs.shape[1])
    results = []
    for path, p in zip(args.images, probs):
        top = np.argsort(-p, kind="stable")[:k]
        results.append({"file": path, "top": [{"index": int(i), "class": model.class_names[i],
                                              "probability": float(p[i])} for i in top]})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['file']}: " + ", ".join(f"{t['class']} ({t['probability']:.3f})" for t in r["top"]))


def evaluate(args, model):
    from refbnn.data import DataError, batches

    f, predict = model.file, model.logits
    if not f.dataset:
        raise UserError(f"{args.model}: the file names no dataset; pass image files instead")
    if model.layout != "NCHW" or model.input_shape[0] != 1:
        raise UserError(f"{args.model}: the test split is grey NCHW images, the model takes "
                        f"{model.layout} {model.input_shape}; pass image files instead")
    try:
        test, folder = cli_util.load_split(f.dataset, "test", args.data_dir, not args.no_download)
    except DataError as e:
        raise UserError(str(e)) from None
    spec = f.input_spec or {}
    norm = (spec["mean"][0], spec["std"][0]) if spec.get("mean") else "dataset"
    rng = np.random.default_rng(0)
    xs, ys = zip(*batches(test, args.batch_size, rng, shuffle=False, normalize=norm))
    model.warm_up()  # every compiled path (and the one-image buffers) before anything is timed
    predict(xs[0])  # the large batch's buffers
    t0 = time.perf_counter()
    correct = sum(int((predict(x).argmax(1) == y).sum()) for x, y in zip(xs, ys))
    seconds = time.perf_counter() - t0
    n = len(test)
    lat = []
    singles = np.concatenate(xs)[: args.latency_runs]
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
    result = {"model": args.model, "engine": args.engine, "stem": args.stem, "dataset": f.dataset,
              "data_dir": str(folder), "images": n,
              "accuracy": correct / n, "images_per_second": n / seconds,
              "batch1_latency_ms": {"median": float(np.median(lat_ms)),
                                    "p90": float(np.percentile(lat_ms, 90))},
              "large_batch": {"size": len(big), "ms_per_image": per_image_big}}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        stem = f", {args.stem} stem" if args.stem != "float32" else ""
        print(f"{args.model} ({args.engine} engine{stem}) on {f.dataset} test ({folder}): accuracy "
              f"{correct / n:.4f} ({correct}/{n})")
        print(f"throughput {n / seconds:,.0f} images/s at batch {args.batch_size}; "
              f"batch 1 latency median {np.median(lat_ms):.3f} ms, p90 {np.percentile(lat_ms, 90):.3f} ms; "
              f"batch {len(big)}: {per_image_big:.4f} ms/image")


@cli_util.command
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits
        if args.threads is not None:
            import numba
            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        # refbnn's kernels (and refbnn.nn's GEMM split) use numba's threads; a multi-threaded BLAS
        # beside them keeps polling after each call and takes their cores. Measured, 2 threads,
        # weights/ftbnn18.h5 on MNIST: BLAS at 2 threads 2,688-2,910 images/s, at 1: 4,389.
        threadpool_limits(1)
        model = _load(args.model, args.engine, args.stem)
        if args.images:
            classify(args, model)
        else:
            evaluate(args, model)
    except UserError as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    cli_util.run_main(main)
