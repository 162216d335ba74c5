"""`cbir search`: the top-k images for query files, folders or catalog ids, printed or as JSON."""

from __future__ import annotations

import json
import sys

import click

from pipeline import api
from pipeline.cli import explaining
from pipeline.cli.options import (
    WritablePath,
    common_options,
    descriptor_options,
    runtime_options,
    search_param_options,
    typed,
)
from pipeline.config import DEFAULTS
from pipeline.errors import CbirError
from pipeline.specs import OPTIONS, SPEC


@click.command("search")
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
@click.option(
    "--rerank",
    default=None,
    help="Re-rank: 'dba', 'aqe' or 'dba+aqe'; 'verify' (alone or last: 'dba+verify') checks "
    "the top --verify-n by matched local features, for pictures of the same object or "
    "place; scores stay cosines [default none].",
)
@click.option(
    "--shortlist",
    type=typed(SPEC["shortlist"]),
    default=None,
    help=f"Candidates to re-rank [default {DEFAULTS['shortlist']}].",
)
@click.option(
    "--verify-n",
    "verify_n",
    type=typed(SPEC["verify_n"]),
    default=None,
    help="Candidates that --rerank verify checks, about 2-10 ms each "
    f"[default {DEFAULTS['verify_n']}].",
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
@click.option(
    "--under",
    multiple=True,
    metavar="FOLDER",
    help="Only images inside this folder, at any depth (repeatable: any of them).",
)
@click.option(
    "--label",
    multiple=True,
    metavar="LABEL",
    help="Only images with this label (repeatable: any of them).",
)
@click.option(
    "--since",
    metavar="DATE",
    default=None,
    help="Only images taken on or after this date: 2024-05-01, or 2024-05-01T13:45 (local "
    "time unless it ends in Z or +02:00). An image's date is its EXIF date, else its "
    "file's modification time.",
)
@click.option(
    "--until",
    metavar="DATE",
    default=None,
    help="Only images taken on or before this date (a date alone: to the end of that day).",
)
@click.option(
    "--min-score",
    "min_score",
    type=typed(SPEC["min_score"]),
    default=None,
    help="Leave out results whose score (cosine similarity, after re-ranking) is below "
    f"this [default {DEFAULTS['min_score']:g}: keep all].",
)
@click.option(
    "--explain",
    "explain_dir",
    type=WritablePath(folder=True),
    metavar="DIR",
    default=None,
    help="Also write, for each result, why it matched: DIR/<query>/<rank>-<id>-matches.png "
    "(the verified local-feature matches), -heat.png (where the result agrees with the "
    "query's vector) and .json; about 0.1-0.3 s per result.",
)
@search_param_options
@descriptor_options
@runtime_options
@common_options
def search_cmd(
    queries: tuple[str, ...],
    ids: tuple[int, ...],
    as_json: bool,
    explain_dir: str | None,
    **options,
) -> None:
    """Top-k most similar images for image files, folders of images, or --id N."""
    if not queries and not ids:
        raise CbirError("give a query image, a folder of images, or --id N")
    explain_to = explaining.checked_folder(explain_dir) if explain_dir else None
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
        if "filter" in a:
            click.echo(f"  filter: {_filter_text(a['filter'])}")
        click.echo(f"  {'rank':>4}  {'score':>7}  {'label':<14} path")
        for r in a["results"]:
            matches = f"  ({r['inliers']} matches)" if "inliers" in r else ""
            click.echo(
                f"  {r['rank']:>4}  {r['score']:7.4f}  {str(r['label'] or '-'):<14} {r['path']}"
                + matches
            )
    if explain_to is not None:
        n = explaining.write_explanations(explain_to, answers, **options)
        click.echo(f"explained {n} results in {explain_to}", err=True)
    if bad:
        sys.exit(2)


def _filter_text(shown: dict) -> str:
    """An answer's filter in one line: its parts, and how many images pass it."""
    parts = [f"{key} {', '.join(map(str, v)) if isinstance(v, list) else v}"
             for key, v in shown.items() if key != "matching"]  # fmt: skip
    return f"{'; '.join(parts)} ({shown['matching']} images match)"
