"""Moving folders between the head and a node without a shared disk.

A node never opens a path that belongs to the head (DESIGN.md, "Nodes share no disk"). What a
job needs travels as a `Bundle` — a mapping of relative paths to Ray object refs (or bytes) —
and is materialised on the node into a content-addressed cache, so a base model crosses the
network once per node, not once per job. What a node produces (checkpoints, the adapter) comes
back the same way, as `{relative path: bytes}`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

# Files inside a model/checkpoint folder we never ship: pickles are refused everywhere.
_REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def read_folder(path: str | Path) -> dict[str, bytes]:
    """Every file under `path` as {posix relative path: bytes}; a single file maps to its name."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    out: dict[str, bytes] = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.name.startswith(".tmp"):
            out[f.relative_to(path).as_posix()] = f.read_bytes()
    return out


def content_id(files: Mapping[str, bytes]) -> str:
    """A stable sha256 over names and contents."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def _safe_relpath(name: str) -> Path:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"refusing unsafe path in bundle: {name!r}")
    return rel


def write_folder(files: Mapping[str, bytes], dest: str | Path, *,
                 overwrite: bool = True) -> Path:
    """Write {relpath: bytes} to `dest` atomically (a temp sibling, then rename).

    With `overwrite=False` an existing `dest` is left alone and `FileExistsError` raised: a
    reader that already holds `dest` never sees it vanish.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        for name, data in files.items():
            target = tmp / _safe_relpath(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if dest.exists():
            if not overwrite:
                raise FileExistsError(f"{dest} exists")
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            # Another writer renamed its copy into place between our check and our rename.
            if overwrite or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(f"{dest} exists") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def materialise(
    cache_root: str | Path,
    key: str,
    files: Mapping[str, Any],
    fetch: Callable[[Any], bytes] = lambda v: v,
) -> Path:
    """The cached folder for `key` under `cache_root`, fetching `files` only when it is missing.

    `files` maps relative paths to bytes or to anything `fetch` turns into bytes (on a node,
    `ray.get`), so a cache hit never pulls the data across the network.
    """
    dest = Path(cache_root) / key
    if (dest / ".complete").exists():
        return dest
    blobs = {name: fetch(ref) for name, ref in files.items()}
    blobs[".complete"] = key.encode()
    if (dest / ".complete").exists():  # another job here finished it while we fetched
        return dest
    try:
        # Never replace a copy another job on this node may already be reading: two jobs
        # materialising one model at once used to remove it under the first one's feet.
        return write_folder(blobs, dest, overwrite=False)
    except FileExistsError:
        if (dest / ".complete").exists():
            return dest  # the same key is the same content: theirs is as good as ours
    # A folder without the marker is nothing this code leaves (the marker arrives with the
    # rename): move it aside atomically, then write ours.
    stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=dest.parent))
    os.replace(dest, stale / "old")
    shutil.rmtree(stale, ignore_errors=True)
    try:
        return write_folder(blobs, dest, overwrite=False)
    except FileExistsError:
        return dest
