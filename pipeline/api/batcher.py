"""Micro-batching: concurrent uploads are embedded together, not one image at a time.

A forward pass of 8 images costs far less than 8 passes of one (the runtimes
spread a batch over every core), so under many clients the server's
throughput approaches the model's batch throughput. One worker thread takes
the first waiting request, gathers more until `max_batch` images or `wait_s`
seconds after the first, runs one forward pass, and hands each caller its rows.

Part of the API (not of the web app) because it wraps the model: a long-lived
reader (pipeline/api/session.py) embeds through it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.embed import descriptor
from pipeline.embed.interface import Embedder


@dataclass
class _Job:
    pixels: list[np.ndarray]  # images of any shapes (whole-image descriptors differ)
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class MicroBatcher:
    """An Embedder whose `embed` calls from many threads share forward passes."""

    def __init__(self, inner: Embedder, max_batch: int = 8, wait_s: float = 0.005):
        self.inner, self.max_batch, self.wait_s = inner, max(1, max_batch), wait_s
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._start = threading.Lock()
        self._worker: threading.Thread | None = None
        self.batches: list[int] = []  # images per forward pass, for tests and benchmarks

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # fingerprint, producer, batch_size, source: the model's

    def embed(self, pixels: np.ndarray | list[np.ndarray]) -> np.ndarray:
        job = _Job([np.asarray(p) for p in pixels])
        with self._start:
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="embed", daemon=True)
                self._worker.start()
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _run(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            size = len(jobs[0].pixels)
            deadline = threading.Event()
            timer = threading.Timer(self.wait_s, deadline.set)
            timer.start()
            while size < self.max_batch and not deadline.is_set():
                try:
                    job = self._jobs.get(timeout=self.wait_s / 4)
                except queue.Empty:
                    continue
                jobs.append(job)
                size += len(job.pixels)
            timer.cancel()
            try:
                out = self.inner.embed(descriptor.batch([p for j in jobs for p in j.pixels]))
                self.batches.append(size)
                start = 0
                for j in jobs:
                    j.result, start = out[start : start + len(j.pixels)], start + len(j.pixels)
            except BaseException as e:  # each caller gets the error, the worker lives on
                for j in jobs:
                    j.error = e
            for j in jobs:
                j.done.set()
