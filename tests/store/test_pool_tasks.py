"""The store's sharing, merge and evaluation records (`PoolTaskStore`), on in-memory SQLite."""

from __future__ import annotations

import pytest

from lorapool.service.store import EvaluationRecord, MergeRecord, Store, new_id


@pytest.fixture
def store():
    s = Store("sqlite://")
    yield s
    s.close()


def _adapter(store, tenant):
    return store.add_adapter(tenant, "m", "a" * 64, None, "sha256:x", 1, "x")


def test_sharing_is_visibility_and_revocation_takes_it_back(store):
    mine, theirs = _adapter(store, "acme"), _adapter(store, "globex")
    assert store.get_visible_adapter(theirs.id, "acme") is None
    assert store.share_adapter(theirs.id, "acme") is True
    assert store.share_adapter(theirs.id, "acme") is False  # twice is once
    assert store.get_visible_adapter(theirs.id, "acme").id == theirs.id
    assert store.get_visible_adapter(theirs.id, "initech") is None
    assert store.adapter_shares(theirs.id) == ["acme"]
    assert [a.id for a in store.list_visible_adapters("acme")[0]] == [theirs.id, mine.id]
    assert [a.id for a in store.list_adapters("acme")[0]] == [mine.id]
    assert store.unshare_adapter(theirs.id, "acme") is True
    assert store.unshare_adapter(theirs.id, "acme") is False
    assert store.get_visible_adapter(theirs.id, "acme") is None


def test_tasks_are_tenant_scoped_idempotent_and_compare_and_set(store):
    first = store.create_task("merge", MergeRecord(id=new_id("merge"), tenant="acme",
                                                   method="exact", adapters=["x"],
                                                   idempotency_key="k"))
    again = store.create_task("merge", MergeRecord(id=new_id("merge"), tenant="acme",
                                                   method="ties", adapters=["y"],
                                                   idempotency_key="k"))
    assert again.id == first.id and again.method == "exact"
    assert store.get_task("merge", first.id, "globex") is None
    assert store.transition_task("merge", first.id, {"queued"}, "running", node="n1")
    assert not store.transition_task("merge", first.id, {"queued"}, "running")
    assert store.transition_task("merge", first.id, {"running"}, "succeeded",
                                 relative_error=float("nan"), result_adapter="ad-1")
    done = store.get_task("merge", first.id, "acme")
    assert done.status == "succeeded" and done.relative_error is None  # NaN is not JSON/SQL
    assert store.merge_for_adapter("ad-1").id == first.id
    with pytest.raises(TypeError):
        store.transition_task("merge", first.id, {"succeeded"}, "failed", tenant="globex")
    ev = store.create_task("evaluation", EvaluationRecord(id=new_id("eval"), tenant="acme",
                                                          model="m", file_id="file-1"))
    assert [r.id for r in store.tasks_in_status("evaluation", "queued")] == [ev.id]
    page, more = store.list_tasks("evaluation", "acme", limit=1)
    assert [r.id for r in page] == [ev.id] and more is False
