"""`cbir duplicates`: groups of the same photo and of similar shots, as a table, JSON or CSV."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from pipeline import api
from pipeline.cli.moving import act, move_options
from pipeline.cli.options import CommaList, common_options, typed
from pipeline.cli.progress import progress_bar
from pipeline.errors import CbirError
from pipeline.specs import OPTIONS


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def print_table(report: dict[str, Any]) -> None:
    """Each group: its kind, then its images (the suggested keeper first marked `keep`)."""
    for g in report["groups"]:
        click.echo(f"group {g['group']}: {api.KIND_NAMES[g['kind']]}, {len(g['images'])} images")
        for im in g["images"]:
            res = f"{im['width']}x{im['height']}" if im["width"] else "-"
            click.echo(
                f"  {'keep' if im['keeper'] else '    '}  {im['score']:.4f}  {res:>11}  "
                f"{_size(im['size']):>9}  {(im['date'] or '-')[:10]}  {im['path']}"
                + ("" if im["exists"] else "  (missing)")
            )
    kinds = {}
    for g in report["groups"]:
        kinds[g["kind"]] = kinds.get(g["kind"], 0) + 1
    extra = [im for g in report["groups"] for im in g["images"] if not im["keeper"]]
    said = ", ".join(f"{n} {api.KIND_NAMES[k]}" for k, n in kinds.items())
    click.echo(
        f"{len(report['groups'])} groups{f' ({said})' if said else ''} among "
        f"{report['images']:,} images; {len(extra)} images besides the keepers "
        f"({_size(sum(im['size'] or 0 for im in extra))})"
        + (
            f"; pair recall of index {report['index']} {report['pair_recall']:.3f}"
            if report["pair_recall"] is not None
            else ""
        )
    )


@click.command("duplicates")
@click.option(
    "--include",
    type=CommaList(typed(OPTIONS["include"])),
    default="exact,near",
    show_default=True,
    help="Kinds of group: exact (same bytes), near (the same photo resized, re-encoded, "
    "cropped a little, colour-adjusted, framed or marked), similar (the same scene taken "
    "again, a burst).",
)
@click.option(
    "--near",
    type=typed(OPTIONS["near"]),
    default=None,
    help="Cosine to a group's centre for near-identical copies [default: measured, see "
    "docs/benchmarks.md].",
)
@click.option(
    "--similar",
    type=typed(OPTIONS["similar"]),
    default=None,
    help="Cosine to a group's centre for similar shots [default: measured].",
)
@click.option(
    "--index",
    default=None,
    help="'exact' (default; not the config's search index) or the name of a built IVF or HNSW "
    "index to find pairs with (its pair recall is measured and printed).",
)
@click.option("--json", "as_json", is_flag=True, help="The whole report as one JSON object.")
@click.option("--csv", "as_csv", is_flag=True, help="One CSV row per image of each group.")
@move_options
@common_options
def duplicates_cmd(as_json: bool, as_csv: bool, **options: Any) -> None:
    """Groups of duplicate images (no model runs): same bytes, near-identical, similar shots."""
    if as_json and as_csv:
        raise CbirError("give --json or --csv, not both")
    with progress_bar("comparing") as bar:
        if act(as_json, as_csv, options, progress=bar.progress, on_total=bar.on_total):
            return  # --move-to, --undo or --plan (pipeline/cli/moving.py)
        report = api.duplicates_report(progress=bar.progress, on_total=bar.on_total, **options)
    if as_json:
        click.echo(json.dumps(report))
    elif as_csv:
        api.write_duplicates_csv(report, sys.stdout)
    else:
        print_table(report)
