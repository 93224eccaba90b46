"""Export records in the store (migration 0004) and what the pool's task loop does with them
across a restart, on real SQLite files and a real artifact folder (no Ray: nothing here starts
a task):

- a finished export is served again by the next server from its stored artifact, not rebuilt;
- a queued or running one is queued again; one whose base model is gone fails with a reason;
- a failed one, asked again, starts a new export.
"""

from __future__ import annotations

import pytest

from lorapool.service.artifacts import ArtifactStore
from lorapool.service.pool.task_queue import PoolTasks, _Flight
from lorapool.service.store import ModelEntry, Store
from lorapool.service.store.exports import ExportRecord


@pytest.fixture()
def paths(tmp_path):
    return {"db": f"sqlite:///{tmp_path / 'lorapool.db'}", "artifacts": tmp_path / "artifacts",
            "model": tmp_path / "model"}


def _server(paths):
    store = Store(paths["db"])
    return store, PoolTasks(store, ArtifactStore(paths["artifacts"]))


def _model(store, paths, sha="a" * 64):
    paths["model"].mkdir(exist_ok=True)
    return store.add_model(ModelEntry(name="tiny", path=str(paths["model"]), format="hf",
                                      sha256=sha, bytes=10))


def test_records_round_trip(paths):
    store = Store(paths["db"])
    rec = store.create_export(ExportRecord(id="export-1", format="gguf", model="tiny",
                                           model_sha256="a" * 64, adapter_id="ft-x",
                                           adapter_key="k", base_id="org/tiny"))
    assert rec.status == "queued" and rec.created_at > 0
    assert store.update_export("export-1", status="running", node="n1")
    assert not store.update_export("export-nope", status="running")
    with pytest.raises(TypeError):
        store.update_export("export-1", model="other")
    store.close()
    again = Store(paths["db"])  # a restart reads the same record back
    got = again.latest_export(("gguf", "a" * 64, "k"))
    assert got is not None and got.id == "export-1" and got.node == "n1"
    assert [r.id for r in again.exports_in_status("running")] == ["export-1"]
    assert again.latest_export(("merged", "a" * 64, "k")) is None


def test_a_finished_export_survives_a_restart(paths):
    store, tasks = _server(paths)
    model = _model(store, paths)
    state = tasks.request_export("base", model, None, base_id="org/tiny").record
    assert store.get_export(state.id).status == "queued"
    tasks._export_finished(_Flight("export", state.id, None, "n1", 0),
                           {"status": "succeeded", "files": {"model.safetensors": b"weights"}})
    assert store.get_export(state.id).status == "succeeded"
    store.close()

    store, tasks = _server(paths)  # the next server
    again = tasks.request_export("base", store.get_model("tiny"), None,
                                 base_id="org/tiny").record
    assert again.id == state.id and again.status == "succeeded"
    assert tasks.artifacts.read_files(again.artifact_id) == {"model.safetensors": b"weights"}
    assert store.exports_in_status("queued") == []  # nothing rebuilt


def test_unfinished_exports_are_queued_again_or_failed_with_a_reason(paths):
    store, tasks = _server(paths)
    model = _model(store, paths)
    running = tasks.request_export("base", model, None, base_id="org/tiny").record
    store.update_export(running.id, status="running", node="gone-node")
    other = ModelEntry(name="other", path=str(paths["model"]), format="hf", sha256="b" * 64)
    orphan = tasks.request_export("base", other, None, base_id="org/other").record  # unknown
    store.close()

    store, tasks = _server(paths)
    tasks._recover()
    assert store.get_export(running.id).status == "queued"
    assert store.get_export(running.id).node is None
    assert tasks.get_export(running.id).record.status == "queued"  # the loop will start it
    lost = store.get_export(orphan.id)
    assert lost.status == "failed" and lost.error_code == "invalid_export"
    assert "no longer registered" in lost.error_message


def test_a_failed_export_asked_again_starts_anew(paths):
    store, tasks = _server(paths)
    model = _model(store, paths)
    first = tasks.request_export("gguf", model, None, base_id="org/tiny")
    tasks._export_failed(first, "node_lost", "the node left")
    first = first.record
    store.close()

    store, tasks = _server(paths)
    second = tasks.request_export("gguf", store.get_model("tiny"), None,
                                  base_id="org/tiny").record
    assert second.id != first.id and second.status == "queued"
    assert store.get_export(first.id).status == "failed"
    assert store.latest_export(("gguf", "a" * 64, "")).id == second.id
