"""The client's archive extraction limits (issue 12, point 5): total bytes, member count and
compression ratio are bounded; an archive over any of them is refused with `ArchiveLimitError`
and nothing is written, neither the destination nor a temp folder beside it."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import Iterable, Optional

import pytest

from lorapool.errors import ArchiveLimitError, InvalidParameterError, UnsafeArchiveError

MiB = 1024 * 1024


class _Zeros(io.RawIOBase):
    """`n` zero bytes as a file, produced as read (the bomb never sits in memory)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def write_tar_gz(path: Path, members: Iterable[tuple[str, int, Optional[bytes]]]) -> Path:
    """(name, size, data or None for `size` zero bytes) members into a tar.gz at `path`."""
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        for name, size, data in members:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(data) if data is not None else _Zeros(size))
    return path


def only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """About 0.5 MB of tar.gz that inflates to 512 MiB of zeros (issue 12's archive)."""
    path = write_tar_gz(tmp_path_factory.mktemp("bomb") / "bomb.tar.gz",
                        [("adapter_config.json", 2, b"{}"),
                         ("adapter_model.safetensors", 512 * MiB, None)])
    assert path.stat().st_size < 1 * MiB
    return path


@pytest.fixture(autouse=True)
def _no_env_limits(monkeypatch):
    for var in ("LORAPOOL_MAX_EXTRACT_BYTES", "LORAPOOL_MAX_EXTRACT_MEMBERS",
                "LORAPOOL_MAX_EXTRACT_RATIO"):
        monkeypatch.delenv(var, raising=False)


def test_bomb_is_refused_and_nothing_is_written(bomb, tmp_path):
    from lorapool._extract import safe_extract

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveLimitError) as exc:
        safe_extract(bomb, out / "adapter")
    err = exc.value
    assert err.limit == "ratio" and err.maximum == 200 and err.actual > 200
    assert "LORAPOOL_MAX_EXTRACT_RATIO" in str(err) and "nothing was written" in str(err)
    assert isinstance(err, UnsafeArchiveError)  # old `except UnsafeArchiveError` still catches
    assert only(out) == []


def test_bomb_is_refused_from_its_header_before_its_data_is_read(tmp_path):
    """An archive cut right after the bomb's header: had the extractor decompressed the
    member's data it would fail on the missing bytes ("not a valid tar file"); the limit is
    decided on the declared size alone, so it is the limit that refuses it."""
    info = tarfile.TarInfo("adapter_model.safetensors")
    info.size = 512 * MiB
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gzip.compress(info.tobuf() + bytes(64 * 1024)))
    from lorapool._extract import safe_extract

    with pytest.raises(ArchiveLimitError) as exc:
        safe_extract(cut, tmp_path / "adapter")
    assert exc.value.limit == "ratio"
    assert not (tmp_path / "adapter").exists()


def test_total_bytes_limit_from_env_and_argument(tmp_path, monkeypatch):
    from lorapool._extract import safe_extract

    # Random bytes do not compress: only the byte limit can refuse this archive.
    archive = write_tar_gz(tmp_path / "a.tar.gz", [("w.bin", 3 * MiB, os.urandom(3 * MiB))])
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("LORAPOOL_MAX_EXTRACT_BYTES", str(2 * MiB))
    with pytest.raises(ArchiveLimitError) as exc:
        safe_extract(archive, out / "adapter")
    assert exc.value.limit == "bytes" and exc.value.maximum == 2 * MiB
    assert exc.value.actual == 3 * MiB and "LORAPOOL_MAX_EXTRACT_BYTES" in str(exc.value)
    assert only(out) == []
    # An argument wins over the environment.
    assert safe_extract(archive, out / "adapter", max_bytes=4 * MiB) == out / "adapter"
    assert (out / "adapter" / "w.bin").stat().st_size == 3 * MiB


def test_too_many_members(tmp_path):
    from lorapool._extract import safe_extract

    archive = write_tar_gz(tmp_path / "many.tar.gz",
                           ((f"f{i:05d}", 1, b"x") for i in range(10_001)))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveLimitError) as exc:
        safe_extract(archive, out / "adapter")
    assert exc.value.limit == "members" and exc.value.maximum == 10_000
    assert "10000 members" in str(exc.value)
    assert only(out) == []


def test_ratio_bomb_of_many_small_members(tmp_path, monkeypatch):
    """No single member is large, but together they inflate 1000×: refused on the running
    total, before any member is written."""
    from lorapool._extract import safe_extract

    archive = write_tar_gz(tmp_path / "r.tar.gz", ((f"shard-{i}.bin", MiB, None)
                                                   for i in range(40)))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveLimitError) as exc:
        safe_extract(archive, out / "adapter")
    assert exc.value.limit == "ratio"
    assert only(out) == []
    # Allowed on purpose (a folder of zeros one trusts), it extracts.
    monkeypatch.setenv("LORAPOOL_MAX_EXTRACT_RATIO", "5000")
    dest = safe_extract(archive, out / "adapter")
    assert len(only(dest)) == 40


def test_small_compressible_files_are_not_refused_for_their_ratio(tmp_path):
    from lorapool._extract import safe_extract

    # 900 KiB of zeros compresses ~1000×, but under 1 MiB nothing is a bomb.
    archive = write_tar_gz(tmp_path / "s.tar.gz", [("tokenizer.json", 900 * 1024, None)])
    dest = safe_extract(archive, tmp_path / "adapter")
    assert (dest / "tokenizer.json").stat().st_size == 900 * 1024


def test_normal_adapter_archive_still_extracts(tmp_path):
    from lorapool._extract import safe_extract

    # A fresh LoRA: A random, B zeros (the most compressible real adapter), ~2× ratio.
    weights = os.urandom(4 * MiB) + bytes(4 * MiB)
    files = {"adapter_config.json": b'{"peft_type": "LORA", "r": 16}',
             "adapter_model.safetensors": weights, "lorapool.json": b'{"base_model": "x"}'}
    archive = write_tar_gz(tmp_path / "ad.tar.gz", [(n, len(d), d) for n, d in files.items()])
    dest = safe_extract(archive, tmp_path / "out" / "adapter")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert only(tmp_path / "out") == ["adapter"]  # no temp folder left beside it


def test_bad_limit_settings_are_refused(tmp_path, monkeypatch):
    from lorapool._extract import ExtractLimits

    with pytest.raises(InvalidParameterError):
        ExtractLimits(max_members=0)
    monkeypatch.setenv("LORAPOOL_MAX_EXTRACT_RATIO", "lots")
    with pytest.raises(InvalidParameterError) as exc:
        ExtractLimits.from_env()
    assert exc.value.param == "LORAPOOL_MAX_EXTRACT_RATIO"


def test_client_download_of_a_bomb_writes_nothing(server, client, bomb, tmp_path, monkeypatch):
    """Through the client, from a (fake, compromised) server over real HTTP."""
    from .conftest import ARCHIVES

    monkeypatch.setitem(ARCHIVES, "ad-bomb", bomb.read_bytes())
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ArchiveLimitError):
        client.adapters.download("ad-bomb", root / "adapter")
    assert only(root) == []  # neither the adapter, nor the downloaded .tar.gz, nor staging


def test_a_download_over_the_byte_limit_is_stopped_and_removed(server, client, tmp_path,
                                                               monkeypatch):
    """The compressed download itself is bounded too (random bytes: no bomb, just big)."""
    from .conftest import ARCHIVES

    big = write_tar_gz(tmp_path / "big.tar.gz", [("w.bin", 3 * MiB, os.urandom(3 * MiB))])
    monkeypatch.setitem(ARCHIVES, "ad-big", big.read_bytes())
    monkeypatch.setenv("LORAPOOL_MAX_EXTRACT_BYTES", str(1 * MiB))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ArchiveLimitError) as exc:
        client.adapters.download("ad-big", root / "adapter")
    assert exc.value.limit == "bytes" and "the download is larger" in str(exc.value)
    assert only(root) == []


def test_async_client_download_of_a_bomb_writes_nothing(server, bomb, tmp_path, monkeypatch):
    import asyncio

    from lorapool import AsyncClient

    from .conftest import API_KEY, ARCHIVES

    monkeypatch.setitem(ARCHIVES, "ad-bomb", bomb.read_bytes())
    root = tmp_path / "root"
    root.mkdir()

    async def main() -> None:
        async with AsyncClient(server.base_url, api_key=API_KEY, timeout=30) as ac:
            await ac.adapters.download("ad-bomb", root / "adapter")

    with pytest.raises(ArchiveLimitError):
        asyncio.run(main())
    assert only(root) == []
