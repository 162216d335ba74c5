"""`cbir index` and `cbir build-index`: the two commands that write a catalog."""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline import api
from pipeline.cli.options import (
    MemorySize,
    WritablePath,
    common_options,
    job_options,
    runtime_options,
    search_param_options,
    typed,
)
from pipeline.cli.progress import progress_bar
from pipeline.specs import OPTIONS, SPEC


@click.command("index")
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
@job_options
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
    settings = api.settings_for(**options)
    with progress_bar("indexing") as bar:
        summary = api.index(
            list(paths),
            progress=bar.progress,
            on_total=bar.on_total,
            on_status=bar.on_status,
            **options,
        )
    click.echo(
        f"scanned {summary.scanned}, unchanged {summary.unchanged}, "
        f"indexed {summary.indexed + summary.copied} "
        f"(model {summary.indexed}, copied from duplicates {summary.copied}), "
        f"failed {summary.failed}, duplicates {summary.duplicates}, "
        f"relabelled {summary.relabelled}, pruned {summary.pruned}"
        + (f", moved {summary.moved} (ids and vectors kept)" if summary.moved else "")
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


@click.command("build-index")
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
    type=click.IntRange(1, api.MAX_SHARDS),
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
    type=typed(api.WHITEN_DIM_SPEC),
    default=None,
    help=f"Dimensions the whitening keeps, below the number of vectors "
    f"[default {api.DEFAULT_WHITEN_DIM}].",
)
@click.option(
    "--shrinkage",
    type=typed(api.SHRINKAGE_SPEC),
    default=None,
    help="Softens the whitening: components scaled by eigenvalue^(-0.5(1-S)); 0 = full "
    f"whitening, 1 = plain PCA [default {api.DEFAULT_SHRINKAGE}].",
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
        click.echo(api.describe_update(record))
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
    white = api.whitening_note(record.get("note"))
    if white:
        click.echo(api.describe_whitening(white["whitening"]))
        if white.get("chosen"):
            click.echo(f"why: {white['chosen']}")
    elif record.get("note"):
        click.echo(f"why: {record['note']}")
