"""The `cbir` command: parse options, call one API function, print."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from pipeline import api, errors
from pipeline.cli.options import (
    MemorySize,
    OneLineGroup,
    WritablePath,
    common_options,
    descriptor_options,
    runtime_options,
    search_param_options,
    typed,
)
from pipeline.cli.serving import bench_group, serve_cmd
from pipeline.config import DEFAULTS, OPTIONS, SPEC
from pipeline.errors import CbirError
from pipeline.retrieval import whitening
from pipeline.retrieval.growing import describe_update
from pipeline.retrieval.shards import MAX_SHARDS

# Click 8.2+ raises this for a bare group (8.1 prints the help and exits 0 itself).


@click.group("cbir", cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cbir")
@click.option(
    "--debug",
    is_flag=True,
    envvar="CBIR_DEBUG",
    help="Print the full traceback of an unexpected error [env CBIR_DEBUG].",
)
def main(debug: bool) -> None:
    """Content-based image retrieval: index a folder once, then search it by example."""
    errors.DEBUG = debug
    # File names that are not valid UTF-8 are printed as their original bytes (as
    # `ls` does), whatever the locale's error handler; never an encoding traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    # Notices (repairs, skipped work) go to stderr as one line each.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cbir: %(levelname)s: %(message)s"))
    logger = logging.getLogger("cbir")
    logger.handlers[:] = [handler]
    logger.propagate = False


@main.command("index")
@click.argument("paths", nargs=-1, required=False)
@click.option(
    "--labels",
    default=None,
    help="'folder' (parent folder name, default), 'none', or a CSV of path,label.",
)
@click.option("--split", default=None, help="With a manifest CSV as PATH: only rows of this split.")
@click.option("--prune", is_flag=True, default=None, help="Remove files that are gone from disk.")
@click.option("--strict", is_flag=True, default=None, help="Exit 1 if any file failed.")
@click.option(
    "--retry-failed",
    "retry_failed",
    is_flag=True,
    default=None,
    help="Try again files that failed before, even if unchanged.",
)
@click.option("--workers", type=typed(SPEC["workers"]), default=None, help="Decoding threads.")
@click.option(
    "--batch-size",
    "batch_size",
    type=typed(SPEC["batch_size"]),
    default=None,
    help="Images per model batch.",
)
@descriptor_options
@click.option(
    "--max-pixels",
    "max_pixels",
    type=typed(SPEC["max_pixels"]),
    default=None,
    help="Refuse images with more pixels, in the file or once resized for the model "
    "(decompression bombs); and images thinner than 50:1.",
)
@click.option(
    "--engine",
    type=typed(SPEC["engine"]),
    default=None,
    help="Where decoding and the model run: local (default) or ray (a Ray cluster).",
)
@click.option(
    "--ray-address",
    "ray_address",
    default=None,
    help="With --engine ray: 'auto' (the cluster `ray start` runs here), HOST:PORT, "
    "or none to start a local Ray for the job.",
)
@click.option(
    "--actors",
    type=typed(SPEC["actors"]),
    default=None,
    help="With --engine ray: model actors (one model each); 0 = as many as the CPUs allow.",
)
@click.option(
    "--actor-cpus",
    "actor_cpus",
    type=typed(SPEC["actor_cpus"]),
    default=None,
    help="With --engine ray: CPUs per actor, and its model's threads [default 1].",
)
@click.option(
    "--update-indexes",
    "update_indexes",
    is_flag=True,
    default=None,
    help="Then grow stale IVF indexes without retraining (as build-index NAME --update).",
)
@runtime_options
@common_options
def index_cmd(paths: tuple[str, ...], **options: Any) -> None:
    """Index image folders, files, or manifest CSVs (path,label,split); incremental."""
    from tqdm import tqdm

    settings = api.settings_for(**options)
    bar: list[tqdm] = []

    def on_total(n: int) -> None:
        # disable=None: a bar on a terminal, silence when piped or in CI.
        bar.append(tqdm(total=n, unit="img", disable=None, file=sys.stderr, desc="indexing"))

    def progress(n: int) -> None:
        bar[0].update(n)

    def on_status(text: str) -> None:
        if bar:
            bar[0].set_postfix_str(text)

    try:
        summary = api.index(
            list(paths), progress=progress, on_total=on_total, on_status=on_status, **options
        )
    finally:
        for b in bar:
            b.close()
    click.echo(
        f"scanned {summary.scanned}, unchanged {summary.unchanged}, "
        f"indexed {summary.indexed + summary.copied} "
        f"(model {summary.indexed}, copied from duplicates {summary.copied}), "
        f"failed {summary.failed}, duplicates {summary.duplicates}, "
        f"relabelled {summary.relabelled}, pruned {summary.pruned}"
        + (f", same file as a catalogued one {summary.aliases}" if summary.aliases else "")
        + (f", listed but missing {summary.missing}" if summary.missing else "")
    )
    for line in summary.index_notes:
        click.echo(line)
    for path, reason in summary.failures[:20]:
        click.echo(f"  failed: {path}: {reason}", err=True)
    if len(summary.failures) > 20:
        click.echo(f"  ... and {len(summary.failures) - 20} more (see 'cbir info')", err=True)
    if summary.failed and settings.strict:
        sys.exit(1)


@main.command("search")
@click.argument("queries", nargs=-1)
@click.option(
    "--id",
    "ids",
    type=typed(OPTIONS["id"]),
    multiple=True,
    help="Query by catalog id (repeatable).",
)
@click.option(
    "-k", type=typed(SPEC["k"]), default=None, help=f"Number of results [default {DEFAULTS['k']}]."
)
@click.option("--index", default=None, help="'exact' (default) or the name of a built index.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one line per query.")
@click.option("--allow-stale", is_flag=True, help="Search an approximate index even if stale.")
@click.option("--rerank", default=None, help="Re-rank: 'dba', 'aqe' or 'dba+aqe' [default none].")
@click.option(
    "--shortlist",
    type=typed(SPEC["shortlist"]),
    default=None,
    help=f"Candidates to re-rank [default {DEFAULTS['shortlist']}].",
)
@click.option(
    "--rotations",
    type=typed(SPEC["rotations"]),
    default=None,
    help="For photos stored sideways without an EXIF tag: also query each image turned by "
    "these angles (before the crop) and keep each result's best score. Costs one more "
    "embedding and search of the query per angle (4 angles: 4x). --id queries use their "
    f"stored vector, unturned [default {DEFAULTS['rotations']}: off].",
)
@click.option(
    "--relevant",
    type=typed(OPTIONS["id"]),
    multiple=True,
    help="Relevance feedback: an id you marked relevant (repeatable).",
)
@click.option(
    "--not-relevant",
    "not_relevant",
    type=typed(OPTIONS["id"]),
    multiple=True,
    help="Relevance feedback: an id you marked not relevant (repeatable).",
)
@search_param_options
@descriptor_options
@runtime_options
@common_options
def search_cmd(queries: tuple[str, ...], ids: tuple[int, ...], as_json: bool, **options) -> None:
    """Top-k most similar images for image files, folders of images, or --id N."""
    if not queries and not ids:
        raise CbirError("give a query image, a folder of images, or --id N")
    answers = api.search([*queries, *ids], **options)
    bad = 0
    for a in answers:
        if "error" in a:
            bad += 1
            click.echo(f"cbir: error: {a['error']}", err=True)
            if not as_json:
                continue
        if as_json:
            click.echo(json.dumps(a))
            continue
        click.echo(
            f"query: {a['query']}" + (f" (id {a['query_id']})" if a["query_id"] is not None else "")
        )
        click.echo(f"  {'rank':>4}  {'score':>7}  {'label':<14} path")
        for r in a["results"]:
            click.echo(
                f"  {r['rank']:>4}  {r['score']:7.4f}  {str(r['label'] or '-'):<14} {r['path']}"
            )
    if bad:
        sys.exit(2)


@main.command("build-index")
@click.argument("name")
@click.option(
    "--factory",
    default=None,
    help="FAISS index factory string, e.g. 'IVF256,Flat', 'HNSW32', 'IVF256,PQ64'.",
)
@click.option(
    "--auto",
    is_flag=True,
    help="Choose the index for the collection size and memory budget, and tune it.",
)
@click.option(
    "--max-memory",
    "max_memory",
    type=MemorySize(),
    default="2GB",
    show_default=True,
    help="Memory budget for --auto, e.g. 2GB, 512MB.",
)
@click.option(
    "--target-recall",
    "target_recall",
    type=typed(OPTIONS["target_recall"]),
    default=None,
    help="Raise nprobe/efSearch until recall@10 reaches this [default 0.95 with --auto].",
)
@click.option(
    "--update",
    is_flag=True,
    help="Grow an IVF index to the catalog without retraining: add new vectors, remove "
    "pruned ones; exit 1 if its recall@10 would fall more than 0.01 below the trained one.",
)
@click.option(
    "--shards",
    type=click.IntRange(1, MAX_SHARDS),
    default=None,
    help="IVF: add the vectors in N shards and merge them into an on-disk index "
    "(NAME+TAG.ivfdata beside the index file) [default 1; a rebuild of an on-disk "
    "index stays on disk unless 1].",
)
@click.option(
    "--engine",
    type=typed(SPEC["engine"]),
    default=None,
    help="Where the shards are built: local (this process, one after another; default) "
    "or ray (one Ray task each, an on-disk index).",
)
@click.option(
    "--ray-address",
    "ray_address",
    default=None,
    help="With --engine ray: 'auto' (the cluster `ray start` runs here), HOST:PORT, "
    "or none to start a local Ray for the build.",
)
@click.option(
    "--whiten",
    is_flag=True,
    help="PCA-whiten the index (PCA, L2, then --factory, default Flat), learned on 80% of "
    "the vectors and refused (exit 1) if it lowers the validation mAP.",
)
@click.option(
    "--whiten-dim",
    "whiten_dim",
    type=typed(whitening.DIM_SPEC),
    default=None,
    help=f"Dimensions the whitening keeps, below the number of vectors "
    f"[default {whitening.DEFAULT_DIM}].",
)
@click.option(
    "--shrinkage",
    type=typed(whitening.SHRINKAGE_SPEC),
    default=None,
    help="Softens the whitening: components scaled by eigenvalue^(-0.5(1-S)); 0 = full "
    f"whitening, 1 = plain PCA [default {whitening.DEFAULT_SHRINKAGE}].",
)
@click.option(
    "--whitening",
    "whitening_file",
    default=None,
    metavar="FILE",
    help="Use the fitted transform in FILE (from --save-whitening) instead of learning one.",
)
@click.option(
    "--validate",
    default=None,
    metavar="labels|FILE.csv",
    help="Validate the whitening by label mAP on held-out images, or on a query,relevant "
    "ground-truth CSV (fitted on every other image) [default labels, when there are any].",
)
@click.option(
    "--save-whitening",
    "save_whitening",
    type=WritablePath(folder=False),
    default=None,
    metavar="FILE",
    help="Write the learned (and validated) transform to FILE, for --whitening.",
)
@search_param_options
@common_options
def build_index_cmd(
    name: str,
    factory: str | None,
    params: list[str],
    auto: bool,
    max_memory: int,
    target_recall: float | None,
    update: bool,
    shards: int | None,
    engine: str | None,
    whiten: bool,
    whiten_dim: int | None,
    shrinkage: float | None,
    whitening_file: str | None,
    validate: str | None,
    save_whitening: str | None,
    **options,
) -> None:
    """Build an index NAME from the stored vectors (no re-extraction); rebuild if it exists.

    Every build reports its recall@10 against exact search, measured on 200
    vectors sampled from the collection (a whitened index: exact search in its
    whitened space). --update grows an IVF index instead.
    """
    record = api.build_index(
        name,
        factory,
        params or None,
        auto,
        max_memory,
        target_recall,
        engine=engine,
        shards=shards,
        update=update,
        whiten=whiten,
        whiten_dim=whiten_dim,
        shrinkage=shrinkage,
        whitening=whitening_file,
        validate=validate,
        save_whitening=save_whitening,
        **options,
    )
    if "added" in record:
        click.echo(describe_update(record))
        return
    ondisk = record.get("data_bytes")
    size = record["bytes"] + (ondisk or 0)
    click.echo(
        f"built index {record['name']} ({record['factory']}, params {record['params']}): "
        f"{record['ntotal']} vectors, {size:,} bytes "
        f"({size / max(1, record['ntotal']):.0f} bytes/vector), "
        f"{record['build_seconds']:.2f} s, recall@10 {record['recall_at_10']:.4f}"
    )
    timings = record.get("timings")
    if timings:
        click.echo(
            f"on disk: {ondisk:,} bytes of inverted lists; train {timings['train_s']:.2f} s, "
            f"{timings['shards']} shards added in {timings['add_s']:.2f} s "
            f"({engine or 'local'}), merged in {timings['merge_s']:.2f} s"
        )
    white = whitening.read_note(record.get("note"))
    if white:
        click.echo(whitening.describe(white["whitening"]))
        if white.get("chosen"):
            click.echo(f"why: {white['chosen']}")
    elif record.get("note"):
        click.echo(f"why: {record['note']}")


@main.command("info")
@click.option("--json", "as_json", is_flag=True)
@common_options
def info_cmd(as_json: bool, **options) -> None:
    """Counts by status and label, the model fingerprint, and the indexes."""
    info = api.info(**options)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    images = info["images"]
    click.echo(
        f"catalog:  {info['catalog']} (schema {info['schema_version']}, generation {info['generation']})"
    )
    click.echo(
        f"vectors:  {info['vectors_file']} ({info['vectors_bytes']:,} bytes, dim {info['dimension']})"
    )
    click.echo(
        f"images:   {images['total']} ({images['indexed']} indexed, {images['failed']} failed)"
    )
    fp = info["fingerprint"] or {}
    if fp:
        from pipeline.embed.descriptor import from_fingerprint

        d = from_fingerprint(fp)
        click.echo(
            f"model:    {fp['architecture']}, weights sha256 {fp['weights_sha256'][:16]}; "
            + (d.describe_text() if d else f"{fp.get('pooling')} pooling")
        )
    if info["labels"]:
        click.echo("labels:   " + ", ".join(f"{k} {v}" for k, v in info["labels"].items()))
    click.echo("indexes:")
    for i in info["indexes"]:
        stale = "  STALE: run 'cbir build-index " + i["name"] + "'" if i["stale"] else ""
        size = f"{i['bytes']:,} bytes" if i["bytes"] is not None else "file missing"
        recall = f", recall@10 {i['recall_at_10']:.3f}" if i["recall_at_10"] is not None else ""
        click.echo(
            f"  {i['name']:<12} {i['factory']:<20} {i['vectors']} vectors, {size}, "
            f"params {i['params']}{recall}{stale}"
        )
        if i.get("note"):
            click.echo(f"  {'':<12} chosen: {i['note']}")
    if info["last_run"]:
        r = info["last_run"]
        click.echo(f"last run: {r['command']} {r['status']} at {r['started_at']}: {r['counts']}")


@main.command("verify")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--repair",
    is_flag=True,
    help="First repair what can be: upgrade the schema, drop image rows of a torn commit, "
    "whose vectors are lost (a short vector file) or damaged, or failing their own checksum "
    "(their files are indexed again), cut uncommitted bytes.",
)
@common_options
def verify_cmd(as_json: bool, repair: bool, **options) -> None:
    """Check catalog, vectors and indexes against each other; exit 1 on any mismatch."""
    report = api.verify(repair=repair, **options)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in report["repaired"]:
            click.echo(f"repaired: {line}")
        for n in report["notes"]:
            click.echo(f"note: {n}")
        for p in report["problems"]:
            click.echo(f"PROBLEM: {p}")
        c = report["checked"]
        verdict = "ok" if report["ok"] else f"{len(report['problems'])} problems"
        click.echo(
            f"verify: {verdict} ({c['images']} images, {c['vectors']} vectors, {c['indexes']} indexes checked)"
        )
    if not report["ok"]:
        sys.exit(1)


@main.command("evaluate")
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
@click.option("--rerank", default=None, help="Re-rank as in search: dba, aqe, dba+aqe.")
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
        from pipeline.evaluation.report import write_report

        result["report"] = str(write_report(result, report_dir))
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


@main.command("train")
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


main.add_command(serve_cmd)
main.add_command(bench_group)


if __name__ == "__main__":
    main()
