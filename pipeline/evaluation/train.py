"""Fine-tuning ResNet50 on the catalog's labelled images (the paper's step 1), on a CPU.

Only what the catalog holds is used: its indexed images and their labels, split
80/20 into train and validation (stratified, seeded). Held-out query images
never enter; nothing here reads a manifest or a query folder.

To fit in minutes: the frozen stages (conv1 to conv4) run once per image and
their 14x14x1024 activations are cached; only conv5 and a cosine-softmax head
train on them, with horizontal flips of the cached maps as augmentation, and
training stops early on the validation loss. The result is a full ResNet50
weights file (no top), usable with `cbir index --weights FILE`; its values
differ, so its fingerprint differs and it needs a new catalog.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.embed.interface import l2_normalize, preprocess
from pipeline.embed.runtime_keras import import_keras
from pipeline.errors import CbirError
from pipeline.inputs.decode import DecodeError, decode_file
from pipeline.retrieval.metrics import average_precision
from pipeline.store import reads
from pipeline.store.collection import Collection

SPLIT_LAYER = "conv4_block6_out"


def stratified_split(
    labels: list[str], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions for train and validation, `val_fraction` of each class in validation."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    train, val = [], []
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels_arr == label)
        rng.shuffle(members)
        n_val = int(round(len(members) * val_fraction)) if len(members) > 1 else 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def _split_map(
    feats: np.ndarray, y: np.ndarray, train_pos: np.ndarray, val_pos: np.ndarray
) -> float:
    """mAP of validation images querying the training images by cosine."""
    db, q = l2_normalize(feats[train_pos]), l2_normalize(feats[val_pos])
    order = np.argsort(-(q @ db.T), axis=1, kind="stable")
    aps = [
        average_precision(y[train_pos][order[i]] == y[p], int((y[train_pos] == y[p]).sum()))
        for i, p in enumerate(val_pos)
    ]
    return float(np.mean(aps))


def training_rows(db) -> list[dict[str, Any]]:
    """The catalog's indexed, labelled images: the only data training may see."""
    return list(
        db.query(
            "select id, path, label from images where status = 'indexed' "
            "and label is not null and label != '' order by id"
        )
    )


def _build(weights: str, n_classes: int, scale: float = 16.0):
    keras = import_keras()
    base = keras.applications.ResNet50(
        weights=weights, include_top=False, pooling="avg", input_shape=(224, 224, 3)
    )
    cut = base.get_layer(SPLIT_LAYER).output
    lower = keras.Model(base.input, cut)
    upper = keras.Model(cut, base.output)  # conv5 + average pooling, sharing base's layers
    inp = keras.Input(cut.shape[1:])
    features = upper(inp, training=False)  # BatchNorm keeps its ImageNet statistics
    unit = keras.layers.UnitNormalization()(features)
    # Cosine softmax: logits are scaled cosines to unit-norm class vectors, which
    # shapes the feature space for the cosine retrieval that follows.
    logits = keras.layers.Dense(
        n_classes, use_bias=False, kernel_constraint=keras.constraints.UnitNorm(axis=0)
    )(unit)
    scaled = keras.layers.Rescaling(scale)(logits)
    head = keras.Model(inp, keras.layers.Activation("softmax")(scaled))
    for layer in lower.layers:
        layer.trainable = False
    return keras, base, lower, upper, head


def train(
    coll: Collection,
    settings: Settings,
    out: str | Path,
    epochs: int = 15,
    val_fraction: float = 0.2,
    seed: int = 0,
    learning_rate: float = 1e-4,
    patience: int = 3,
    log: Callable[[str], Any] = print,
    decode: Callable[[str, int], Any] = decode_file,
) -> dict[str, Any]:
    """Fine-tune on the catalog's labelled images and save full ResNet50 weights to `out`."""
    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise CbirError("the output file name must end in .weights.h5 (Keras weights format)")
    db = coll.db
    rows = training_rows(db)
    labels = sorted({r["label"] for r in rows})
    if len(labels) < 2:
        raise CbirError("training needs indexed images of at least two labels in the catalog")
    weights = settings.weights
    started = time.perf_counter()

    pixels, kept = [], []
    for r in rows:
        try:
            pixels.append(decode(r["path"], settings.max_pixels).pixels)
            kept.append(r)
        except DecodeError as e:
            log(f"skipping {r['path']}: {e}")
    rows = kept
    y = np.array([labels.index(r["label"]) for r in rows])
    train_pos, val_pos = stratified_split([r["label"] for r in rows], val_fraction, seed)
    if len(val_pos) == 0:
        raise CbirError("too few images per label for a validation split")

    import_keras().utils.set_random_seed(seed)  # before the head's weights are drawn
    keras, base, lower, upper, head = _build(weights, len(labels))
    log(f"caching conv4 activations of {len(rows)} images ...")
    batch = settings.batch_size
    acts = np.concatenate(
        [
            np.asarray(lower.predict_on_batch(preprocess(np.stack(pixels[i : i + batch]))))
            for i in range(0, len(pixels), batch)
        ]
    )
    x_train = np.concatenate([acts[train_pos], acts[train_pos][:, :, ::-1, :]])  # + flips
    y_train = np.concatenate([y[train_pos], y[train_pos]])
    head.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True
    )
    log(f"training conv5 + head: {len(train_pos)} train, {len(val_pos)} validation images")
    history = head.fit(
        x_train,
        y_train,
        validation_data=(acts[val_pos], y[val_pos]),
        epochs=epochs,
        batch_size=32,
        shuffle=True,
        callbacks=[stop],
        verbose=0,
    )
    # Retrieval on the validation split alone (queries: validation, database: training
    # images), the figure to compare training settings by.
    feats = np.concatenate(
        [
            np.asarray(upper.predict_on_batch(acts[i : i + batch]))
            for i in range(0, len(acts), batch)
        ]
    )
    val_map = _split_map(feats, y, train_pos, val_pos)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.weights.h5")
    base.save_weights(tmp)
    tmp.replace(out)
    h = history.history
    best = int(np.argmin(h["val_loss"]))
    record = {
        "weights_out": str(out.resolve()),
        "initial_weights": weights,
        "catalog": str(coll.path.resolve()),
        "labels": labels,
        "train_ids": [int(rows[i]["id"]) for i in train_pos],
        "val_ids": [int(rows[i]["id"]) for i in val_pos],
        "train_paths": [rows[i]["path"] for i in train_pos],
        "val_paths": [rows[i]["path"] for i in val_pos],
        "epochs_run": len(h["val_loss"]),
        "best_epoch": best + 1,
        "val_loss": float(h["val_loss"][best]),
        "val_accuracy": float(h["val_accuracy"][best]),
        "train_accuracy": float(h["accuracy"][best]),
        "val_map": val_map,
        "seconds": round(time.perf_counter() - started, 1),
        "split_layer": SPLIT_LAYER,
        "seed": seed,
        "learning_rate": learning_rate,
        "catalog_generation": reads.generation(db),
    }
    Path(str(out) + ".json").write_text(json.dumps(record, indent=2))
    return record
