"""A content-addressed object store on local disk: datasets, checkpoints and adapters.

An object's id is `sha256:<hex>` of its bytes and it lives at `objects/<ab>/<cdef…>`; the same
content stored twice is one object. Writes go to a temp file under `tmp/` (same file system),
are hashed while they stream, fsynced, then `os.replace`d into place, so a reader never sees a
half-written object and a failed or refused write leaves nothing behind. A full disk raises
`ArtifactStoreFull` and, like any failed write, leaves the objects already stored untouched.
Reads (`read_bytes`, `get_dir`) re-hash what they read and raise `ArtifactCorrupt` when the
bytes no longer match their id (bit rot, a truncated copy). A folder is stored as one object per
file plus a JSON manifest object; the manifest's id names the folder.

A writer killed mid-write (SIGKILL, power loss) cannot remove its temp file, so every new
store clears `tmp/` of files no live writer owns. Ownership is an exclusive `flock` that each
writer holds on its own temp file from creation until the file is committed or removed; the
kernel drops it when the process dies, whatever killed it, and it cannot be confused by a
reused pid. Several processes share one store: the sweep takes what is unlocked and nothing
else, and a store-wide guard lock (`tmp.lock`, shared by writers for the two calls that
create and lock a temp file, exclusive for the sweep) closes the gap between those two calls.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable, Iterator, Mapping, Optional, Union

try:
    import fcntl
except ImportError:  # Windows: no flock; temp files of dead writers are then left alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("lorapool.artifacts")

CHUNK = 1024 * 1024
_ID_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
MANIFEST_KIND = "lorapool.dir/v1"


class ArtifactError(Exception):
    """Base class of the artifact store's errors."""


class ArtifactNotFound(ArtifactError, FileNotFoundError):
    pass


class ArtifactTooLarge(ArtifactError, ValueError):
    """A streamed write went past its byte limit; nothing was kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the data exceeds the limit of {limit} bytes ({_human(limit)})")
        self.limit = limit


class ArtifactStoreFull(ArtifactError, OSError):
    """The disk under the store ran out of space (or quota) during a write; nothing was kept."""

    def __init__(self, root: Path, cause: OSError) -> None:
        super().__init__(errno.ENOSPC, f"the artifact store at {root} is full "
                         f"({cause.strerror or cause}); nothing was written")


class ArtifactCorrupt(ArtifactError):
    """An object's bytes no longer hash to its id."""


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit != "bytes" else f"{n} bytes"
        n = n / 1024  # type: ignore[assignment]
    return f"{n} bytes"


def _hex(artifact_id: str) -> str:
    m = _ID_RE.match(artifact_id or "")
    if not m:
        # Also what keeps an id from ever naming a path outside the store.
        raise ValueError(f"not an artifact id: {artifact_id!r} (expected 'sha256:<64 hex>')")
    return m.group(1)


def _safe_relpath(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or not rel.parts or any(p in ("..", ".", "") for p in rel.parts):
        raise ArtifactError(f"unsafe path in folder manifest: {name!r}")
    return rel


class ArtifactWriter:
    """One object being written: `write()` chunks, then `commit()` (→ id, size) or `abort()`.

    The push-style twin of `ArtifactStore.put_stream`, for callers that receive data in
    callbacks (a streaming multipart parser). Use it as a context manager: leaving the block
    without `commit()` aborts.
    """

    def __init__(self, store: "ArtifactStore", max_bytes: Optional[int] = None) -> None:
        self._store = store
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        fd, name = store._new_temp()
        self._tmp = Path(name)
        self._fh: Optional[BinaryIO] = os.fdopen(fd, "wb")
        self.id: Optional[str] = None

    def write(self, chunk: bytes) -> None:
        if self._fh is None:
            raise ArtifactError("write after commit/abort")
        if not chunk:
            return
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.abort()
            raise ArtifactTooLarge(self.max_bytes)
        self._hash.update(chunk)
        try:
            self._fh.write(chunk)
        except OSError as exc:
            self.abort()
            if exc.errno in _FULL_ERRNOS:
                raise ArtifactStoreFull(self._store.root, exc) from exc
            raise

    def commit(self) -> tuple[str, int]:
        if self._fh is None:
            raise ArtifactError("commit after abort")
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            artifact_id = f"sha256:{self._hash.hexdigest()}"
            # Installed while still open: the file's lock (this writer's claim on it) must
            # outlive its name in tmp/, or a sweep could take it in between.
            self._store._install(self._tmp, artifact_id)
            self._fh.close()
            self._fh = None
        except OSError as exc:
            self.abort()
            if exc.errno in _FULL_ERRNOS:
                raise ArtifactStoreFull(self._store.root, exc) from exc
            raise
        except BaseException:
            self.abort()
            raise
        self.id = artifact_id
        return artifact_id, self.size

    def abort(self) -> None:
        # Unlink first, close (and so unlock) after: see `commit`.
        self._tmp.unlink(missing_ok=True)
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:  # the buffered tail could not be flushed: the file goes anyway
                pass
            self._fh = None

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.id is None:
            self.abort()


def _copy_verified(src: Path, dst: Path, artifact_id: str) -> None:
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for block in iter(lambda: fin.read(CHUNK), b""):
            h.update(block)
            fout.write(block)
    if h.hexdigest() != _hex(artifact_id):
        raise ArtifactCorrupt(f"{artifact_id} ({src.name}) is corrupt: its bytes no longer "
                              "match its id")


class ArtifactStore:
    """See the module docstring. Safe to share between threads and processes on one disk."""

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self._guard_path = self.root / "tmp.lock"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        removed = self.clear_dead_writers()
        if removed:
            log.info("removed %d temp file(s) of writers that died in %s", removed,
                     self.tmp_dir)

    # -- temp files and who owns them -------------------------------------------------------
    @contextmanager
    def _tmp_guard(self, mode: int) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        fd = os.open(self._guard_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _new_temp(self) -> tuple[int, str]:
        """A new temp file in tmp/, open and locked by this writer: (fd, path)."""
        with self._tmp_guard(fcntl.LOCK_SH if fcntl else 0):
            fd, name = tempfile.mkstemp(prefix=f"put-{os.getpid()}-", dir=self.tmp_dir)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new file: never contended
                except BaseException:
                    os.close(fd)
                    os.unlink(name)
                    raise
        return fd, name

    def clear_dead_writers(self) -> int:
        """Remove the temp files in tmp/ that no live writer holds (left by a killed process);
        the number removed. A live writer's file, in this process or another, is never
        touched. Runs when a store is opened; safe to call any time."""
        if fcntl is None:
            return 0
        removed = 0
        with self._tmp_guard(fcntl.LOCK_EX):
            for entry in os.scandir(self.tmp_dir):
                if not entry.is_file(follow_symlinks=False):
                    continue  # nothing a writer makes; not ours to judge
                try:
                    fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                except FileNotFoundError:
                    continue  # committed or aborted meanwhile
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live writer holds it
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
                finally:
                    os.close(fd)
        return removed

    # -- writing ----------------------------------------------------------------------------
    def writer(self, *, max_bytes: Optional[int] = None) -> ArtifactWriter:
        return ArtifactWriter(self, max_bytes)

    def put_bytes(self, data: bytes) -> str:
        with self.writer() as w:
            w.write(data)
            return w.commit()[0]

    def put_stream(
        self, chunks: Union[Iterable[bytes], BinaryIO], *, max_bytes: Optional[int] = None
    ) -> tuple[str, int]:
        """Store a stream (an iterable of bytes or a binary file object); (id, size).

        Raises `ArtifactTooLarge` as soon as more than `max_bytes` arrived, leaving nothing.
        """
        if hasattr(chunks, "read"):
            fh = chunks

            def _iter() -> Iterator[bytes]:
                while True:
                    block = fh.read(CHUNK)  # type: ignore[union-attr]
                    if not block:
                        return
                    yield block

            source: Iterable[bytes] = _iter()
        else:
            source = chunks  # type: ignore[assignment]
        with self.writer(max_bytes=max_bytes) as w:
            for chunk in source:
                w.write(chunk)
            return w.commit()

    def put_file(self, path: Union[str, Path]) -> str:
        with open(path, "rb") as fh:
            return self.put_stream(fh)[0]

    def put_dir(self, path: Union[str, Path]) -> str:
        """Store every file under `path` and a manifest {relpath: [id, size]}; the manifest's id."""
        path = Path(path)
        if not path.is_dir():
            raise NotADirectoryError(f"not a folder: {path}")
        files: dict[str, list] = {}
        for f in sorted(path.rglob("*")):
            if f.is_symlink():
                raise ArtifactError(f"refusing to store a symbolic link: {f}")
            if f.is_file():
                rel = f.relative_to(path).as_posix()
                files[rel] = [self.put_file(f), f.stat().st_size]
        return self._put_manifest(files)

    def put_files(self, files: Mapping[str, bytes]) -> str:
        """Store a folder given as {relative path: bytes} (what a node sends back) exactly as
        `put_dir` would store it on disk; the manifest's id. No temporary copy is written."""
        entries: dict[str, list] = {}
        for rel in sorted(files):
            _safe_relpath(rel)
            entries[rel] = [self.put_bytes(files[rel]), len(files[rel])]
        return self._put_manifest(entries)

    def _put_manifest(self, files: dict[str, list]) -> str:
        manifest = {"kind": MANIFEST_KIND, "files": files}
        return self.put_bytes(json.dumps(manifest, sort_keys=True).encode())

    def _install(self, tmp: Path, artifact_id: str) -> None:
        dest = self.path(artifact_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Same content already there: keep the existing object (readers may have it open).
        if dest.exists():
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, dest)

    # -- reading ----------------------------------------------------------------------------
    def path(self, artifact_id: str) -> Path:
        h = _hex(artifact_id)
        return self.objects_dir / h[:2] / h[2:]

    def exists(self, artifact_id: str) -> bool:
        return self.path(artifact_id).is_file()

    def _existing(self, artifact_id: str) -> Path:
        p = self.path(artifact_id)
        if not p.is_file():
            raise ArtifactNotFound(f"no artifact {artifact_id}")
        return p

    def open(self, artifact_id: str) -> BinaryIO:
        return open(self._existing(artifact_id), "rb")

    def read_bytes(self, artifact_id: str) -> bytes:
        """The object's bytes, checked against its id (`ArtifactCorrupt` when they differ)."""
        data = self._existing(artifact_id).read_bytes()
        if hashlib.sha256(data).hexdigest() != _hex(artifact_id):
            raise ArtifactCorrupt(f"{artifact_id} is corrupt: its bytes no longer match its id")
        return data

    def size(self, artifact_id: str) -> int:
        return self._existing(artifact_id).stat().st_size

    def verify(self, artifact_id: str) -> bool:
        """Re-hash the object: False when missing or its bytes no longer match its id."""
        p = self.path(artifact_id)
        if not p.is_file():
            return False
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                h.update(block)
        return h.hexdigest() == _hex(artifact_id)

    def manifest(self, manifest_id: str) -> dict[str, tuple[str, int]]:
        """The folder a manifest describes: {relative path: (object id, size)}."""
        try:
            doc = json.loads(self.read_bytes(manifest_id))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{manifest_id} is not a folder manifest") from exc
        if not isinstance(doc, dict) or doc.get("kind") != MANIFEST_KIND:
            raise ArtifactError(f"{manifest_id} is not a folder manifest")
        out: dict[str, tuple[str, int]] = {}
        for rel, (oid, size) in doc["files"].items():
            _safe_relpath(rel)
            _hex(oid)
            out[rel] = (oid, int(size))
        return out

    def read_files(self, manifest_id: str) -> dict[str, bytes]:
        """A stored folder as {relative path: bytes}, each file checked against its id."""
        return {rel: self.read_bytes(oid) for rel, (oid, _) in self.manifest(manifest_id).items()}

    def get_dir(self, manifest_id: str, dest: Union[str, Path]) -> Path:
        """Materialise a stored folder at `dest` (built in a temp sibling, then renamed).

        `dest` must not exist yet: overwriting a folder someone may be using is the caller's call.
        """
        dest = Path(dest)
        if dest.exists():
            raise FileExistsError(f"destination exists: {dest}")
        files = self.manifest(manifest_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
        try:
            for rel, (oid, _) in files.items():
                target = tmp.joinpath(*_safe_relpath(rel).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_verified(self._existing(oid), target, oid)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    # -- removing ---------------------------------------------------------------------------
    def delete(self, artifact_id: str) -> bool:
        """Remove one object (not the objects a manifest names); False when it was not there.

        The caller decides that nothing else refers to it (the store keeps the references)."""
        p = self.path(artifact_id)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        return True
