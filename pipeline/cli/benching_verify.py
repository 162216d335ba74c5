"""`cbir bench verify`: local-feature verification (`--rerank verify`) measured on the
shared datasets, with every parameter of the verification open to a sweep. Registered
on the `bench` group by `benching`."""

from __future__ import annotations

import click

from pipeline.cli.options import (
    CommaList,
    FiniteFloatRange,
    WritablePath,
    common_options,
    runtime_options,
)


@click.command("verify")
@click.argument("datasets", default="../shared/datasets", type=click.Path(file_okay=False))
@click.option(
    "--n",
    "ns",
    type=CommaList(click.IntRange(1, 1000)),
    default="25,50,100",
    show_default=True,
    help="Shortlist sizes N verified (Holidays and latency).",
)
@click.option("--ukbench-n", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option(
    "--only",
    type=CommaList(click.Choice(["holidays", "ukbench", "corel", "edits", "latency"])),
    default="holidays,ukbench,corel,edits,latency",
    show_default=True,
    help="Which measurements.",
)
@click.option(
    "--originals",
    type=click.IntRange(2, 400),
    default=24,
    show_default=True,
    help="Originals edited 12 ways for the rank-1 count (half Holidays queries, half Corel).",
)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--latency-queries", type=click.IntRange(1, 405), default=50, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Verifications run at once (a thread pool).",
)
@click.option("--detector", type=click.Choice(["sift", "orb"]), default=None)
@click.option("--geometry", type=click.Choice(["homography", "fundamental"]), default=None)
@click.option("--estimator", type=click.Choice(["ransac", "magsac"]), default=None)
@click.option("--max-features", type=click.IntRange(10, 20000), default=None)
@click.option("--max-side", type=click.IntRange(64, 4096), default=None)
@click.option("--ratio", type=FiniteFloatRange(0.1, 1.0), default=None)
@click.option("--reproj-px", type=FiniteFloatRange(0.1, 100.0), default=None)
@click.option("--floor", type=click.IntRange(0, 1000), default=None)
@click.option("--cap", type=click.IntRange(1, 1000), default=None)
@click.option("--weight", type=FiniteFloatRange(0.0, 10.0), default=None)
@click.option(
    "--work-dir",
    "work_dir",
    type=WritablePath(folder=True),
    default=None,
    help="Where the catalogs and copies go, kept (reused by the next run) "
    "[default: a temporary folder, removed].",
)
@runtime_options
@common_options
def bench_verify_cmd(datasets: str, **options) -> None:
    """Holidays-150 mAP, UKBench-1000 N-S, Corel-1K mAP and edited copies at rank 1,
    without and with local-feature verification of the top N, and its warm seconds
    per query. Options left out (--detector ... --weight) take the defaults of
    `--rerank verify`. DATASETS holds corel1k, holidays150, ukbench1000."""
    from pipeline.bench.verify import run

    names = ("detector", "geometry", "estimator", "max_features", "max_side", "ratio", "reproj_px")
    chosen = {k: options.pop(k) for k in (*names, "floor", "cap", "weight")}
    own = {
        k: options.pop(k)
        for k in ("ns", "ukbench_n", "only", "originals", "seed", "latency_queries", "work_dir")
    }
    threads = options.pop("threads")
    run(datasets, options, chosen, workers=threads, log=click.echo, **own)
