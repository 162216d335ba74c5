"""An on-disk cache of converted models: built once, verified on every load, shared by processes.

Layout under the cache folder (`CBIR_CACHE`, else `$XDG_CACHE_HOME/cbir`,
else `~/.cache/cbir`):

    <key>/              one entry: the builder's files plus manifest.json
    <key>.lock          flock'd while the entry is checked, removed or built
    .tmp-<key>-*        an entry being built (renamed to <key> when complete)
    .trash-<key>-*      a rejected entry on its way out

The key is a hash of everything that determines the files (weights digest,
pooling, precision, runtime and version, calibration id); manifest.json
repeats those parts, records the size and sha256 of every file and the
sha256 of its own other fields, so a truncated, altered or mismatched entry
(manifest included) is detected, removed and rebuilt rather than trusted.
Nothing outside `<key>/` is loaded: OpenVINO's own compiled-blob cache is not
used (see `runtime_openvino`). Builds go into a temporary folder in the same file
system, are fsync'd and then renamed into place in one step, so a reader
sees a complete entry or none. Two processes building the same entry
serialise on the key's lock; where locks do not work (no fcntl), the rename
still lets only one of them win and the other discards its copy.
Pure standard library: a cache hit imports nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import faults
from pipeline.errors import CbirError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the atomic rename alone keeps entries valid
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("cbir")

ENV = "CBIR_CACHE"
MANIFEST = "manifest.json"
FORMAT = 1  # of manifest.json; part of every key, so a new layout never reads an old entry


def default_root() -> Path:
    """`CBIR_CACHE`, else the user's cache folder (XDG) + /cbir."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cbir"


def make_key(parts: dict[str, Any]) -> str:
    """A folder name for these parts: 32 hex digits of the sha256 of their canonical JSON."""
    text = json.dumps({"format": FORMAT, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _manifest_sha256(manifest: dict[str, Any]) -> str:
    """The digest a manifest records of its own other fields (a flipped bit in it is caught)."""
    rest = {k: v for k, v in manifest.items() if k != "sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    """A verified cache entry: its folder, the parts it was built for, the builder's metadata."""

    path: Path
    key: str
    parts: dict[str, Any]
    meta: dict[str, Any]


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (folders: so a rename or new name survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a folder; the data is still written
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _files(folder: Path) -> list[str]:
    """Relative POSIX paths of the regular files below `folder`, sorted, manifest excluded."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(n for n in names if n != MANIFEST)


class ModelCache:
    """Entries keyed by `make_key(parts)`, each built by a caller-supplied function."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).expanduser() if root else default_root()
        # How errors name it: CBIR_CACHE's folder, or a catalog's kept models.
        self.named = root is None and bool(os.environ.get(ENV))

    def path(self, key: str) -> Path:
        return self.root / key

    def _prepare(self) -> None:
        """Make sure the cache folder exists and is writable, or say so in one line."""
        where = f"model cache {self.root}" + (" (CBIR_CACHE)" if self.named else "")
        if self.root.exists() and not self.root.is_dir():
            raise CbirError(f"{where} is not a folder: set CBIR_CACHE to a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CbirError(
                f"cannot create {where}: {e.strerror}; set CBIR_CACHE to a writable folder"
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise CbirError(
                f"{where} is not writable, and the model it needs is missing or damaged there: "
                "set CBIR_CACHE to a writable folder"
            )

    def load(self, parts: dict[str, Any]) -> Entry | None:
        """The verified entry for these parts, or None (absent, incomplete or damaged)."""
        key = make_key(parts)
        entry, _ = self._verify(key, parts)
        return entry

    def get_or_build(
        self, parts: dict[str, Any], build: Callable[[Path], dict[str, Any] | None]
    ) -> Entry:
        """The entry for `parts`; if missing or damaged, `build(folder)` writes it.

        `build` writes its files into the (empty) folder it is given and returns
        metadata (JSON-serialisable) to keep in the manifest, e.g. a fingerprint.
        """
        key = make_key(parts)
        entry, _ = self._verify(key, parts)  # the common case: no lock, no writes
        if entry:
            return entry
        self._prepare()
        with self._locked(key):
            # Checked again under the lock: another process may have just built it.
            entry, problem = self._verify(key, parts)
            if entry:
                return entry
            if problem != "absent":
                log.warning("model cache entry %s is %s; rebuilding it", self.path(key), problem)
                self._discard(key)
            self._sweep(key)
            return self._build(key, parts, build)

    def _verify(self, key: str, parts: dict[str, Any]) -> tuple[Entry | None, str]:
        """(entry, "") if complete and intact, else (None, what is wrong)."""
        folder = self.path(key)
        if not folder.is_dir():
            return None, "absent"
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            files = manifest["files"]
            if manifest.get("sha256") != _manifest_sha256(manifest):
                return None, f"damaged ({MANIFEST} does not match its checksum)"
            if manifest.get("key") != key or manifest.get("parts") != parts:
                return None, "for other parts (key mismatch)"
            if sorted(files) != _files(folder):
                return None, "missing files or holds unexpected ones"
            for name, want in files.items():
                path = folder / name
                if path.stat().st_size != want["size"] or file_sha256(path) != want["sha256"]:
                    return None, f"damaged ({name} does not match its checksum)"
            return Entry(folder, key, parts, manifest.get("meta") or {}), ""
        except FileNotFoundError:
            return None, "incomplete (no manifest)"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return None, f"unreadable ({type(e).__name__}: {e})"

    def problems(self) -> list[str]:
        """What is wrong with each entry under the root, as "KEY: problem" (for `verify`);
        builders' leftovers (dot folders) and lock files are not entries."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if folder.name.startswith("."):
                continue
            try:  # the parts as the manifest states them; _verify checks the manifest itself
                parts = json.loads((folder / MANIFEST).read_text())["parts"]
            except (OSError, ValueError, KeyError, TypeError):
                parts = None
            entry, problem = self._verify(folder.name, parts)
            if entry is None:
                out.append(f"{folder.name}: {problem}")
        return out

    def _build(
        self, key: str, parts: dict[str, Any], build: Callable[[Path], dict[str, Any] | None]
    ) -> Entry:
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root))
        except OSError as e:
            raise CbirError(
                f"cannot write in model cache {self.root}: {e.strerror}; "
                "set CBIR_CACHE to a writable folder"
            ) from None
        try:
            meta = build(tmp) or {}
            files = {}
            for name in _files(tmp):
                path = tmp / name
                _fsync(path)
                faults.step(f"fsync model file {name}")
                files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
            manifest = {"key": key, "parts": parts, "meta": meta, "files": files}
            manifest["sha256"] = _manifest_sha256(manifest)
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            faults.step(f"fsync {MANIFEST}")
            _fsync(tmp)
            faults.step(f"fsync folder {tmp.name}")
            try:
                os.rename(tmp, self.path(key))  # atomic; fails if the entry exists (non-empty)
                faults.step(f"rename model entry {key}")
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EACCES, errno.EPERM):
                    raise
                # Lost a race with a builder that held no lock: keep the winner's entry.
                winner, problem = self._verify(key, parts)
                if winner:
                    return winner
                raise OSError(f"model cache entry {self.path(key)} is {problem}") from e
            _fsync(self.root)
            faults.step(f"fsync folder {self.root.name}")
            return Entry(self.path(key), key, parts, meta)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _discard(self, key: str) -> None:
        """Move an entry out of the way in one step, then delete it."""
        trash = self.root / f".trash-{key}-{os.getpid()}-{os.urandom(4).hex()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path(key), trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep(self, key: str) -> None:
        """Remove what crashed builders of this key left behind (we hold its lock)."""
        if fcntl is None:  # without locks a live builder's folder looks the same: leave them
            return
        for leftover in [*self.root.glob(f".tmp-{key}-*"), *self.root.glob(f".trash-{key}-*")]:
            shutil.rmtree(leftover, ignore_errors=True)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        with open(self.root / f"{key}.lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
