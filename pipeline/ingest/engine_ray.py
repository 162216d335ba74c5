"""The Ray engine: decode and embed on Ray Data actors; vectors stream back to the one writer.

The driver (the `cbir index` process) plans as the local engine does, loads
and checks the catalog's model once, then hands Ray Data the files to do:
paths in, `map_batches` over a pool of actors, each holding one model built
from the same `cached_embedder` arguments the driver checked. Blocks come
back in plan order (`preserve_order`), so catalog ids are the ones the local
engine would give, and the driver alone commits them (vectors durable before
the rows that point at them). A worker or node that dies is Ray's to handle:
actors restart and their batches run again (Ray Data's defaults,
max_restarts=-1, max_task_retries=-1); a batch is only ever delivered once.

Every node must read the images at the paths the driver scanned (a shared
filesystem); a file a worker cannot read is recorded as failed, with the reason.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipeline import raycluster
from pipeline.config import Settings
from pipeline.embed import descriptor
from pipeline.embed.interface import Embedder
from pipeline.errors import CbirError
from pipeline.ingest.jobs import Batch, Embedded
from pipeline.inputs.decode import DecodeError, decode_file
from pipeline.inputs.scan import ScannedFile

# How long an actor that has sent nothing still counts as live, in the progress line.
LIVE_SECONDS = 60.0


class EmbedActor:
    """One model on a Ray worker: a block of paths in, their vectors (or reasons) out.

    Paths and messages travel as bytes (os.fsencode, surrogateescape), since a
    file name need not be UTF-8 and Arrow strings must be.
    """

    def __init__(
        self,
        loader: Callable[[], Embedder],
        dim: int,
        max_pixels: int,
        threads: int,
        shape: dict[str, Any] | None = None,
    ) -> None:
        # Before the runtime starts: a model uses the CPUs Ray granted, not the whole node.
        os.environ["CBIR_THREADS"] = str(threads)
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        import ray

        self.model = loader()
        self.dim, self.max_pixels, self.shape = dim, max_pixels, shape or {}
        self.actor = ray.get_runtime_context().get_actor_id() or f"pid {os.getpid()}"

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(block["i"])
        errors = [b""] * n
        shas = [b""] * n
        sizes = np.zeros((n, 2), dtype=np.int64)
        taken = np.full(n, np.nan)  # EXIF dates; NaN: none
        pixels, ok = [], []
        for j, raw in enumerate(block["path"]):
            try:
                decoded = decode_file(os.fsdecode(bytes(raw)), self.max_pixels, **self.shape)
            except DecodeError as e:
                errors[j] = (str(e) or "cannot decode").encode("utf-8", "surrogateescape")
                continue
            shas[j] = decoded.sha256.encode()
            sizes[j] = decoded.width, decoded.height
            taken[j] = np.nan if decoded.taken_at is None else decoded.taken_at
            pixels.append(decoded.pixels)
            ok.append(j)
        vectors = np.zeros((n, self.dim), dtype=np.float32)
        if ok:
            vectors[ok] = self.model.embed(descriptor.batch(pixels))
        return {
            "i": np.asarray(block["i"], dtype=np.int64),
            "error": np.array(errors, dtype=object),
            "sha256": np.array(shas, dtype=object),
            "size": sizes,
            "taken_at": taken,
            "vector": vectors,
            "actor": np.array([self.actor] * n, dtype=object),
        }


def _results(todo: list[ScannedFile], block: dict[str, np.ndarray]) -> Batch:
    """A returned block as the job's (file, result) pairs."""
    out: Batch = []
    # A block from an older actor carries no dates: NaN, none (the mtime stands).
    taken = block.get("taken_at", np.full(len(block["i"]), np.nan))
    for i, error, sha, size, vector, at in zip(
        block["i"], block["error"], block["sha256"], block["size"], block["vector"], taken,
        strict=True,
    ):  # fmt: skip
        f = todo[int(i)]
        if error:
            out.append((f, DecodeError(bytes(error).decode("utf-8", "surrogateescape"))))
        else:
            date = None if np.isnan(at) else float(at)
            out.append((f, Embedded(bytes(sha).decode(), int(size[0]), int(size[1]), vector, date)))
    return out


class RayEngine:
    """jobs.Engine on a Ray cluster (see the module docstring)."""

    def __init__(
        self,
        loader_for: Callable[[list[str]], Callable[[], Embedder]],
        address: str | None = None,
        actors: int = 0,
        on_status: Callable[[str], Any] | None = None,
        actor_cpus: float = 1,
    ) -> None:
        self.loader_for, self.address, self.actors = loader_for, address, actors
        self.on_status, self.actor_cpus = on_status, actor_cpus

    def batches(
        self, todo: list[ScannedFile], model: Callable[[], Embedder], settings: Settings
    ) -> Iterator[Batch]:
        embedder = model()  # the driver's check against the catalog (a new one adopts it)
        dim = int(embedder.embed(np.zeros((1, 224, 224, 3), np.uint8)).shape[1])
        loader = self.loader_for([f.path for f in todo])
        with raycluster.connected(self.address) as ray:
            yield from self._stream(ray, todo, loader, dim, settings)

    def _stream(
        self, ray: Any, todo: list[ScannedFile], loader: Any, dim: int, settings: Settings
    ) -> Iterator[Batch]:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # ids as the local engine gives them
        ctx.enable_progress_bars = False  # cbir's own bar says images/s and actors
        ctx.print_on_execution_start = False
        raycluster.quiet()
        actors = self.actors or self.auto_actors(ray)
        size = settings.batch_size
        items = [{"i": i, "path": os.fsencode(f.path)} for i, f in enumerate(todo)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(todo) / size)))
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                "loader": loader,
                "dim": dim,
                "max_pixels": settings.max_pixels,
                "threads": max(1, int(self.actor_cpus)),
                "shape": {"size": settings.image_size, "crop": settings.input == "crop"},
            },
            batch_size=size,
            batch_format="numpy",
            num_cpus=self.actor_cpus,
            compute=ray.data.ActorPoolStrategy(
                size=actors,
                # Two blocks per actor at once: one decodes while the other is in the model
                # (the embedders take a lock around the model, and decoding releases the GIL).
                max_concurrent_calls_per_actor=2,
                enable_true_multi_threading=True,
            ),
        )
        seen: dict[str, float] = {}
        said = 0.0
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
                now = time.monotonic()
                for actor in set(block["actor"]):
                    seen[str(actor)] = now
                if self.on_status and now - said > 2:
                    said = now
                    live = sum(1 for t in seen.values() if now - t < LIVE_SECONDS)
                    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
                    self.on_status(f"{live}/{actors} actors, {nodes} nodes")
                yield _results(todo, block)
        except ray.exceptions.RayError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CbirError(
                f"the Ray job failed ({first}); what was committed stays, rerun to finish", 1
            ) from None

    def auto_actors(self, ray: Any) -> int:
        """As many actors as the cluster's CPUs allow (the driver only writes: little CPU)."""
        return max(1, int(float(ray.cluster_resources().get("CPU", 1)) // self.actor_cpus))
