"""A real, size-limited folder (a tmpfs mount) for tests of what happens when a disk fills.

Mounting needs root (CAP_SYS_ADMIN), which this project's test machines have; where the mount is
not permitted the test is skipped with that reason rather than faked.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def mount_small_disk(path: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at `path`; None when done, else why it could not be."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or "mount failed")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m") -> Iterator[Path]:
    """Mount a tmpfs of `size` at `path` for the duration of the block (or skip the test)."""
    why = mount_small_disk(path, size)
    if why is not None:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {why}")
    try:
        yield path
    finally:
        unmount(path)


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the file system under `path` until fewer than `leave` bytes are free."""
    import os

    filler = path / "filler.bin"
    block = b"\0" * 65536
    with open(filler, "wb") as fh:
        try:
            while True:
                st = os.statvfs(path)
                free = st.f_bavail * st.f_frsize
                if free <= leave:
                    break
                fh.write(block[: max(1, min(len(block), free - leave))])
                fh.flush()
        except OSError:
            pass
    return filler
