"""The content-addressed artifact store on a real folder."""

from __future__ import annotations

import hashlib
import io

import pytest

from lorapool.service.artifacts import (
    ArtifactCorrupt,
    ArtifactError,
    ArtifactNotFound,
    ArtifactStore,
    ArtifactStoreFull,
    ArtifactTooLarge,
)


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_bytes_is_content_addressed_and_deduplicated(store):
    data = b"hello lorapool\n"
    aid = store.put_bytes(data)
    assert aid == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.put_bytes(data) == aid
    assert len(_files(store.objects_dir)) == 1
    assert store.read_bytes(aid) == data and store.exists(aid) and store.verify(aid)
    h = aid.split(":")[1]
    assert store.path(aid) == store.objects_dir / h[:2] / h[2:]
    assert _files(store.tmp_dir) == []


def test_put_stream_from_iterable_and_file(store):
    aid, size = store.put_stream(iter([b"ab", b"", b"cd"]))
    assert size == 4 and store.read_bytes(aid) == b"abcd"
    aid2, size2 = store.put_stream(io.BytesIO(b"abcd"), max_bytes=4)
    assert (aid2, size2) == (aid, 4)


def test_put_stream_past_the_limit_leaves_nothing(store):
    with pytest.raises(ArtifactTooLarge, match="limit of 10 bytes"):
        store.put_stream(iter([b"12345", b"67890", b"x", b"never read"]), max_bytes=10)
    assert _files(store.objects_dir) == [] and _files(store.tmp_dir) == []


def test_a_failing_source_leaves_nothing(store):
    def chunks():
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put_stream(chunks())
    assert _files(store.objects_dir) == [] and _files(store.tmp_dir) == []


def test_put_dir_and_get_dir_round_trip(store, tmp_path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 4}')
    (src / "sub" / "weights.safetensors").write_bytes(b"\x00" * 1000)
    mid = store.put_dir(src)
    assert store.manifest(mid) == {
        "adapter_config.json": (store.put_bytes(b'{"r": 4}'), 8),
        "sub/weights.safetensors": (store.put_bytes(b"\x00" * 1000), 1000),
    }
    out = store.get_dir(mid, tmp_path / "out" / "adapter")
    assert (out / "sub" / "weights.safetensors").read_bytes() == b"\x00" * 1000
    assert (out / "adapter_config.json").read_text() == '{"r": 4}'
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["adapter"]  # no temp left over
    with pytest.raises(FileExistsError):
        store.get_dir(mid, out)
    assert store.put_dir(src) == mid  # same folder, same id


def test_get_dir_with_a_missing_object_leaves_no_partial_folder(store, tmp_path):
    src = tmp_path / "f"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    (src / "b").write_bytes(b"b")
    mid = store.put_dir(src)
    store.delete(store.put_bytes(b"b"))
    with pytest.raises(ArtifactNotFound):
        store.get_dir(mid, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_verify_detects_corruption_and_ids_cannot_escape(store):
    aid = store.put_bytes(b"precious")
    store.path(aid).write_bytes(b"tampered")
    assert not store.verify(aid)
    for bad in ("sha256:../../etc/passwd", "md5:abc", "sha256:" + "G" * 64, ""):
        with pytest.raises(ValueError, match="not an artifact id"):
            store.path(bad)
    with pytest.raises(ArtifactNotFound):
        store.read_bytes("sha256:" + "1" * 64)


def test_a_plain_object_is_not_a_manifest(store, tmp_path):
    aid = store.put_bytes(b'{"files": {"../evil": ["sha256:00", 1]}}')
    with pytest.raises(ArtifactError, match="not a folder manifest"):
        store.get_dir(aid, tmp_path / "x")


def test_a_manifest_naming_a_path_outside_the_folder_is_refused(store, tmp_path):
    import json

    from lorapool.service.artifacts.store import MANIFEST_KIND

    oid = store.put_bytes(b"x")
    mid = store.put_bytes(json.dumps({"kind": MANIFEST_KIND,
                                      "files": {"../evil": [oid, 1]}}).encode())
    with pytest.raises(ArtifactError, match="unsafe path"):
        store.get_dir(mid, tmp_path / "x" / "y")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "x" / "evil").exists()


def test_reads_verify_the_bytes_against_the_id(store, tmp_path):
    aid = store.put_bytes(b"checkpoint bytes")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(b"weights")
    manifest = store.put_dir(folder)
    # Bit rot / a truncated copy on disk: readers must notice, not hand back wrong bytes.
    store.path(aid).write_bytes(b"checkpoint bytez")
    with pytest.raises(ArtifactCorrupt, match="corrupt"):
        store.read_bytes(aid)
    assert not store.verify(aid)
    weights = store.manifest(manifest)["adapter.safetensors"][0]
    store.path(weights).write_bytes(b"w")
    with pytest.raises(ArtifactCorrupt):
        store.get_dir(manifest, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_a_full_disk_fails_cleanly_and_keeps_older_objects(tmp_path):
    from tests.support.small_disk import fill, small_disk

    with small_disk(tmp_path / "disk", "1m") as disk:
        store = ArtifactStore(disk / "artifacts")
        older = store.put_bytes(b"older checkpoint" * 100)
        filler = fill(disk, leave=64 * 1024)
        with pytest.raises(ArtifactStoreFull, match="full") as err:
            store.put_bytes(b"x" * (256 * 1024))
        assert isinstance(err.value, OSError)
        assert not list(store.tmp_dir.iterdir()), "a failed write left a temp file"
        assert store.read_bytes(older) == b"older checkpoint" * 100
        filler.unlink()
        # Space back: writes work again.
        assert store.read_bytes(store.put_bytes(b"y" * 1000)) == b"y" * 1000


def test_put_files_stores_a_folder_like_put_dir_and_read_files_returns_it(store, tmp_path):
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w" * 100,
             "sub/x.json": b"1"}
    folder = tmp_path / "f"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    assert store.put_files(files) == store.put_dir(folder)  # the same manifest, the same id
    assert store.read_files(store.put_files(files)) == files
    with pytest.raises(ArtifactError, match="unsafe"):
        store.put_files({"../escape": b"x"})
