"""The `cbir` command: parse options, call one API function, print."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from typing import Any

import click

from pipeline import api, autoindex, errors, indexes
from pipeline.config import DEFAULTS, OPTIONS, SEARCH_PARAMS, SPEC, Spec
from pipeline.errors import CbirError

# Click 8.2+ raises this for a bare group (8.1 prints the help and exits 0 itself).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineGroup(click.Group):
    """A group whose usage errors are one line on stderr, `cbir: error: ...`, like all others.

    Click would print Usage, Try and Error lines; scripts and people read one.
    --help and --version still print and exit 0; a bare group still shows its help.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            # With standalone_mode=False Click raises its errors instead of printing
            # them, and returns the exit code of --help/--version instead of exiting.
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as e:
            e.show()  # `cbir` or `cbir bench` alone: the help is the answer
            sys.exit(e.exit_code)
        except click.ClickException as e:
            lines = [line.strip() for line in e.format_message().splitlines() if line.strip()]
            message = "; ".join(lines)
            ctx = getattr(e, "ctx", None)
            if isinstance(e, click.UsageError) and ctx is not None:
                message += f" (see '{ctx.command_path} --help')"
            print(f"cbir: error: {message}", file=sys.stderr)
            sys.exit(e.exit_code)
        except click.Abort:
            print("cbir: interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that refuses NaN (which passes every comparison) and infinities."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class CountRange(click.IntRange):
    """An IntRange that also reads counts written like 1e3."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        try:
            number = float(value)
            if math.isfinite(number) and number.is_integer():
                value = int(number)
        except (TypeError, ValueError):
            pass  # IntRange says what is wrong
        return super().convert(value, param, ctx)


class CommaList(click.ParamType):
    """'a,b,c' -> a list, each item converted by `item`."""

    name = "list"

    def __init__(self, item: click.ParamType):
        self.item = item

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, list):
            return value
        items = [x.strip() for x in str(value).split(",") if x.strip()]
        if not items:
            self.fail("give at least one value, comma-separated", param, ctx)
        return [self.item.convert(x, param, ctx) for x in items]


class MemorySize(click.ParamType):
    """A memory budget such as 2GB or 512MB, in bytes."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        try:
            return autoindex.parse_size(value)
        except CbirError as e:
            self.fail(str(e), param, ctx)


def typed(spec: Spec) -> click.ParamType:
    """The Click type of a setting's spec (pipeline/config.py), so each range is written once."""
    if spec.kind == "int":
        return click.IntRange(spec.lo, spec.hi)
    if spec.kind == "float":
        return FiniteFloatRange(spec.lo, spec.hi, min_open=spec.lo_open, max_open=spec.hi_open)
    if spec.kind == "choice":
        return click.Choice(spec.choices)
    raise ValueError(f"no Click type for {spec.kind!r}")


def check_params(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]):
    """Refuse a bad --param NAME=VALUE while parsing, before any work."""
    try:
        indexes.parse_params(list(values))
    except CbirError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    return values


def common_options(f):
    """--catalog, --index-dir, --weights, --config on every command (None = not given)."""

    @click.option(
        "--config",
        "config",
        type=click.Path(dir_okay=False),
        envvar="CBIR_CONFIG",
        help="TOML file with any option; flags override it.",
    )
    @click.option(
        "--weights",
        default=None,
        help="'imagenet' (download once) or a local weights file [env CBIR_WEIGHTS].",
    )
    @click.option(
        "--index-dir",
        "index_dir",
        default=None,
        type=click.Path(file_okay=False),
        help=f"Folder of FAISS index files [default {DEFAULTS['index_dir']}; env CBIR_INDEX_DIR].",
    )
    @click.option(
        "--catalog",
        default=None,
        type=click.Path(dir_okay=False),
        help=f"SQLite catalog [default {DEFAULTS['catalog']}; env CBIR_CATALOG].",
    )
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        with errors.one_line(kwargs.get("catalog")):
            return f(*args, **kwargs)

    return wrapper


def runtime_options(f):
    """--runtime, --precision, --calibration, --allow-mixed on the commands that run the model."""

    @click.option(
        "--runtime",
        type=typed(SPEC["runtime"]),
        default=None,
        help="Inference runtime [default auto: the catalog's, or for a new catalog OpenVINO "
        "when installed, else Keras].",
    )
    @click.option(
        "--precision",
        type=typed(SPEC["precision"]),
        default=None,
        help="Model precision [default auto: the catalog's, or the fastest this CPU supports: "
        "int8 with VNNI, bf16 with AVX512-BF16/AMX, else fp32].",
    )
    @click.option(
        "--calibration",
        type=click.Path(exists=True, file_okay=False),
        default=None,
        help="int8: a folder of calibration images [default: 300 images of the collection, "
        "chosen by a seeded rule].",
    )
    @click.option(
        "--allow-mixed",
        "allow_mixed",
        is_flag=True,
        default=None,
        help="Allow adding vectors from another runtime or precision of the catalog's model.",
    )
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def search_param_options(f):
    @click.option(
        "--param",
        "params",
        multiple=True,
        metavar="NAME=VALUE",
        callback=check_params,
        help="FAISS search parameter, e.g. nprobe=32 or efSearch=128 (repeatable).",
    )
    @click.option(
        "--nprobe",
        type=typed(SEARCH_PARAMS["nprobe"]),
        default=None,
        help="Shorthand for --param nprobe=N.",
    )
    @click.option(
        "--ef-search",
        "ef_search",
        type=typed(SEARCH_PARAMS["efSearch"]),
        default=None,
        help="Shorthand for --param efSearch=N.",
    )
    @functools.wraps(f)
    def wrapper(*args, nprobe=None, ef_search=None, params=(), **kwargs):
        params = list(params)
        if nprobe is not None:
            params.append(f"nprobe={nprobe}")
        if ef_search is not None:
            params.append(f"efSearch={ef_search}")
        return f(*args, params=params, **kwargs)

    return wrapper


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
@click.option(
    "--pooling",
    type=typed(SPEC["pooling"]),
    default=None,
    help="Feature pooling: avg (default) or gem; fixed per catalog.",
)
@click.option(
    "--max-pixels",
    "max_pixels",
    type=typed(SPEC["max_pixels"]),
    default=None,
    help="Refuse images with more pixels (decompression bombs).",
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

    try:
        summary = api.index(list(paths), progress=progress, on_total=on_total, **options)
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
@search_param_options
@common_options
def build_index_cmd(
    name: str,
    factory: str | None,
    params: list[str],
    auto: bool,
    max_memory: int,
    target_recall: float | None,
    **options,
) -> None:
    """Build an index NAME from the stored vectors (no re-extraction); rebuild if it exists.

    Every build reports its recall@10 against exact search, measured on 200
    vectors sampled from the collection.
    """
    record = api.build_index(
        name, factory, params or None, auto, max_memory, target_recall, **options
    )
    click.echo(
        f"built index {record['name']} ({record['factory']}, params {record['params']}): "
        f"{record['ntotal']} vectors, {record['bytes']:,} bytes "
        f"({record['bytes'] / max(1, record['ntotal']):.0f} bytes/vector), "
        f"{record['build_seconds']:.2f} s, recall@10 {record['recall_at_10']:.4f}"
    )
    if record.get("note"):
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
        click.echo(
            f"model:    {fp['architecture']}, {fp['pooling']} pooling, weights sha256 {fp['weights_sha256'][:16]}"
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
    help="First repair what can be: upgrade the schema, drop rows of a torn commit or "
    "with damaged vectors (their files are indexed again), cut uncommitted bytes.",
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
@click.option("--index", default=None, help="Evaluate an approximate index (adds recall@10).")
@click.option("--rerank", default=None, help="Re-rank as in search: dba, aqe, dba+aqe.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False),
    help="Write an HTML report (top-10 thumbnails, per-class chart) here.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@runtime_options
@common_options
def evaluate_cmd(queries, leave_one_out, method, hybrid_weight, report_dir, as_json, **options):
    """mAP, P@1, P@10 and per-class figures against labelled QUERIES (manifest CSV or folder)."""
    result = api.evaluate(queries, leave_one_out, method, hybrid_weight, **options)
    if report_dir:
        from pipeline.report import write_report

        result["report"] = str(write_report(result, report_dir))
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


@main.command("train")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
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


@main.group("bench")
def bench_group() -> None:
    """Benchmarks that print figures."""


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
@runtime_options
@common_options
def bench_extract_cmd(folder: str, limit: int | None, repeats: int, **options) -> None:
    """End-to-end indexing images/s versus the model alone, and their ratio."""
    from pipeline.bench import bench_extract

    settings = api.settings_for(**options)
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
    type=click.Path(file_okay=False),
    help="Where scale.csv and the plots go.",
)
@common_options
def bench_scale_cmd(
    sizes: list[int], kinds: list[str], n_queries: int, out_dir: str, **options
) -> None:
    """Build time, bytes/vector, single and batch QPS, recall@10 per index and size.

    Vectors are generated from the catalog's real features (see pipeline/synth.py).
    """
    from pipeline.bench import bench_scale

    coll = api.open_collection(api.settings_for(**options))
    ids = coll.indexed_ids()
    if len(ids) < 50:
        raise CbirError("bench scale needs a catalog with at least 50 indexed images to imitate")
    real = coll.vectors(ids)
    rows = bench_scale(real, sizes, kinds, out_dir, n_queries=n_queries, log=click.echo)
    click.echo(f"{len(rows)} rows -> {out_dir}/scale.csv, plots {out_dir}/recall-qps-SIZE.png")


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port", type=typed(OPTIONS["port"]), default=8000, show_default=True, help="0: any free port."
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Worker threads of the WSGI server (waitress).",
)
@click.option(
    "--token",
    envvar="CBIR_TOKEN",
    default=None,
    help="Require this token (Authorization: Bearer, or the login form) [env CBIR_TOKEN]; "
    "needed on any address but loopback.",
)
@click.option(
    "--no-auth",
    "no_auth",
    is_flag=True,
    help="Serve a non-loopback address without a token (anyone who can reach it can search).",
)
@click.option(
    "--thumbs-dir",
    "thumbs_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Thumbnail cache [default: CATALOG with suffix .thumbs].",
)
@click.option(
    "--max-upload-mb",
    "max_upload_mb",
    type=typed(OPTIONS["max_upload_mb"]),
    default=20,
    show_default=True,
    help="Largest upload accepted, in MB.",
)
@click.option(
    "--max-pixels",
    "max_pixels",
    type=typed(SPEC["max_pixels"]),
    default=None,
    help="Refuse uploads with more pixels (decompression bombs).",
)
@click.option(
    "-k", type=typed(SPEC["k"]), default=None, help="Default number of results on a page."
)
@click.option("--index", default=None, help="Default index: 'exact' or a built one.")
@click.option("--rerank", default=None, help="Default re-ranking: 'dba', 'aqe' or 'dba+aqe'.")
@runtime_options
@common_options
def serve_cmd(
    host: str,
    port: int,
    threads: int,
    token: str | None,
    no_auth: bool,
    thumbs_dir,
    max_upload_mb: float,
    **options,
) -> None:
    """A web page and JSON API over the catalog, on waitress (binds 127.0.0.1 by default).

    Pages and `POST /api/search` take k, index, rerank and relevance feedback
    (relevant / not_relevant ids); answers have the shape of `cbir search --json`.
    """
    from pipeline import serve

    token = serve.required_token(host, token, no_auth)  # before minutes of loading
    app = serve.open_app(
        api.settings_for(**options),
        thumbs_dir=thumbs_dir,
        max_upload=int(max_upload_mb * 1024 * 1024),
        token=token,
    )
    server = serve.make_server(app, host, port, threads)
    for url in serve.urls(server):
        click.echo(f"cbir: serving on {url} ({threads} threads)", err=True)
    if token is None and not serve.is_loopback(host):
        click.echo(
            "cbir: warning: no token (--no-auth): anyone who can reach it can search", err=True
        )
    serve.run(server)


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

    from pipeline.serve_bench import bench_serve

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


if __name__ == "__main__":
    main()
