"""Safe extraction of a downloaded adapter archive (tar.gz) into a destination folder.

The archive comes from a server, so it is treated as untrusted: every member is checked
*before* anything is written (no absolute paths, no `..`, no links that leave the folder, no
devices or FIFOs, and the limits below); the archive is unpacked into a temporary sibling
folder with tarfile's `data` filter as a second guard, and only a complete, checked tree is
moved into place. A refused archive leaves nothing behind.

Limits (`ExtractLimits`; arguments of `safe_extract`, else `LORAPOOL_MAX_EXTRACT_BYTES`,
`LORAPOOL_MAX_EXTRACT_MEMBERS`, `LORAPOOL_MAX_EXTRACT_RATIO`, else the defaults) keep a
compromised server from filling the disk with a small archive. The defaults fit any LoRA
adapter or checkpoint lorapool produces with room to spare:

- 8 GiB uncompressed: a rank-128 adapter on every linear layer of a 70B Llama is about 6.6 GB
  in fp32 (the largest adapter a pool of office GPUs would train), a PEFT checkpoint the same;
- 10,000 members: a PEFT folder holds a handful of files (config, weights, metadata, tokenizer);
- ratio 200 (uncompressed / compressed bytes): gzip makes float weights about 1.1× smaller,
  a fresh LoRA (B = 0) about 2×; a bomb is 1000× (gzip's ceiling). The ratio is only applied
  once more than 1 MiB would be written, so small archives of JSON are never refused for it.

The limits are checked against the sizes the tar headers declare (what extraction writes), as
the headers are read: a bomb is refused at its first oversized header, before its data is
decompressed, let alone written.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Optional

from .errors import ArchiveLimitError, InvalidParameterError, UnsafeArchiveError

MAX_BYTES_ENV = "LORAPOOL_MAX_EXTRACT_BYTES"
MAX_MEMBERS_ENV = "LORAPOOL_MAX_EXTRACT_MEMBERS"
MAX_RATIO_ENV = "LORAPOOL_MAX_EXTRACT_RATIO"
RATIO_FLOOR_BYTES = 1024 * 1024  # below this total, the ratio is not checked


@dataclass(frozen=True)
class ExtractLimits:
    """How much one archive may unpack to (see the module docstring for the defaults)."""

    max_bytes: int = 8 * 1024**3
    max_members: int = 10_000
    max_ratio: float = 200.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_members", "max_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not value > 0:
                raise InvalidParameterError(name, f"must be a positive number (got {value!r})")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, *,
                 max_bytes: Optional[int] = None, max_members: Optional[int] = None,
                 max_ratio: Optional[float] = None) -> "ExtractLimits":
        """Arguments first, then LORAPOOL_MAX_EXTRACT_* from the environment, then defaults."""
        env = os.environ if environ is None else environ
        default = cls()

        def pick(arg: Optional[float], var: str, fallback: float, kind: type) -> float:
            if arg is not None:
                return arg
            raw = env.get(var, "").strip()
            if not raw:
                return fallback
            try:
                return kind(raw)
            except ValueError:
                raise InvalidParameterError(var, f"must be a number (got {raw!r})") from None

        return cls(max_bytes=int(pick(max_bytes, MAX_BYTES_ENV, default.max_bytes, int)),
                   max_members=int(pick(max_members, MAX_MEMBERS_ENV, default.max_members, int)),
                   max_ratio=float(pick(max_ratio, MAX_RATIO_ENV, default.max_ratio, float)))


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


def check_download_size(size: int, max_bytes: Optional[int]) -> None:
    """ArchiveLimitError once a download has brought more than `max_bytes` (a gzip archive is
    not bigger than what it unpacks to, so the byte limit bounds the download too)."""
    if max_bytes is not None and size > max_bytes:
        raise ArchiveLimitError(
            f"the download is larger than {_human(max_bytes)} (the limit is {max_bytes} bytes, "
            f"{MAX_BYTES_ENV}); stopped, nothing was kept", limit="bytes", maximum=max_bytes,
            actual=size)


def _check_member(m: tarfile.TarInfo) -> None:
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


def _human(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{int(n)} bytes"


def check_members(tar: tarfile.TarFile, limits: Optional[ExtractLimits] = None,
                  compressed_size: Optional[int] = None) -> list[tarfile.TarInfo]:
    """All members, read header by header; UnsafeArchiveError naming the first one that is not
    safe, or ArchiveLimitError as soon as the headers read so far go over a limit (no member
    data past that point is decompressed)."""
    limits = limits or ExtractLimits()
    members: list[tarfile.TarInfo] = []
    total = 0
    while True:
        m = tar.next()
        if m is None:
            return members
        members.append(m)
        if len(members) > limits.max_members:
            raise ArchiveLimitError(
                f"the archive has more than {limits.max_members} members (the limit; "
                f"{MAX_MEMBERS_ENV}); nothing was written", limit="members",
                maximum=limits.max_members, actual=len(members))
        _check_member(m)
        if m.isfile():
            total += m.size
        if total > limits.max_bytes:
            raise ArchiveLimitError(
                f"the archive unpacks to more than {_human(limits.max_bytes)} (member "
                f"{m.name!r} brings it to {_human(total)}; the limit is {limits.max_bytes} "
                f"bytes, {MAX_BYTES_ENV}); nothing was written", limit="bytes",
                maximum=limits.max_bytes, actual=total)
        if compressed_size and total > RATIO_FLOOR_BYTES:
            ratio = total / compressed_size
            if ratio > limits.max_ratio:
                raise ArchiveLimitError(
                    f"the archive unpacks to {ratio:.0f}× its size ({_human(compressed_size)} → "
                    f"at least {_human(total)}; the limit is {limits.max_ratio:g}×, "
                    f"{MAX_RATIO_ENV}): a compression bomb? nothing was written",
                    limit="ratio", maximum=limits.max_ratio, actual=ratio)


def safe_extract(archive: Path, dest: Path, *, overwrite: bool = False,
                 limits: Optional[ExtractLimits] = None, max_bytes: Optional[int] = None,
                 max_members: Optional[int] = None, max_ratio: Optional[float] = None) -> Path:
    """Unpack `archive` into `dest` (created); returns `dest`.

    If `dest` exists and is not empty, FileExistsError unless `overwrite`. `limits` (or the
    single `max_*` arguments, then LORAPOOL_MAX_EXTRACT_*) bound what it may unpack to:
    ArchiveLimitError past them, with nothing written."""
    if limits is None:
        limits = ExtractLimits.from_env(max_bytes=max_bytes, max_members=max_members,
                                        max_ratio=max_ratio)
    dest = Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise FileExistsError(f"destination {dest} exists and is not empty (pass overwrite=True)")
    archive = Path(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            # Every header is read and checked before the staging folder even exists.
            members = check_members(tar, limits, archive.stat().st_size)
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            try:
                tar.extractall(staging, members=members, filter="data")
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # A corrupt or truncated stream (not a limit or safety refusal: those pass through).
        raise UnsafeArchiveError(f"the downloaded archive is not a valid tar file: {exc}") \
            from exc
    try:
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
