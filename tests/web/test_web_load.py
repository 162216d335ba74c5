"""`cbir serve` under load: the real server (waitress) in a child process, on 127.0.0.1 only.

Slow tier: about 20 s of 16 concurrent clients sending uploads and id
searches, every answer checked; then `cbir bench serve`. The fake model
(tests/fakes.py) stands in for ResNet50, so this measures the server, not the model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fakes

pytest.importorskip("waitress")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FAKE_CBIR = [sys.executable, str(ROOT / "tests" / "fakes.py")]
CLIENTS, SECONDS = 16, 20.0


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict[str, str]:
    """100 photos-sized images (320 px), indexed by the fake model through the real CLI."""
    tmp = tmp_path_factory.mktemp("load")
    fakes.make_images(tmp / "images", 100, size=320)
    options = {"catalog": str(tmp / "cat.db"), "index_dir": str(tmp / "index")}
    subprocess.run(
        [*FAKE_CBIR, "index", str(tmp / "images"), "--catalog", options["catalog"],
         "--index-dir", options["index_dir"]],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return options


def where(options: dict[str, str]) -> list[str]:
    return ["--catalog", options["catalog"], "--index-dir", options["index_dir"]]


@pytest.fixture
def server(collection, tmp_path):
    """`cbir serve --port 0` (fake model) in a child process; yields its URL."""
    log = (tmp_path / "serve.log").open("w+")  # a file, not a pipe: a full pipe would block it
    proc = subprocess.Popen(
        [*FAKE_CBIR, "serve", "--host", "127.0.0.1", "--port", "0", "--threads", "8",
         *where(collection)],
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            found = re.search(r"serving on (http://127\.0\.0\.1:\d+)/", Path(log.name).read_text())
            url = found.group(1) if found else None
        assert url, f"the server did not start: {Path(log.name).read_text()}"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def catalogued(options: dict[str, str]) -> list[tuple[int, str]]:
    import sqlite3

    with sqlite3.connect(options["catalog"]) as con:
        return list(con.execute("select id, path from images where status = 'indexed' order by id"))


def test_16_clients_for_20_seconds(server, collection):
    from pipeline.web.load import Job, run

    result = run(Job(server, "mixed", catalogued(collection), CLIENTS, SECONDS))
    print(f"\n{CLIENTS} clients, {result['seconds']} s, uploads and id searches in turn:")
    for kind, r in result["by_kind"].items():
        print(
            f"  {kind:>6}: {r['requests']} requests, {r['requests_per_s']} req/s, "
            f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}, wrong {r['wrong']}"
        )
    print(f"  total: {result['requests_per_s']} req/s")
    assert result["errors"] == 0 and result["wrong"] == 0, result["problems"]
    assert result["seconds"] >= SECONDS and result["requests"] >= 2 * CLIENTS
    assert min(r["requests"] for r in result["by_kind"].values()) >= CLIENTS


def test_bench_serve(collection):
    env = {k: v for k, v in os.environ.items() if k != "CBIR_TOKEN"}
    done = subprocess.run(
        [*FAKE_CBIR, "bench", "serve", "--concurrency", "4", "--seconds", "2", *where(collection)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    print("\n" + "\n".join(done.stdout.splitlines()))
    assert [r["kind"] for r in results] == ["model alone", "upload", "id"]
    assert results[0]["images_per_s"] > 0 and results[1]["share_of_model"] > 0
    for r in results[1:]:
        assert r["concurrency"] == 4 and r["errors"] == 0 and r["wrong"] == 0
        assert r["requests"] > 0 and r["requests_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
