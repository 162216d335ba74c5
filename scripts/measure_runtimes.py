"""Keras against OpenVINO (fp32, bf16, int8) and ONNX Runtime (fp32, int8), side by side.

On N Corel-1K images, decoded once into memory: model-only images/s at one
batch size, mean and worst cosine of each runtime's vectors to Keras fp32,
Corel held-out mAP (900 database / 100 query images, when all are included),
conversion and quantisation time, and the cold start of a new process that
builds the embedder (from the model cache for OpenVINO) and embeds one image.
Everything is converted into a fresh temporary cache, so the times are real.

    python scripts/measure_runtimes.py --limit 1000
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import Settings  # noqa: E402
from pipeline.embed import cpu, openvino_convert  # noqa: E402
from pipeline.embed import runtime_keras as embed_keras  # noqa: E402
from pipeline.embed import runtime_openvino as embed_openvino  # noqa: E402
from pipeline.embed.calibration import choose_calibration  # noqa: E402
from pipeline.embed.interface import l2_normalize, preprocess  # noqa: E402
from pipeline.embed.modelcache import ModelCache  # noqa: E402
from pipeline.inputs.decode import decode_file  # noqa: E402
from pipeline.retrieval import metrics  # noqa: E402

SHARED = ROOT.parent / "shared"
COLD_START = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from pipeline.embed import {module} as m
e = m.load({weights!r}, {batch}, "avg", *{args!r})
e.embed(np.zeros((1, 224, 224, 3), np.uint8))
"""


def timed_passes(
    embedders: dict[str, Any], pixels: np.ndarray, batch: int, repeats: int
) -> dict[str, tuple[float, list[float], np.ndarray]]:
    """{name: (median images/s, every run, vectors)}.

    Each embedder first embeds one batch untimed (graph tracing, first
    inference); then the runtimes take turns, so a passing load hits all alike.
    """
    for embed in embedders.values():
        embed(pixels[: 2 * batch])
    runs: dict[str, list[float]] = {name: [] for name in embedders}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name, embed in embedders.items():
            started = time.perf_counter()
            vectors[name] = embed(pixels)
            runs[name].append(len(pixels) / (time.perf_counter() - started))
    return {name: (statistics.median(r), r, vectors[name]) for name, r in runs.items()}


def cold_start(module: str, weights: str, batch: int, args: tuple, env: dict[str, str]) -> float:
    """Seconds for a new Python process to build the embedder and embed one image."""
    code = COLD_START.format(root=str(ROOT), module=module, weights=weights, batch=batch, args=args)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.perf_counter() - started


def held_out_map(vectors: np.ndarray, rows: list[dict[str, str]]) -> float | None:
    """mAP of the query rows against the database rows, or None without both splits."""
    labels = np.array([r["label"] for r in rows])
    query = np.array([r["split"] == "query" for r in rows])
    if not query.any() or query.all():
        return None
    db, db_labels = vectors[~query], labels[~query]
    aps = []
    for v, label in zip(vectors[query], labels[query], strict=True):
        order = np.argsort(-(db @ v), kind="stable")
        relevant = db_labels[order] == label
        aps.append(metrics.average_precision(relevant))
    return float(np.mean(aps))


class OnnxEmbedder:
    """ONNX Runtime on the same Keras graph (tf2onnx), numpy preprocessing; avg pooling only."""

    def __init__(self, path: Path, threads: int, batch: int):
        import onnxruntime as ort

        self.batch = batch
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        out = [
            self.session.run(None, {self.name: preprocess(pixels[s : s + self.batch])})[0]
            for s in range(0, len(pixels), self.batch)
        ]
        return l2_normalize(np.concatenate(out))


def onnx_models(keras_model, folder: Path, calibration: list[np.ndarray]) -> dict[str, Any]:
    """fp32 and int8 (QDQ, per-channel) ONNX files and the seconds each took."""
    import tensorflow as tf
    import tf2onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    started = time.perf_counter()
    spec = (tf.TensorSpec((None, 224, 224, 3), tf.float32, name="input"),)
    function = tf.function(lambda x: keras_model(x, training=False), input_signature=spec)
    tf2onnx.convert.from_function(
        function, input_signature=spec, opset=17, output_path=str(folder / "fp32.onnx")
    )
    converted = time.perf_counter() - started

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({"input": preprocess(p)} for p in calibration)

        def get_next(self):
            return next(self.items, None)

    started = time.perf_counter()
    quantize_static(
        str(folder / "fp32.onnx"),
        str(folder / "int8.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return {"convert": converted, "quantize": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corel", default=str(SHARED / "datasets" / "corel1k"))
    parser.add_argument(
        "--weights", default=str(SHARED / "models" / "resnet50_imagenet_notop.weights.h5")
    )
    parser.add_argument("--limit", type=int, default=1000, help="images (default 1000)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=300, help="int8 calibration images")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs each (median shown)")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    args = parser.parse_args()

    corel = Path(args.corel)
    with (corel / "manifest.csv").open(newline="") as f:
        all_rows = list(csv.DictReader(f))
    rows = all_rows[: args.limit]
    pixels = np.stack(
        [decode_file(str(corel / r["path"]), Settings.max_pixels).pixels for r in rows]
    )
    # From the database split only: the held-out queries must not tune the quantiser.
    calibration = choose_calibration(
        [str(corel / r["path"]) for r in all_rows if r["split"] == "database"], args.calibration
    )
    features = cpu.detect()
    print(f"cpu: {cpu.describe(features)}")
    print(f"images: {len(pixels)} from {corel}, batch {args.batch}, {args.repeats} timed run(s)")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes skew images/s)")

    cache = Path(tempfile.mkdtemp(prefix="cbir-measure-cache-"))
    env = {**os.environ, "CBIR_CACHE": str(cache)}
    embedders: dict[str, Any] = {}  # name -> embed function
    times: dict[str, dict[str, float | None]] = {}  # name -> convert, quantize, cold seconds
    try:
        started = time.perf_counter()
        keras = embed_keras.load(args.weights, args.batch, "avg")
        embedders["keras fp32"] = keras.embed
        times["keras fp32"] = {"convert": time.perf_counter() - started}

        cold_args = {"keras fp32": ("runtime_keras", ())}
        for precision in embed_openvino.PRECISIONS:
            if precision == "bf16" and not features.bf16:
                print("openvino bf16: skipped (no AVX512-BF16 or AMX here)")
                continue
            cal = calibration if precision == "int8" else None
            e = embed_openvino.load(args.weights, args.batch, "avg", precision, cal, str(cache))
            parts = openvino_convert.cache_parts(
                args.weights, "avg", precision, e.producer["calibration"]
            )
            meta = ModelCache(cache).load(parts).meta
            name = f"openvino {precision}"
            embedders[name] = e.embed
            times[name] = {
                "convert": None if precision == "bf16" else meta["conversion_seconds"],
                "quantize": meta.get("quantization_seconds"),
            }
            cold_args[name] = ("runtime_openvino", (precision, cal, str(cache)))

        if not args.no_onnx:
            try:
                import onnxruntime  # noqa: F401
                import tf2onnx  # noqa: F401
            except ImportError:
                print("onnxruntime: skipped (pip install onnxruntime tf2onnx)")
            else:
                cal_pixels = [decode_file(p, Settings.max_pixels).pixels[None] for p in calibration]
                onnx_times = onnx_models(keras.model, cache, cal_pixels)
                for precision in ("fp32", "int8"):
                    name = f"onnxruntime {precision}"
                    embedders[name] = OnnxEmbedder(
                        cache / f"{precision}.onnx", features.cores, args.batch
                    ).embed
                    times[name] = {
                        "convert": onnx_times["convert"] if precision == "fp32" else None,
                        "quantize": onnx_times["quantize"] if precision == "int8" else None,
                    }

        measured = timed_passes(embedders, pixels, args.batch, args.repeats)
        # Cold starts last, one process at a time, with nothing else of ours running.
        for name, (module, load_args) in cold_args.items():
            times[name]["cold"] = cold_start(module, args.weights, args.batch, load_args, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    def fmt(value: float | None, spec: str) -> str:
        width = int(spec.split(".")[0])
        return "-".rjust(width) if value is None else format(value, spec)

    print(
        f"\n{'runtime':18} {'images/s':>9} {'x keras':>8} {'mean cos':>9} {'min cos':>9} "
        f"{'mAP':>7} {'convert s':>9} {'quantise s':>10} {'cold start s':>12}"
    )
    reference, keras_speed = measured["keras fp32"][2], measured["keras fp32"][0]
    for name, (speed, runs, vectors) in measured.items():
        cos = np.sum(vectors * reference, axis=1)
        t = times[name]
        print(
            f"{name:18} {speed:9.1f} {speed / keras_speed:8.2f} "
            f"{cos.mean():9.5f} {cos.min():9.5f} {fmt(held_out_map(vectors, rows), '7.4f')} "
            f"{fmt(t.get('convert'), '9.1f')} {fmt(t.get('quantize'), '10.1f')} "
            f"{fmt(t.get('cold'), '12.2f')}"
            + (f"   runs: {', '.join(f'{x:.1f}' for x in runs)}" if len(runs) > 1 else "")
        )
    print(
        "\nconvert s: keras = building the model; openvino = Keras build + convert_model; "
        "onnxruntime = tf2onnx. quantise s: NNCF / ORT post-training int8 on "
        f"{len(calibration)} calibration images. cold start: a new process builds the embedder "
        "(OpenVINO: from the model cache) and embeds 1 image."
    )


if __name__ == "__main__":
    main()
