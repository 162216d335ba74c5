"""`cbir evaluate` and `cbir train`: figures of a catalog against labelled queries, and
fine-tuning the model on its labelled images.
"""

from __future__ import annotations

import json
from typing import Any

import click

from pipeline import api
from pipeline.cli.options import WritablePath, common_options, runtime_options, typed
from pipeline.config import DEFAULTS
from pipeline.specs import OPTIONS, SPEC


@click.command("evaluate")
@click.argument("queries", required=False)
@click.option("--leave-one-out", is_flag=True, help="Each catalog image queries the rest.")
@click.option(
    "--method",
    type=click.Choice(["resnet50", "color", "hybrid"]),
    default="resnet50",
    show_default=True,
    help="Descriptor: the paper's deep feature, HSV colour, or both.",
)
@click.option(
    "--hybrid-weight",
    type=typed(OPTIONS["hybrid_weight"]),
    default=0.5,
    show_default=True,
    help="With --method hybrid: weight of the deep feature (colour gets the rest).",
)
@click.option(
    "--groundtruth",
    type=click.Path(dir_okay=False),
    default=None,
    help="Instance benchmark instead: a CSV of query,relevant file names of catalog images "
    "(Holidays, UKBench); reports mAP (query excluded) and the N-S score (top 4).",
)
@click.option("--index", default=None, help="Evaluate an approximate index (adds recall@10).")
@click.option(
    "--rerank",
    default=None,
    help="Re-rank as in search: dba, aqe, dba+aqe, and verify alone or last (dba+verify).",
)
@click.option(
    "--verify-n",
    "verify_n",
    type=typed(SPEC["verify_n"]),
    default=None,
    help=f"Candidates that --rerank verify checks [default {DEFAULTS['verify_n']}].",
)
@click.option(
    "--rotations",
    type=typed(SPEC["rotations"]),
    default=None,
    help="With --groundtruth: decode each query's file again, turned by these angles, and "
    "keep each image's best score, as 'cbir search FILE --rotations' does; the database "
    "vectors stay as stored. 4 angles: 4x the queries' embedding and ranking "
    f"[default {DEFAULTS['rotations']}: off].",
)
@click.option(
    "--report",
    "report_dir",
    type=WritablePath(folder=True),
    help="Write an HTML report (top-10 thumbnails, per-class chart) here.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@runtime_options
@common_options
def evaluate_cmd(
    queries, leave_one_out, method, hybrid_weight, groundtruth, report_dir, as_json, **options
):
    """mAP, P@1, P@10 and per-class figures against labelled QUERIES (manifest CSV or folder).

    With --groundtruth FILE.csv: an instance benchmark over the catalog's own images.
    """
    result = api.evaluate(
        queries, leave_one_out, method, hybrid_weight, groundtruth=groundtruth, **options
    )
    if report_dir:
        result["report"] = str(api.write_report(result, report_dir))
    if groundtruth is not None:
        _print_instances(result, as_json)
        return
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "per_query"}, indent=2))
        return
    click.echo(
        f"{result['method']} (rerank {result['rerank']}), {result['queries']} queries, "
        f"{result['database']} database images, {result['protocol']}"
    )
    click.echo(
        f"mAP {result['map']:.4f}   P@1 {result['p_at_1']:.4f}   P@10 {result['p_at_10']:.4f}"
    )
    if "recall_at_10" in result:
        click.echo(f"index {result['index']}: recall@10 against exact {result['recall_at_10']:.4f}")
    click.echo(f"  {'class':<32} {'queries':>7} {'mAP':>7} {'P@10':>7}")
    for label, c in result["per_class"].items():
        click.echo(f"  {label:<32} {c['queries']:>7} {c['map']:7.4f} {c['p_at_10']:7.4f}")
    if report_dir:
        click.echo(f"report: {result['report']}")


def _print_instances(result: dict[str, Any], as_json: bool) -> None:
    """The instance benchmark's figures: summary lines, or JSON with every query's figures."""
    if as_json:
        out = {k: v for k, v in result.items() if k != "per_query"}
        out["per_query"] = [
            {k: v for k, v in q.items() if k != "top10"} for q in result["per_query"]
        ]
        click.echo(json.dumps(out, indent=2))
        return
    n = result["database"]
    turned = f", rotations {result['rotations']}" if result.get("rotations", "0") != "0" else ""
    click.echo(
        f"{result['method']} (rerank {result['rerank']}{turned}), {result['queries']} queries, "
        f"{n} images ranked, {result['pairs']} relevant pairs, {result['protocol']}"
    )
    click.echo(
        f"mAP {result['map']:.4f}   (Holidays protocol: each query ranks the other {n - 1} "
        "images, itself excluded)"
    )
    click.echo(
        f"N-S {result['ns_score']:.3f} of 4   (UKBench protocol: its group in the top 4 of all "
        f"{n}, the query included; {result['ns_best']:.3f} at best for these groups)"
    )
    if "report" in result:
        click.echo(f"report: {result['report']}")


@click.command("train")
@click.option(
    "--out",
    required=True,
    type=WritablePath(folder=False),
    help="Where to save the fine-tuned weights (NAME.weights.h5; NAME.weights.h5.json beside).",
)
@click.option(
    "--epochs",
    type=typed(OPTIONS["epochs"]),
    default=15,
    show_default=True,
    help="At most this many epochs (early stopping on validation loss).",
)
@click.option(
    "--val-fraction",
    "val_fraction",
    type=typed(OPTIONS["val_fraction"]),
    default=0.2,
    show_default=True,
    help="Share of each label held out for validation and early stopping.",
)
@click.option("--seed", type=typed(OPTIONS["seed"]), default=0, show_default=True)
@click.option(
    "--learning-rate",
    "learning_rate",
    type=typed(OPTIONS["learning_rate"]),
    default=1e-4,
    show_default=True,
    help="Adam learning rate for conv5 and the head.",
)
@common_options
def train_cmd(
    out: str, epochs: int, val_fraction: float, seed: int, learning_rate: float, **options
) -> None:
    """Fine-tune ResNet50 on the catalog's labelled images (80/20 train/validation split).

    Then index with the new weights into a new catalog: cbir index --weights OUT --catalog NEW.db
    """
    record = api.train(out, epochs, val_fraction, seed, learning_rate, **options)
    click.echo(
        f"trained on {len(record['train_ids'])} images, validated on {len(record['val_ids'])}: "
        f"best epoch {record['best_epoch']}/{record['epochs_run']}, "
        f"val accuracy {record['val_accuracy']:.3f}, val mAP {record['val_map']:.3f}, "
        f"{record['seconds']:.0f} s"
    )
    click.echo(f"weights: {record['weights_out']}")
    click.echo(f"next: cbir index FOLDER --weights {out} --catalog NEW.db")
