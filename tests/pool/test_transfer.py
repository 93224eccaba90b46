"""Moving folders to nodes: the content-addressed node cache under concurrent jobs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lorapool.service.pool.transfer import materialise, read_folder, write_folder

FILES = {"config.json": b"{}", "model.safetensors": b"w" * 4096, "sub/tokenizer.json": b"t"}


def test_materialise_fetches_once_and_then_hits_the_cache(tmp_path: Path) -> None:
    fetched: list[str] = []

    def fetch(v: bytes) -> bytes:
        fetched.append("x")
        return v

    first = materialise(tmp_path, "k1", FILES, fetch)
    again = materialise(tmp_path, "k1", FILES, fetch)
    assert first == again and len(fetched) == len(FILES)
    assert read_folder(first) == {**FILES, ".complete": b"k1"}


def test_concurrent_jobs_never_see_the_cached_model_vanish(tmp_path: Path) -> None:
    """Eight jobs on one node materialise one model at once (all miss the cache, as when a
    node takes several jobs of one model together). Once the folder is there, it must stay
    there: a job that already loads it must not have it removed under its feet."""
    dest = tmp_path / "k"
    seen_complete = threading.Event()
    vanished: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if (dest / ".complete").exists():
                seen_complete.set()
            elif seen_complete.is_set() and not (dest / "model.safetensors").exists():
                vanished.append(time.time())
            time.sleep(0.0002)

    def slow_fetch(v: bytes) -> bytes:
        time.sleep(0.05)  # everyone passes the cache check before anyone finishes
        return v

    results: list[Path] = []
    watcher = threading.Thread(target=watch)
    watcher.start()
    jobs = [threading.Thread(target=lambda: results.append(
        materialise(tmp_path, "k", FILES, slow_fetch))) for _ in range(8)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    stop.set()
    watcher.join()
    assert results == [dest] * 8
    assert not vanished, "the cached folder disappeared while in use"
    assert read_folder(dest) == {**FILES, ".complete": b"k"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_write_folder_without_overwrite_leaves_an_existing_folder(tmp_path: Path) -> None:
    dest = write_folder({"a": b"1"}, tmp_path / "d")
    with pytest.raises(FileExistsError):
        write_folder({"a": b"2"}, dest, overwrite=False)
    assert (dest / "a").read_bytes() == b"1"
    assert write_folder({"a": b"3"}, dest).joinpath("a").read_bytes() == b"3"


def test_a_stray_folder_without_the_marker_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "half.bin").write_bytes(b"x")
    dest = materialise(tmp_path, "k", FILES)
    assert read_folder(dest) == {**FILES, ".complete": b"k"}
    assert [p.name for p in tmp_path.iterdir()] == ["k"]
