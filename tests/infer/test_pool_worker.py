"""The pool's InferenceWorker driven in this process (no Ray cluster, no NodeAgent): the memory
it reserves before, during and after a load, after an LRU eviction and a failed load, and what a
reader leaving mid-reply (the worker's cancel, or the generator closed as `ray.cancel` does)
leaves behind: nothing in flight, the base free for the next request.

The Ray side of the same (backpressure, `ray.cancel` across processes, the NodeAgent's report)
is in tests/e2e/test_chat_pool.py.
"""

from __future__ import annotations

import pytest

from lorapool.service.pool import inference
from lorapool.service.pool.inference import (
    CPU_LOAD_FACTOR,
    HEADROOM_BYTES,
    HEADROOM_RATIO,
    InferenceWorker,
)
from lorapool.service.pool.transfer import read_folder

MESSAGES = [{"role": "user", "content": "tell me a long story"}]


def _want(nbytes: int) -> int:
    return int(nbytes * (1 + HEADROOM_RATIO)) + HEADROOM_BYTES


@pytest.fixture()
def worker(tmp_path):
    w = InferenceWorker("here", None, max_models=1)
    w.work_dir = tmp_path / "node"
    return w


@pytest.fixture(scope="module")
def files(tiny):
    return read_folder(tiny["model"])


def _request(files, key="tiny-a", max_tokens=8, request_id="r1", model_bytes=1000):
    return {"request_id": request_id, "model": {"key": key, "files": files, "entry": None},
            "model_bytes": model_bytes, "adapter": None, "messages": MESSAGES,
            "params": {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0,
                       "stop": [], "seed": None}}


def _spy_loads(monkeypatch, worker, fail=False):
    """Wrap the real loader to record what the worker had reserved while it ran."""
    import lorapool.service.infer as infer

    real = infer.load_for_inference
    seen = []

    def load(*args, **kwargs):
        seen.append(worker._reserved)
        if fail:
            raise OSError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "load_for_inference", load)
    return seen


def test_memory_is_reserved_before_the_load_then_measured(monkeypatch, worker, files):
    seen = _spy_loads(monkeypatch, worker)
    out = list(worker.generate(_request(files, model_bytes=10 * 1024**2)))
    assert out[0]["ready"] and out[-1]["finish_reason"], out
    # While loading: the estimate (file size × the CPU factor), nothing loaded yet.
    assert seen == [_want(int(10 * 1024**2 * CPU_LOAD_FACTOR))]
    held = worker.engine.cache.total_bytes
    assert held > 0
    state = worker.loaded()
    assert state["reserved"] == _want(held) and state["loading"] == 0
    assert state["active"] == 0


def test_eviction_gives_the_evicted_base_back(monkeypatch, worker, files):
    _spy_loads(monkeypatch, worker)
    list(worker.generate(_request(files, key="tiny-a")))
    one = worker.engine.cache.total_bytes
    list(worker.generate(_request(files, key="tiny-b")))  # max_models=1: tiny-a goes
    assert worker.engine.cache.keys() == ["tiny-b"]
    assert worker.loaded()["reserved"] == _want(one)  # one base's worth, not two
    worker.request_stop("owner back")
    assert worker.loaded()["reserved"] == 0 and worker.loaded()["bases"] == []


def test_a_failed_load_reserves_nothing_after(monkeypatch, worker, files):
    seen = _spy_loads(monkeypatch, worker, fail=True)
    out = list(worker.generate(_request(files)))
    assert len(out) == 1 and out[0]["error"]["status"] == 500, out
    assert seen and seen[0] > 0  # it was reserved while it tried
    state = worker.loaded()
    assert state["reserved"] == 0 and state["loading"] == 0 and state["active"] == 0


def test_cancel_mid_reply_frees_the_worker(worker, files):
    gen = worker.generate(_request(files, max_tokens=4000, request_id="long"))
    assert next(gen)["ready"]
    next(gen)
    assert worker.loaded()["active"] == 1 and worker.loaded()["yielded"]["long"] >= 1
    worker.cancel("long")
    rest = list(gen)
    assert len(rest) <= 1 and not any(c.get("finish_reason") for c in rest)
    assert worker.loaded()["active"] == 0 and worker.cancelled == 1
    assert list(worker.generate(_request(files)))[-1]["finish_reason"]  # the base is free


def test_generator_closed_mid_reply_frees_the_worker(worker, files):
    """`ray.cancel` on the streaming generator closes it on the node at a yield."""
    gen = worker.generate(_request(files, max_tokens=4000, request_id="long"))
    next(gen)
    next(gen)
    gen.close()
    assert worker.loaded()["active"] == 0 and worker.cancelled == 1
    base = worker.engine.cache.get("tiny-a", lambda: pytest.fail("must be loaded"))
    assert base.lock.acquire(blocking=False)  # engine.run let go of the base
    base.lock.release()
    assert list(worker.generate(_request(files)))[-1]["finish_reason"]


def test_not_accepting_answers_503_and_loads_nothing(monkeypatch, worker, files):
    seen = _spy_loads(monkeypatch, worker)
    monkeypatch.setattr(worker, "_reserve", lambda: False)  # what a reclaimed agent answers
    out = list(worker.generate(_request(files)))
    assert out == [inference._error(503, "no_capacity", out[0]["error"]["message"])]
    assert "reclaimed" in out[0]["error"]["message"]
    assert seen == [] and worker.engine.cache.keys() == []
