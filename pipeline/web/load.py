"""Concurrent HTTP clients against a running `cbir serve`: requests/s, p50, p99, errors.

Each client keeps one connection and sends, until the time or the count is
up, uploads of catalogued images, searches by id, or both in turn; every
answer is checked (status 200, and the query's own image at rank 1, ties
with exact duplicates allowed). Used by tests/web/test_web_load.py and
`cbir bench serve`; `python -m pipeline.web.load < job.json` runs a job and
prints its result as JSON, so the clients can run in a process of their own,
off the server's interpreter lock.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import CbirError

KINDS = ("upload", "id", "mixed")


@dataclass
class Job:
    url: str  # http://127.0.0.1:PORT
    kind: str  # "upload", "id" or "mixed" (the two in turn)
    items: list[tuple[int, str]]  # (catalog id, its image file), queried in turn
    concurrency: int = 16
    seconds: float | None = 10.0
    requests: int | None = None  # stop after this many, or at `seconds`, whichever first
    k: int = 10
    token: str | None = None


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of sorted values; 0 for none."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def finds(answer: Any, expected: int) -> bool:
    """Whether `expected` is at rank 1 (or tied with rank 1: an exact duplicate)."""
    results = answer.get("results") if isinstance(answer, dict) else None
    if not results:
        return False
    top = results[0]["score"]
    return any(r["id"] == expected for r in results if r["score"] >= top - 1e-4)


class _Client:
    """One connection; one request at a time."""

    def __init__(self, job: Job, files: dict[str, bytes]):
        url = urlsplit(job.url)
        self.host, self.port, self.job, self.files = url.hostname, url.port, job, files
        self.conn: http.client.HTTPConnection | None = None
        self.boundary = uuid.uuid4().hex

    def request(self, kind: str, image_id: int, path: str) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.job.token}"} if self.job.token else {}
        if kind == "id":
            body = json.dumps({"id": image_id, "k": self.job.k}).encode()
            headers["Content-Type"] = "application/json"
        else:
            b = self.boundary
            body = b"".join([
                f'--{b}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{self.job.k}\r\n'.encode(),
                f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="q{image_id}.jpg"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n".encode(),
                self.files[path],
                f"\r\n--{b}--\r\n".encode(),
            ])  # fmt: skip
            headers["Content-Type"] = f"multipart/form-data; boundary={b}"
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            self.conn.request("POST", "/api/search", body, headers)
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None  # a new connection for the next request
            raise


def run(job: Job) -> dict[str, Any]:
    """Run the clients; counts, requests/s and latency percentiles, overall and by kind."""
    if job.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if not job.items:
        raise ValueError("no images to query")
    files = {p: Path(p).read_bytes() for _, p in job.items} if job.kind != "id" else {}
    lock = threading.Lock()
    issued = 0
    records: list[tuple[str, float, str]] = []  # kind, seconds, "" or what went wrong
    start = time.perf_counter()
    deadline = start + job.seconds if job.seconds else math.inf

    def next_request() -> int | None:
        nonlocal issued
        with lock:
            if time.perf_counter() >= deadline or (job.requests and issued >= job.requests):
                return None
            issued += 1
            return issued - 1

    def client_loop() -> None:
        client = _Client(job, files)
        while (n := next_request()) is not None:
            kind = job.kind if job.kind != "mixed" else ("upload", "id")[n % 2]
            image_id, path = job.items[(n // (2 if job.kind == "mixed" else 1)) % len(job.items)]
            t0 = time.perf_counter()
            try:
                status, body = client.request(kind, image_id, path)
                if status != 200:
                    problem = f"{status}: {body[:200].decode(errors='replace')}"
                elif not finds(json.loads(body), image_id):
                    problem = f"wrong: {kind} of id {image_id} did not find it at rank 1"
                else:
                    problem = ""
            except (OSError, http.client.HTTPException, ValueError) as e:
                problem = f"{type(e).__name__}: {e}"
            with lock:
                records.append((kind, time.perf_counter() - t0, problem))

    threads = [threading.Thread(target=client_loop) for _ in range(job.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    result = {"kind": job.kind, "concurrency": job.concurrency, **_stats(records, wall)}
    if job.kind == "mixed":
        result["by_kind"] = {
            kind: _stats([r for r in records if r[0] == kind], wall) for kind in ("upload", "id")
        }
    return result


def _stats(records: list[tuple[str, float, str]], wall: float) -> dict[str, Any]:
    problems = [p for _, _, p in records if p]
    latencies = sorted(s * 1000 for _, s, _ in records)
    ok = len(records) - len(problems)
    return {
        "requests": len(records),
        "errors": sum(not p.startswith("wrong") for p in problems),
        "wrong": sum(p.startswith("wrong") for p in problems),
        "seconds": round(wall, 2),
        "requests_per_s": round(ok / wall, 1) if wall else 0.0,
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "problems": problems[:3],
    }


def main() -> None:
    spec = json.load(sys.stdin)
    spec["items"] = [tuple(i) for i in spec["items"]]
    print(json.dumps(run(Job(**spec))))


def run_in_process(job: Job) -> dict[str, Any]:
    """Run `job` in a child Python process (its own interpreter lock); the result."""
    import os
    import subprocess

    root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.web.load"],
        input=json.dumps(dataclasses.asdict(job)), capture_output=True, text=True, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise CbirError(f"the load clients failed: {last}", exit_code=1)
    return json.loads(done.stdout)


if __name__ == "__main__":
    main()
