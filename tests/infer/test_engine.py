"""service/infer on the tiny random Llama: stop strings, seeds, the base LRU, adapter swaps."""

from __future__ import annotations

import pytest
import torch

from lorapool.service.infer import (
    AdapterSource,
    BaseCache,
    InferenceEngine,
    InvalidRequest,
    SamplingParams,
    load_for_inference,
)
from lorapool.service.infer.errors import AdapterRefused

MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def engine(tiny):
    eng = InferenceEngine(max_models=2)
    eng.load = lambda: load_for_inference(tiny["model"], device="cpu")
    return eng


def _reply(engine, params, adapter=None, messages=MESSAGES, stream=False):
    job = engine.prepare("tiny", engine.load, params=params, adapter=adapter,
                         messages=messages)
    if stream:
        chunks = list(engine.run(job))
        return "".join(c.text for c in chunks), chunks[-1], chunks
    text, last = engine.complete(job)
    return text, last, None


def test_greedy_usage_and_length(engine):
    text, last, chunks = _reply(engine, SamplingParams(max_tokens=12, temperature=0),
                                stream=True)
    assert last.usage.completion_tokens <= 12
    assert last.usage.prompt_tokens > len("hello there")  # the template's tokens count too
    if last.finish_reason == "length":
        assert last.usage.completion_tokens == 12
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    again, _, _ = _reply(engine, SamplingParams(max_tokens=12, temperature=0))
    assert again == text, "greedy decoding is deterministic, streamed or not"


def test_stop_string_is_cut_exactly(engine):
    full, _, _ = _reply(engine, SamplingParams(max_tokens=24, temperature=0))
    assert len(full) >= 6, f"the tiny model's reply is too short to test: {full!r}"
    stop = full[4:6]
    expected = full[:full.find(stop)]
    for stream in (False, True):
        text, last, _ = _reply(engine, SamplingParams(max_tokens=24, temperature=0,
                                                      stop=("\x00never", stop)), stream=stream)
        assert text == expected and last.finish_reason == "stop"
        assert stop not in text


def test_seed_gives_the_same_sample_and_another_seed_another(engine):
    p = dict(max_tokens=20, temperature=1.0, top_p=0.95)
    one, _, _ = _reply(engine, SamplingParams(seed=7, **p))
    two, _, _ = _reply(engine, SamplingParams(seed=7, **p), stream=True)
    other, _, _ = _reply(engine, SamplingParams(seed=8, **p))
    assert one == two
    assert one != other


def test_adapter_swap_changes_output_and_swapping_back_restores_it(engine, tiny):
    greedy = SamplingParams(max_tokens=16, temperature=0)
    a, b = AdapterSource("ad-a", tiny["a"]), AdapterSource("ad-b", tiny["b"])
    base, _, _ = _reply(engine, greedy)
    with_a, _, _ = _reply(engine, greedy, adapter=a)
    with_b, _, _ = _reply(engine, greedy, adapter=b)
    assert len({base, with_a, with_b}) == 3, (base, with_a, with_b)
    assert _reply(engine, greedy, adapter=a)[0] == with_a
    assert _reply(engine, greedy)[0] == base
    entry = engine.cache.get("tiny", engine.load)
    assert list(entry.adapters) == [b.name, a.name]  # both stay attached, a used last


def test_adapter_matches_plain_peft(engine, tiny):
    """The swapped-in adapter computes what peft's own loading does (first token's logits)."""
    from peft import PeftModel

    model, tok = load_for_inference(tiny["model"], device="cpu")
    ref = PeftModel.from_pretrained(model, tiny["b"]).eval()
    job = engine.prepare("tiny", engine.load, params=SamplingParams(max_tokens=1),
                         adapter=AdapterSource("ad-b", tiny["b"]), messages=MESSAGES)
    ids = torch.tensor([job.prompt_ids])
    with torch.no_grad(), job.base.lock, job.base.select(job.adapter):
        got = job.base.model(input_ids=ids).logits
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(got, want)


def test_pickle_adapter_refused(engine, tiny, tmp_path):
    import shutil

    bad = shutil.copytree(tiny["a"], tmp_path / "bad")
    (bad / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(AdapterRefused, match="pickle"):
        _reply(engine, SamplingParams(max_tokens=2), adapter=AdapterSource("bad", bad))
    (bad / "adapter_model.bin").unlink()
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterRefused, match="safetensors"):
        _reply(engine, SamplingParams(max_tokens=2), adapter=AdapterSource("bad2", bad))


def test_lru_evicts_by_count_and_by_bytes():
    loads = []

    def loader(n):
        def load():
            loads.append(n)
            return torch.nn.Linear(n, n, bias=False), None
        return load

    cache = BaseCache(max_models=2)
    cache.get("x", loader(4))
    cache.get("y", loader(4))
    cache.get("x", loader(4))  # x is now the most recent
    cache.get("z", loader(4))
    assert cache.keys() == ["x", "z"] and loads == [4, 4, 4]
    cache.get("y", loader(4))  # y was evicted: loaded again
    assert len(loads) == 4 and cache.keys() == ["z", "y"]

    by_bytes = BaseCache(max_models=10, max_bytes=3 * 64 * 4)  # three 8x8 fp32 linears
    for key in "abcd":
        by_bytes.get(key, loader(8))
    assert by_bytes.keys() == ["b", "c", "d"] and by_bytes.total_bytes == 3 * 256
    by_bytes.get("big", loader(32))  # alone over the limit: it stays, everything else goes
    assert by_bytes.keys() == ["big"]


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=10**6), "max_tokens"),
    (dict(temperature=2.5), "temperature"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(stop=("a", "b", "c", "d", "e")), "stop"),
    (dict(stop=("",)), "stop"), (dict(seed="x"), "seed"),
])
def test_params_name_the_bad_field(kwargs, param):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


@pytest.mark.parametrize("messages, param", [
    ([], "messages"), ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"), ("hi", "messages"),
])
def test_bad_messages_name_the_message(engine, messages, param):
    with pytest.raises(InvalidRequest) as err:
        _reply(engine, SamplingParams(max_tokens=2), messages=messages)
    assert err.value.param == param
