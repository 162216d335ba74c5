"""`cbir bench ...`: the measurements that print figures (throughput, scale, duplicates,
the server, a cold start, distributed indexing)."""

from __future__ import annotations

import json
import sys

import click

from pipeline import api
from pipeline.cli.benching_quality import bench_duplicates_cmd, bench_scores_cmd
from pipeline.cli.benching_verify import bench_verify_cmd
from pipeline.cli.options import (
    CommaList,
    CountRange,
    FiniteFloatRange,
    WritablePath,
    common_options,
    runtime_options,
    typed,
)
from pipeline.errors import CbirError
from pipeline.specs import OPTIONS, SPEC


@click.group("bench")
def bench_group() -> None:
    """Benchmarks that print figures."""


# The quality benchmarks on the shared datasets live in their own modules.
bench_group.add_command(bench_duplicates_cmd)
bench_group.add_command(bench_scores_cmd)
bench_group.add_command(bench_verify_cmd)


@bench_group.command("extract")
@click.argument("folder")
@click.option(
    "--limit", type=typed(OPTIONS["limit"]), default=None, help="Use at most this many images."
)
@click.option("--workers", type=typed(SPEC["workers"]), default=None)
@click.option("--batch-size", "batch_size", type=typed(SPEC["batch_size"]), default=None)
@click.option(
    "--repeats",
    type=typed(OPTIONS["repeats"]),
    default=1,
    help="Repeat both measurements; medians are printed.",
)
@click.option(
    "--big",
    is_flag=True,
    help="Instead: index FOLDER's images (first 200 unless --limit) and 4000x3000 JPEG "
    "copies of them alternately with the default model, and print both images/s and "
    "their ratio (use --repeats 3).",
)
@runtime_options
@common_options
def bench_extract_cmd(folder: str, limit: int | None, repeats: int, big: bool, **options) -> None:
    """End-to-end indexing images/s versus the model alone, and their ratio; with --big,
    12-megapixel JPEGs against the same photos small."""
    settings = api.settings_for(**options)
    if big:
        from pipeline.bench.bigjpeg import bench_big

        bench_big(folder, settings, limit=limit, repeats=repeats, log=click.echo)
        return
    from pipeline.bench.extract import bench_extract

    result = bench_extract(folder, settings, limit=limit, repeats=repeats)
    for line in result["lines"]:
        click.echo(line)


@bench_group.command("scale")
@click.option(
    "--sizes",
    type=CommaList(CountRange(OPTIONS["bench_size"].lo, OPTIONS["bench_size"].hi)),
    default="1e3,1e4,1e5",
    show_default=True,
    help="Collection sizes, comma-separated (1e6 needs ~25 GB of disk and ~10 min).",
)
@click.option(
    "--indexes",
    "kinds",
    type=CommaList(typed(OPTIONS["bench_kinds"])),
    default="flat,hnsw,ivf,ivfpq",
    show_default=True,
    help="Index kinds: flat, hnsw, ivf, ivfpq (HNSW is skipped above 100,000).",
)
@click.option(
    "--queries", "n_queries", type=typed(OPTIONS["queries"]), default=100, show_default=True
)
@click.option(
    "--out",
    "out_dir",
    default="bench-out",
    show_default=True,
    type=WritablePath(folder=True),
    help="Where scale.csv and the plots go.",
)
@common_options
def bench_scale_cmd(
    sizes: list[int], kinds: list[str], n_queries: int, out_dir: str, **options
) -> None:
    """Build time, bytes/vector, single and batch QPS, recall@10 per index and size.

    Vectors are generated from the catalog's real features (see pipeline/synth.py).
    """
    from pipeline.bench.extract import bench_scale

    coll = api.open_collection(api.settings_for(**options))
    ids = coll.indexed_ids()
    if len(ids) < 50:
        raise CbirError("bench scale needs a catalog with at least 50 indexed images to imitate")
    real = coll.vectors(ids)
    rows = bench_scale(real, sizes, kinds, out_dir, n_queries=n_queries, log=click.echo)
    click.echo(f"{len(rows)} rows -> {out_dir}/scale.csv, plots {out_dir}/recall-qps-SIZE.png")


@bench_group.command("serve")
@click.argument("images", nargs=-1, required=False)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Clients sending requests at once.",
)
@click.option(
    "--seconds",
    type=FiniteFloatRange(0, 3600, min_open=True),
    default=None,
    help="How long each measurement runs [default 10 unless --uploads is given].",
)
@click.option(
    "--uploads",
    type=typed(OPTIONS["uploads"]),
    default=None,
    help="Requests per measurement (with --seconds: whichever comes first).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Worker threads of the server.",
)
@common_options
def bench_serve_cmd(
    images, concurrency: int, seconds: float | None, uploads: int | None, threads: int, **options
) -> None:
    """Requests/s, p50 and p99 of uploads and of id searches through a local waitress server.

    IMAGES (files or folders) are uploaded if catalogued; by default a sample of
    the catalog. Each answer must find its image at rank 1. One JSON line per kind.
    """
    import glob

    from pipeline.bench.serve import bench_serve

    files = [f for p in images for f in (sorted(glob.glob(f"{p}/**/*.jpg", recursive=True)) or [p])]
    if seconds is None and uploads is None:
        seconds = 10.0
    results = bench_serve(
        api.settings_for(**options), files, concurrency, seconds, uploads, threads
    )
    for result in results:
        click.echo(json.dumps(result))
    if any(r.get("errors") or r.get("wrong") for r in results):
        sys.exit(1)


@bench_group.command("coldstart")
@click.argument("image")
@click.option("--runs", type=typed(OPTIONS["repeats"]), default=10, show_default=True)
@runtime_options
@common_options
def bench_coldstart_cmd(image: str, runs: int, **options) -> None:
    """Seconds and peak memory of `cbir search IMAGE` in a new process (median of RUNS)."""
    from pipeline.bench.extract import bench_coldstart

    bench_coldstart(api.settings_for(**options), image, runs, log=click.echo)


@bench_group.command("distributed")
@click.argument("folder")
@click.option(
    "--limit",
    type=typed(OPTIONS["limit"]),
    default=1000,
    show_default=True,
    help="Images for the engine comparison.",
)
@click.option(
    "--repeats",
    type=typed(OPTIONS["repeats"]),
    default=1,
    show_default=True,
    help="Repeat each engine's runs; medians are printed.",
)
@click.option(
    "--commit-vectors",
    "commit_vectors",
    type=CountRange(1000, 10**8),
    default=50_000,
    show_default=True,
    help="Generated vectors for the driver's commit throughput.",
)
@click.option(
    "--shard-vectors",
    "shard_vectors",
    type=CountRange(0, 10**9),
    default=1_000_000,
    show_default=True,
    help="Vectors for the sharded vs single-shot index build (0: skip; 1e6 needs ~8 GB of disk).",
)
@click.option(
    "--factory",
    default="IVF1024,PQ64",
    show_default=True,
    help="IVF factory for the sharded build comparison (searched with nprobe 16, refine 40).",
)
@click.option(
    "--shards", type=click.IntRange(2, 1024), default=4, show_default=True, help="Shards."
)
@click.option(
    "--work-dir",
    "work_dir",
    type=WritablePath(folder=True),
    default=None,
    help="Where the generated vector file goes [default: a temporary folder].",
)
@click.option("--ray-address", "ray_address", default=None, help="Join this Ray cluster.")
@runtime_options
@common_options
def bench_distributed_cmd(
    folder: str,
    limit: int,
    repeats: int,
    commit_vectors: int,
    shard_vectors: int,
    factory: str,
    shards: int,
    work_dir: str | None,
    **options,
) -> None:
    """Ray against the local engine (images/s at equal CPUs), the driver's commit
    throughput (vectors/s), and a sharded IVF build merged on disk against a
    single-shot build (seconds, recall@10), in one run on this machine."""
    import os
    import tempfile

    from pipeline import raycluster
    from pipeline.bench import distributed as bench_distributed
    from pipeline.bench import shards as bench_shards

    raycluster.require()
    settings = api.settings_for(**options)
    click.echo("== 1. indexing: local engine against Ray Data actors")
    bench_distributed.engines(folder, settings, limit, repeats, click.echo)
    click.echo("== 2. the driver's commit throughput (generated vectors, vector file + catalog)")
    bench_distributed.commit_throughput(commit_vectors, [64, 256, 1024], click.echo)
    if shard_vectors:
        click.echo(f"== 3. {factory}: {shards} shards merged on disk against one build")
        # Generated from the catalog's real features when it has some (as bench scale does).
        real = None
        if os.path.exists(settings.catalog):
            coll = api.open_collection(settings)
            if len(ids := coll.indexed_ids()) >= 50:
                real = coll.vectors(ids)
        if work_dir:
            os.makedirs(work_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="cbir-bench-", dir=work_dir) as tmp:
            bench_shards.run(
                shard_vectors, 2048, factory, shards, "ray", tmp, real=real, log=click.echo,
                params={"nprobe": 16, "refine": 40}, address=settings.ray_address or None,
            )  # fmt: skip
