"""The artifact store clears tmp/ of dead writers at start, and never a live writer's file
(issue 12, point 7: a killed upload left its partial file in tmp/ for good).

Writers here are real processes (a child Python that opens a store and writes), killed with
SIGKILL where the test needs a dead one, so the kernel - not the test - decides what is held.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lorapool.service.artifacts import ArtifactStore

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

# A child that opens the store, writes 3 MiB into a writer, prints its temp path, then waits
# for a line on stdin: "commit" commits and prints the id, anything else aborts.
_WRITER = r"""
import sys
from lorapool.service.artifacts import ArtifactStore
w = ArtifactStore(sys.argv[1]).writer()
w.write(b"x" * (3 * 1024 * 1024))
print(w._tmp, flush=True)
if sys.stdin.readline().strip() == "commit":
    print(w.commit()[0], flush=True)
else:
    w.abort()
"""


def _start_writer(root: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_file() and tmp.parent == root / "tmp", tmp
    return proc, tmp


def test_a_killed_writers_file_is_removed_at_start(tmp_path):
    root = tmp_path / "artifacts"
    proc, tmp = _start_writer(root)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert tmp.stat().st_size == 3 * 1024 * 1024  # the dead writer's bytes are still there
    store = ArtifactStore(root)  # a restart
    assert not tmp.exists()
    assert list(store.tmp_dir.iterdir()) == []
    assert store.read_bytes(store.put_bytes(b"still works")) == b"still works"


def test_a_live_writer_in_another_process_is_left_alone(tmp_path):
    root = tmp_path / "artifacts"
    proc, tmp = _start_writer(root)
    try:
        store = ArtifactStore(root)  # e.g. a second pool process opening the same store
        assert store.clear_dead_writers() == 0
        assert tmp.is_file()
        # ... and the writer finishes normally after the sweeps.
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("commit\n")
        proc.stdin.flush()
        artifact_id = proc.stdout.readline().strip()
        assert proc.wait(20) == 0
        assert store.read_bytes(artifact_id) == b"x" * (3 * 1024 * 1024)
        assert list(store.tmp_dir.iterdir()) == []
    finally:
        proc.kill()
        proc.wait(10)


def test_a_live_writer_in_this_process_is_left_alone(tmp_path):
    first = ArtifactStore(tmp_path / "artifacts")
    with first.writer() as w:
        w.write(b"half")
        second = ArtifactStore(tmp_path / "artifacts")
        assert second.clear_dead_writers() == 0 and w._tmp.is_file()
        artifact_id, _ = w.commit()
    assert second.read_bytes(artifact_id) == b"half"


def test_an_unowned_leftover_is_removed_but_folders_are_not(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    (store.tmp_dir / "put-old").write_bytes(b"from a writer that died long ago")
    (store.tmp_dir / "someone-elses-folder").mkdir()
    assert store.clear_dead_writers() == 1
    assert [p.name for p in store.tmp_dir.iterdir()] == ["someone-elses-folder"]
