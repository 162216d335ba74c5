"""`cbir info` and `cbir verify`: what a catalog holds, and whether it is consistent."""

from __future__ import annotations

import json
import sys

import click

from pipeline import api
from pipeline.cli.options import common_options


@click.command("info")
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
        click.echo(f"model:    {api.describe_model(fp)}")
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


@click.command("verify")
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
