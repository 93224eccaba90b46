"""The federation driver against a real store and artifact store, with the test in the
scheduler's place (no Ray): it moves the participants' jobs and registers their adapters, the
driver starts rounds, honours the deadline and the quorum, cancels stragglers and aggregates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lorapool.service.store.federations import FederationRecord

SHA = "b" * 64


class Executor:
    def __init__(self) -> None:
        self.woken = 0
        self.cancelled: list[str] = []

    def wake(self) -> None:
        self.woken += 1

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[Path]:
    """Three rank-4 adapters with random (nonzero) B, as participants would return."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("driver-adapters")
    out = []
    for i in range(3):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj"]))
        model.save_pretrained(root / f"a{i}")
        (root / f"a{i}" / "lorapool.json").write_text(json.dumps({
            "format": "lorapool-adapter/1", "base_model": "tiny", "base_model_sha256": SHA,
            "n_examples": 10 * (i + 1), "metrics": {}}))
        out.append(root / f"a{i}")
    return out


@pytest.fixture
def world(tmp_path) -> Any:
    from lorapool.service.artifacts import ArtifactStore
    from lorapool.service.pool.federation import FederationDriver
    from lorapool.service.store import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    artifacts = ArtifactStore(tmp_path / "artifacts")
    executor = Executor()
    yield store, artifacts, executor, FederationDriver(store, artifacts, executor)
    store.close()


def _federation(store, **kw) -> FederationRecord:
    fields = dict(
        id="fed-t", tenant="hq", model="tiny", model_sha256=SHA,
        spec={"base_model_id": "tiny", "lora": {"r": 4, "alpha": 8}, "max_steps": 2,
              "seed": 5},
        participants=[{"name": n, "tenant": "hq", "dataset": {"node": f"{n}-node", "name": n}}
                      for n in ("a", "b", "c")],
        tenants=["hq"], rounds_total=2, method="exact", quorum=2, deadline_s=10.0)
    fields.update(kw)
    return store.create_federation(FederationRecord(**fields))


def _succeed(store, artifacts, job_id: str, folder: Path) -> None:
    job = store.get_job(job_id)
    rec = store.add_adapter(tenant=job.tenant, base_model="tiny", base_model_sha256=SHA,
                            job_id=job_id, artifact_id=artifacts.put_dir(folder), bytes=1,
                            sha256=None, metrics={"train_loss": 1.0, "n_examples": 10})
    assert store.transition(job_id, {"queued", "running"}, "succeeded", adapter_id=rec.id)


def _round(store, k: int) -> dict[str, Any]:
    return store.get_federation("fed-t").rounds[k - 1]


def test_rounds_deadline_quorum_and_the_global_adapter(world, adapters):
    store, artifacts, executor, driver = world
    _federation(store)
    driver.tick(now=100.0)
    r1 = _round(store, 1)
    assert r1["status"] == "running" and r1["init_adapter"] is None and executor.woken == 1
    jobs = {p: store.get_job(j) for p, j in r1["jobs"].items()}
    assert all(j.status == "queued" and j.placement == {"node": f"{p}-node"}
               and j.dataset["name"] == p and j.metadata["round"] == "1"
               for p, j in jobs.items())
    _succeed(store, artifacts, r1["jobs"]["b"], adapters[1])
    _succeed(store, artifacts, r1["jobs"]["a"], adapters[0])
    driver.tick(now=105.0)  # c still queued, deadline not reached: wait
    assert _round(store, 1)["status"] == "running"
    driver.tick(now=110.0)  # the deadline: a and b are a quorum; c is cut
    r1 = _round(store, 1)
    assert r1["status"] == "completed" and r1["took_part"] == ["a", "b"]
    assert "deadline" in r1["dropped"]["c"]
    assert store.get_job(r1["jobs"]["c"]).status == "cancelled"
    m = r1["metrics"]
    assert m["merged_rank"] == 8 and m["rank"] == 4 and 0 < m["refactor_error"] < 1
    glob = store.get_adapter(r1["global_adapter"], "hq")
    assert glob is not None and glob.metrics["federation"] == "fed-t"
    # Round 2 started at once, from round 1's global adapter, with the next seed.
    r2 = _round(store, 2)
    assert r2["init_adapter"] == r1["global_adapter"]
    job2 = {p: store.get_job(j) for p, j in r2["jobs"].items()}
    assert all(j.init_adapter == r1["global_adapter"] and j.spec["seed"] == 6
               for j in job2.values())
    # Round 2: a fails (its node was lost for good), b and c come back.
    assert store.transition(r2["jobs"]["a"], {"queued"}, "failed", error_message="node lost")
    _succeed(store, artifacts, r2["jobs"]["b"], adapters[1])
    _succeed(store, artifacts, r2["jobs"]["c"], adapters[2])
    driver.tick(now=111.0)
    fed = store.get_federation("fed-t")
    assert fed.status == "succeeded" and fed.global_adapter == fed.rounds[1]["global_adapter"]
    assert fed.rounds[1]["took_part"] == ["b", "c"]
    assert fed.rounds[1]["dropped"] == {"a": "job failed: node lost"}


def test_quorum_out_of_reach_fails_the_federation_and_cancels_the_rest(world):
    store, _, executor, driver = world
    _federation(store, quorum=3)
    driver.tick(now=0.0)
    r1 = _round(store, 1)
    store.transition(r1["jobs"]["a"], {"queued"}, "failed", error_message="bad data")
    store.transition(r1["jobs"]["b"], {"queued"}, "running")
    driver.tick(now=1.0)
    fed = store.get_federation("fed-t")
    assert fed.status == "failed" and fed.error_code == "quorum_not_met"
    assert "quorum is 3" in fed.error_message
    # The jobs of a failed round are not left using the pool.
    assert fed.rounds[0]["status"] == "failed"
    assert executor.cancelled == [r1["jobs"]["b"]]
    assert store.get_job(r1["jobs"]["c"]).status == "cancelled"


def test_cancel_stops_the_open_round(world):
    store, _, executor, driver = world
    _federation(store)
    driver.tick(now=0.0)
    r1 = _round(store, 1)
    store.transition(r1["jobs"]["a"], {"queued"}, "running")
    store.update_federation("fed-t", cancel_requested=True)
    driver.tick(now=1.0)
    fed = store.get_federation("fed-t")
    assert fed.status == "cancelled" and fed.rounds[0]["status"] == "cancelled"
    assert executor.cancelled == [r1["jobs"]["a"]]  # running: asked to stop between steps
    assert store.get_job(r1["jobs"]["b"]).status == "cancelled"  # queued: cancelled at once
