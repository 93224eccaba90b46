"""`placement.workers` / `placement.min_workers` (issue 10) through the real API: stored with
the job, and every bad value a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from lorapool.types import Node

from .conftest import chat_lines, upload

GiB = 1024**3


@pytest.fixture
def file_id(client) -> str:
    return upload(client, chat_lines(16)).json()["id"]


def _create(client, file_id: str, placement: dict[str, Any], **body: Any):
    return client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": file_id, "placement": placement,
        "hyperparameters": {"batch_size": 8}, **body})


def _nodes(n: int) -> list[Node]:
    return [Node(id=f"n{i}", name=f"desk{i}", total_memory_bytes=8 * GiB) for i in range(n)]


def test_workers_are_stored_with_the_job(client, env, file_id):
    env.executor.node_list = _nodes(3)
    r = _create(client, file_id, {"workers": 3, "min_workers": 2})
    assert r.status_code == 200, r.text
    job = env.store.get_job(r.json()["id"])
    assert job.placement["workers"] == 3 and job.placement["min_workers"] == 2
    # One check per node, each pinned to it, on top of the job's own check.
    pinned = [p["node"] for p in env.executor.placements if "node" in p]
    assert pinned == ["desk0", "desk1", "desk2"]


@pytest.mark.parametrize("placement,param,nodes", [
    ({"workers": 0}, "placement.workers", 3),
    ({"workers": 1000}, "placement.workers", 3),
    ({"workers": 2, "min_workers": 3}, "placement.min_workers", 3),
    ({"workers": 2, "min_workers": 0}, "placement.min_workers", 3),
    ({"workers": 16}, "placement.workers", 32),  # more workers than rows per step (8)
    ({"workers": 4}, "placement.workers", 3),  # more than the pool could ever hold
])
def test_bad_worker_counts_are_400_naming_the_field(client, env, file_id, placement, param,
                                                    nodes):
    env.executor.node_list = _nodes(nodes)
    r = _create(client, file_id, placement)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert param.split(".")[-1] in err["message"], err
    assert env.store.list_jobs("acme")[0] == []


def test_nodes_that_cannot_hold_the_job_do_not_count(client, env, file_id):
    env.executor.node_list = _nodes(3)
    real = env.executor.check_fits

    def fits_only_desk0(spec, placement=None):
        real(spec, placement)
        node = (placement or {}).get("node")
        return None if node in (None, "desk0") else "needs 9 GiB; desk has 8 GiB"

    env.executor.check_fits = fits_only_desk0
    r = _create(client, file_id, {"workers": 2, "min_workers": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "placement.workers"
    assert "1 node(s)" in r.json()["error"]["message"]
