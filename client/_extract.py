"""Safe extraction of a downloaded adapter archive (tar.gz) into a destination folder.

The archive comes from a server, so it is treated as untrusted: every member is checked
*before* anything is written (no absolute paths, no `..`, no links that leave the folder, no
devices or FIFOs); the archive is unpacked into a temporary sibling folder with tarfile's
`data` filter as a second guard, and only a complete, checked tree is moved into place. A
refused archive leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from .errors import UnsafeArchiveError


def _check_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"archive member {name!r} points outside the destination (..)")
    return path


def _inside(base: PurePosixPath, target: PurePosixPath) -> bool:
    # Normalise without touching the disk: a link target must stay below the archive root.
    parts: list[str] = []
    for part in (base / target).parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return False
            parts.pop()
        else:
            parts.append(part)
    return True


def check_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """All members, or UnsafeArchiveError naming the first one that is not safe."""
    members = tar.getmembers()
    for m in members:
        path = _check_name(m.name)
        if m.issym():
            target = PurePosixPath(m.linkname)
            if target.is_absolute() or not _inside(path.parent, target):
                raise UnsafeArchiveError(
                    f"archive member {m.name!r} links outside the destination ({m.linkname!r})")
        elif m.islnk():
            _check_name(m.linkname)
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"archive member {m.name!r} is not a file or folder")
    return members


def safe_extract(archive: Path, dest: Path, *, overwrite: bool = False) -> Path:
    """Unpack `archive` into `dest` (created); returns `dest`.

    If `dest` exists and is not empty, FileExistsError unless `overwrite`."""
    dest = Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise FileExistsError(f"destination {dest} exists and is not empty (pass overwrite=True)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = check_members(tar)
                tar.extractall(staging, members=members, filter="data")
        except tarfile.TarError as exc:
            raise UnsafeArchiveError(f"the downloaded archive is not a valid tar file: {exc}") \
                from exc
        if dest.exists():
            # Replace in two renames so a failure never leaves a half-old, half-new folder.
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
