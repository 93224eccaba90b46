"""Chat as pool work, end to end on a real local Ray head with a NodeAgent and real HTTP
(uvicorn on loopback), base models only (no training):

- a slow reader keeps the node only a few chunks ahead (Ray's generator backpressure); without
  it the same node runs far ahead;
- a reader leaving (`InferenceStream.cancel`, an HTTP client disconnecting) stops the
  generation on the node: nothing stays in flight, the next request is served;
- a tenant's in-flight chats are bounded (429 with Retry-After), other tenants are not held up,
  and they count toward its fair share of the pool (the scheduler's `tenant_load`);
- the inference worker's bases are reserved in the NodeAgent's report like a job's memory,
  given back when the LRU evicts one, and take no CPU slot from training.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

GiB = 1024**3
LONG = {"model": "tiny-a", "stream": True, "max_tokens": 4000, "temperature": 0,
        "messages": [{"role": "user", "content": "tell me a long story"}]}
PARAMS = {"max_tokens": 4000, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from lorapool.service.admin import add_model, create_token
    from lorapool.service.config import Settings
    from lorapool.service.server import Service, free_port
    from lorapool.service.train.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("chat-pool")
    settings = Settings.from_env(data_dir=root / "data", host="127.0.0.1", port=free_port())
    for seed, name in enumerate(("tiny-a", "tiny-b", "tiny-c")):
        add_model(settings, name, make_tiny_llama(root / name, seed=seed))
    tokens = {t: create_token(settings, t) for t in ("acme", "globex")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPOOL_MAX_CHATS_PER_TENANT", "1")
        svc = Service(
            settings,
            local_node_options={"name": "local-cpu", "cpu_only": True, "cpu_memory": 8 * GiB,
                                "cpu_slots": 1, "work_dir": str(root / "node-local")},
            ray_init_options={"num_cpus": 2},
        )
        svc.start()
    try:
        yield {"svc": svc, "tokens": tokens}
    finally:
        svc.stop()


def _headers(service, tenant="acme"):
    return {"Authorization": f"Bearer {service['tokens'][tenant]}"}


def _chat(service, tenant="acme", model="tiny-a", max_tokens=2, timeout=120):
    import httpx

    return httpx.post(service["svc"].base_url + "/v1/chat/completions",
                      headers=_headers(service, tenant), timeout=timeout,
                      json={"model": model, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": "hi"}]})


def _served(service, tenant="acme", model="tiny-a", within=15.0):
    """The next request of `tenant`, retried only while its last slot is still being freed."""
    deadline = time.time() + within
    while True:
        r = _chat(service, tenant, model)
        if r.status_code != 429 or time.time() > deadline:
            return r
        time.sleep(0.2)


def _worker():
    import ray

    from lorapool.service.pool.inference import WORKER_PREFIX

    return ray.get_actor(WORKER_PREFIX + "local-cpu", namespace="lorapool")


def _idle(worker, within=15.0):
    import ray

    deadline = time.time() + within
    while time.time() < deadline and ray.get(worker.loaded.remote())["active"]:
        time.sleep(0.2)
    return ray.get(worker.loaded.remote())


def _ahead_after_one_read(service, stream_buffer):
    """Chunks the node produced while the reader took one and then paused for 2 s."""
    import ray

    from lorapool.service.pool.inference import InferencePool

    svc = service["svc"]
    assert _chat(service).status_code == 200  # the worker exists and tiny-a is loaded
    pool = InferencePool(svc.artifacts, svc.tasks.models, stream_buffer=stream_buffer)
    stream = pool.start(svc.store.get_model("tiny-a"), None, params=PARAMS,
                        messages=LONG["messages"])
    assert stream.first.get("ready"), stream.first
    next(iter(stream))
    time.sleep(2.0)
    worker = _worker()
    ahead = ray.get(worker.loaded.remote())["yielded"][stream._request_id]
    before = ray.get(worker.loaded.remote())["cancelled"]
    stream.cancel()
    state = _idle(worker)
    assert state["active"] == 0, state
    assert state["cancelled"] == before + 1, state
    return ahead


def test_a_slow_reader_keeps_the_node_a_few_chunks_ahead(service):
    buffered = _ahead_after_one_read(service, stream_buffer=2)
    unbuffered = _ahead_after_one_read(service, stream_buffer=-1)  # Ray's backpressure off
    assert buffered <= 2 + 2, buffered  # the one read, the buffer, one blocked in its yield
    assert unbuffered > 5 * buffered, (unbuffered, buffered)  # the check can tell them apart
    assert _chat(service).status_code == 200  # the base is free again


def test_http_client_leaving_mid_stream_frees_the_worker(service):
    import httpx
    import ray

    assert _chat(service).status_code == 200
    worker = _worker()
    before = ray.get(worker.loaded.remote())["cancelled"]
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", service["svc"].base_url + "/v1/chat/completions",
                         json=LONG, headers=_headers(service)) as r:
            assert r.status_code == 200
            assert next(line for line in r.iter_lines() if '"content"' in line)
    state = _idle(worker)
    assert state["active"] == 0, state
    assert state["cancelled"] == before + 1, state  # stopped, not run on to max_tokens
    # The tenant's only slot (LORAPOOL_MAX_CHATS_PER_TENANT=1) came back, the base is free.
    assert _served(service).status_code == 200


def test_a_tenant_has_a_bounded_number_of_chats_in_flight(service):
    import httpx

    assert _chat(service).status_code == 200
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", service["svc"].base_url + "/v1/chat/completions",
                         json=LONG, headers=_headers(service)) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            assert next(line for line in lines if '"content"' in line)
            # The open chat counts toward acme's fair share of the pool, like a running job.
            assert service["svc"].executor.tenant_load().get("acme") == 1
            refused = _chat(service)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "too_many_chats"
            assert int(refused.headers["Retry-After"]) >= 1
            assert "limit is 1" in refused.json()["error"]["message"]
            # Another tenant is not held up (on another base: one generation per base).
            assert _chat(service, "globex", model="tiny-b").status_code == 200
    assert _served(service).status_code == 200


def test_loaded_bases_are_reserved_like_jobs_and_evictions_give_back(service):
    import ray

    from lorapool.service.pool.agent import list_agents
    from lorapool.service.pool.inference import HEADROOM_BYTES, HEADROOM_RATIO, WORKER_PREFIX

    for model in ("tiny-a", "tiny-b", "tiny-c"):  # two bases per node: tiny-a goes
        assert _served(service, model=model).status_code == 200
    worker = _worker()
    held = ray.get(worker.loaded.remote())
    store = service["svc"].store
    assert held["bases"] == [store.get_model(m).sha256 for m in ("tiny-b", "tiny-c")]
    want = int(held["bytes"] * (1 + HEADROOM_RATIO)) + HEADROOM_BYTES
    agent = list_agents()["local-cpu"]
    report = ray.get(agent.report.remote())
    assert WORKER_PREFIX + "local-cpu" in report["jobs"]
    assert report["reserved_memory"] == held["reserved"] == want
    assert report["free_memory"] <= 8 * GiB - want  # what placement sees as free
    # Memory, not a CPU slot: the node's one slot (cpu_slots=1) still takes a training job.
    assert ray.get(agent.register_job.remote("ftjob-probe-1", worker, 1))
    try:
        assert not ray.get(agent.register_job.remote("ftjob-probe-2", worker, 1))
    finally:
        ray.get(agent.unregister_job.remote("ftjob-probe-1"))
        ray.get(agent.unregister_job.remote("ftjob-probe-2"))
