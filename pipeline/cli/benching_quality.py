"""`cbir bench duplicates` and `cbir bench scores`: the quality benchmarks that index the
shared datasets (Corel-1K, Holidays-150, UKBench-1000) with the real model into a
throw-away catalog and print what a threshold or a score means. Registered on the
`bench` group by `benching`."""

from __future__ import annotations

import click

from pipeline.cli.options import (
    CommaList,
    CountRange,
    WritablePath,
    common_options,
    runtime_options,
)


@click.command("duplicates")
@click.argument("datasets", default="../shared/datasets", type=click.Path(file_okay=False))
@click.option(
    "--originals",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="Corel-1K images edited (beside the 150 Holidays queries); the rest are distractors.",
)
@click.option(
    "--seed", type=click.IntRange(0), default=0, show_default=True, help="Chooses the originals."
)
@click.option(
    "--scale",
    "sizes",
    type=CommaList(CountRange(1000, 10**7)),
    default=None,
    help="Also time `cbir duplicates` on this many generated vectors, e.g. 1e4,1e5,1e6 "
    "(exact up to 1e5, IVF at every size; 1e6 needs ~16 GB of disk).",
)
@click.option(
    "--work-dir",
    "work_dir",
    type=WritablePath(folder=True),
    default=None,
    help="Where the copies and the catalog go, removed after [default: a temporary folder].",
)
@click.option(
    "--out",
    "out_dir",
    type=WritablePath(folder=True),
    default=None,
    help="Write duplicates.json and near, kinds, similar (and scale) .csv here.",
)
@runtime_options
@common_options
def bench_duplicates_cmd(datasets: str, originals: int, seed: int, **options) -> None:
    """Pair precision and recall of `cbir duplicates` per threshold, with the real model:
    edited copies (near-identical), UKBench (similar shots), Holidays (same place, not a
    copy). DATASETS holds corel1k, holidays150, ukbench1000 [default ../shared/datasets]."""
    from pipeline.bench.duplicates import run

    own = {k: options.pop(k) for k in ("sizes", "work_dir", "out_dir")}
    run(datasets, options=options, originals=originals, seed=seed, log=click.echo, **own)


@click.command("scores")
@click.argument("datasets", default="../shared/datasets", type=click.Path(file_okay=False))
@click.option(
    "--plot",
    "plot_path",
    type=WritablePath(folder=False),
    default=None,
    help="Write the pair-score densities here (PNG, 700x350).",
)
@click.option(
    "--seed",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Chooses the unrelated queries.",
)
@click.option(
    "--work-dir",
    "work_dir",
    type=WritablePath(folder=True),
    default=None,
    help="Where the catalog goes, kept and reused [default: a temporary folder, removed].",
)
@runtime_options
@common_options
def bench_scores_cmd(
    datasets: str, plot_path: str | None, seed: int, work_dir: str | None, **options
) -> None:
    """What scores mean: the cosine quantiles of same-object, same-category and unrelated
    pairs, and flat against adaptive cut-offs on the top 10 (precision, recall, F1, queries
    left empty, unrelated queries' kept results), with the real model. DATASETS holds
    corel1k, holidays150, ukbench1000 [default ../shared/datasets]."""
    from pipeline.bench.scores import run

    run(datasets, options, work_dir=work_dir, plot_path=plot_path, seed=seed, log=click.echo)
