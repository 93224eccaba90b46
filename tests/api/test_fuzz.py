"""Property-based tests: no input reaches a 500, and every refusal has the error JSON shape.

Hypothesis generates training files (valid and broken records of all three formats, deep
nesting, odd unicode, wrong types, raw bytes, BOM/CRLF/NUL, huge numbers) and job-request
bodies (plausible and absurd values for every field, unknown keys, non-JSON bodies). Each
validator is run directly and over HTTP (the real app through Starlette's TestClient, a real
SQLite file and artifact folder), at least 500 examples each. The app is built once per module
(hypothesis reruns one test body many times; a fixture per example would be slow).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import chat_lines, error_of, make_env, upload

N = 500
FUZZ = settings(max_examples=N, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory, tiny_model_dir) -> Any:
    e = make_env(tmp_path_factory.mktemp("fuzz"), tiny_model_dir)
    yield e
    e.store.close()


@pytest.fixture(scope="module")
def fuzz_client(fuzz_env) -> Any:
    from fastapi.testclient import TestClient

    # raise_server_exceptions=False: a 500 must show up as a status to assert on, not as the
    # exception re-raised into the test (which would also hide the error body).
    with TestClient(fuzz_env.app, raise_server_exceptions=False) as c:
        c.headers.update(fuzz_env.headers("acme"))
        yield c


@pytest.fixture(scope="module")
def file_id(fuzz_client) -> str:
    r = upload(fuzz_client, chat_lines(4))
    assert r.status_code == 200, r.text
    return r.json()["id"]


def assert_4xx_shape(resp: Any) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    err = error_of(resp)
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)


# -- strategies: training files ----------------------------------------------------------------
_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
            | st.text(max_size=20))
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=3),
    max_leaves=8,
)
texts = st.text(max_size=30) | st.sampled_from(["", " ", "\u202e", "\ud800", "\x00", "é" * 5])
roles = st.sampled_from(["system", "user", "assistant", "tool", "bot", "", "ASSISTANT"])


def _maybe(value: st.SearchStrategy) -> st.SearchStrategy:
    # Mostly the right type, sometimes any JSON value (a wrong type).
    return st.one_of(value, value, value, value, value, json_values)


messages = st.lists(
    st.fixed_dictionaries({"role": _maybe(roles), "content": _maybe(texts)},
                          optional={"weight": st.sampled_from([0, 1, 2, True, "1", 0.5]),
                                    "name": texts}),
    max_size=4)
records = st.one_of(
    st.fixed_dictionaries({"messages": _maybe(messages)}),
    st.fixed_dictionaries({}, optional={"prompt": _maybe(texts), "completion": _maybe(texts)}),
    st.fixed_dictionaries({"text": _maybe(texts)}),
    st.fixed_dictionaries({"text": texts, "prompt": texts}),  # ambiguous
    json_values,
)


@st.composite
def jsonl_line(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["record"] * 6 + ["deep", "raw", "number", "mangled", "blank"]))
    if kind == "record":
        return json.dumps(draw(records), ensure_ascii=draw(st.booleans())).encode(
            "utf-8", "surrogatepass")
    if kind == "deep":
        n = draw(st.sampled_from([63, 64, 65, 200, 5_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"x":', "}]")]))
        closed = draw(st.booleans())
        return (f'{{"text": {opener * n}1{closer * n if closed else ""}}}').encode()
    if kind == "raw":
        return draw(st.binary(max_size=40)).replace(b"\n", b"")
    if kind == "number":
        num = draw(st.sampled_from(["NaN", "-Infinity", "1e999", "9" * 5000, "-0", "1e-999"]))
        return f'{{"text": {num}}}'.encode()
    if kind == "mangled":
        good = json.dumps(draw(records)).encode("utf-8", "surrogatepass")
        cut = draw(st.integers(0, len(good)))
        return good[:cut] + draw(st.sampled_from([b"", b"\x00", b"\xff", b'"', b"]]]"]))
    return b"   "


good_text = st.text(min_size=1, max_size=30).filter(lambda t: t.strip())
valid_records = {
    "chat": st.builds(
        lambda pre, answer: {"messages": pre + [{"role": "assistant", "content": answer}]},
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "tool"]),
                                        "content": st.text(max_size=30)}), max_size=3),
        good_text),
    "prompt_completion": st.fixed_dictionaries({"prompt": st.text(max_size=30),
                                                "completion": good_text}),
    "text": st.fixed_dictionaries({"text": good_text}),
}


@st.composite
def jsonl_body(draw: Any) -> bytes:
    if draw(st.booleans()):
        # A file of one valid format, perhaps with one broken line among its lines: exercises
        # the accepting path and the per-line errors of an otherwise good file.
        fmt = draw(st.sampled_from(sorted(valid_records)))
        lines = [json.dumps(r, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
                 for r in draw(st.lists(valid_records[fmt], min_size=1, max_size=4))]
        if draw(st.booleans()):
            lines.insert(draw(st.integers(0, len(lines))), draw(jsonl_line()))
    else:
        lines = draw(st.lists(jsonl_line(), min_size=0, max_size=5))
    sep = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = sep.join(lines) + draw(st.sampled_from([b"", sep]))
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body
    return body


# -- the upload validator -------------------------------------------------------------------------
@FUZZ
@given(body=jsonl_body())
def test_dataset_validator_only_reports_or_accepts(body: bytes) -> None:
    from lorapool.service.train.data_validate import DatasetReport, validate_dataset
    from lorapool.service.train.errors import DataError

    try:
        report = validate_dataset(body)
    except DataError as exc:
        # Every reported problem names its line.
        assert all(e.line >= 1 and e.reason for e in exc.errors)
    else:
        assert isinstance(report, DatasetReport) and report.n_examples >= 1


@FUZZ
@given(body=jsonl_body())
def test_upload_endpoint_never_5xx(fuzz_client, body: bytes) -> None:
    resp = upload(fuzz_client, body)
    if resp.status_code == 200:
        assert resp.json()["object"] == "file"
    else:
        assert_4xx_shape(resp)
        assert error_of(resp)["param"] == "file"


@FUZZ
@given(value=json_values, extra=st.text(alphabet='[]{}"\\:,a ', max_size=30))
def test_depth_prescan_matches_the_parser(value: Any, extra: str) -> None:
    """The cheap pre-scan counts exactly what json.loads recurses into: strings full of
    brackets and escaped quotes never count, so no valid record is wrongly refused."""
    from lorapool.service.train.data_validate import nests_deeper_than, scan_depth

    def depth(v: Any) -> int:
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 0

    wrapped = {"text": extra, "v": value}  # `extra` lands inside a string
    raw = json.dumps(wrapped).encode("utf-8", "surrogatepass")
    assert scan_depth(raw) == depth(wrapped)
    for limit in (0, depth(wrapped) - 1, depth(wrapped), 64):  # the fast path agrees
        assert nests_deeper_than(raw, limit) == (depth(wrapped) > limit)


def test_nested_array_upload_is_a_400_naming_line_and_limit(fuzz_client, fuzz_env) -> None:
    """Issue 12, point 3: one line nesting 100,000 arrays was a 500 (RecursionError)."""
    nested = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    body = chat_lines(2) + nested + b"\n"
    resp = upload(fuzz_client, body)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == "file"
    assert "line 3: arrays/objects nest deeper than 64 levels" in err["message"]
    assert not fuzz_env.tmp_files()


@pytest.mark.parametrize("line, reason", [
    (b'{"text": NaN}', "NaN is not a JSON number"),
    (b'{"text": 1e999}', "too large for a float"),
    (b'{"text": ' + b"9" * 5000 + b"}", "a number is too large"),
    (b'{"text": "a\x00b"}', "NUL byte at position 11"),
    (b'{"text": "\xff"}', "not valid UTF-8"),
    (b'{"text": "\\ud800"}', "lone surrogate"),
], ids=["nan", "inf", "digits", "nul", "utf8", "surrogate"])
def test_odd_lines_are_named(fuzz_client, line: bytes, reason: str) -> None:
    resp = upload(fuzz_client, b'\xef\xbb\xbf{"text": "ok"}\r\n' + line + b"\r\n")
    assert resp.status_code == 400, resp.text
    assert "line 2: " in error_of(resp)["message"] and reason in error_of(resp)["message"]


def test_overlong_line_is_refused_without_holding_it(fuzz_client) -> None:
    from lorapool.service.train.data_validate import MAX_LINE_BYTES

    line = b'{"text": "' + b"a" * (MAX_LINE_BYTES + 10) + b'"}'
    resp = upload(fuzz_client, b'{"text": "ok"}\n' + line + b"\n")
    assert resp.status_code == 400, resp.text
    assert f"line 2: line is {len(line)} bytes long" in error_of(resp)["message"]


# -- the job request --------------------------------------------------------------------------
ints = st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, 2, 4, 8, 64, 1024, 32768])
nums = ints | st.floats(allow_nan=True) | st.sampled_from([1e-5, 0.5, 1.0, 2e-4])
auto = st.just("auto")
hyper = st.fixed_dictionaries({}, optional={
    "n_epochs": st.one_of(auto, ints, json_values),
    "batch_size": st.one_of(auto, ints, json_values),
    "learning_rate_multiplier": st.one_of(auto, nums, json_values),
    "bogus": json_values,
})
lora = st.fixed_dictionaries({}, optional={
    "r": _maybe(ints), "alpha": _maybe(nums), "dropout": _maybe(nums),
    "target_modules": st.one_of(st.just("all-linear"), st.lists(texts, max_size=3), json_values),
    "use_rslora": _maybe(st.booleans()), "use_dora": _maybe(st.booleans()),
})
placement = st.fixed_dictionaries({}, optional={
    "node": _maybe(texts), "labels": _maybe(st.dictionaries(texts, texts, max_size=2)),
    "min_memory_gib": _maybe(nums), "require_bf16": _maybe(st.booleans()),
    "priority": _maybe(ints), "min_seq_len": _maybe(ints), "allow_autofit": st.booleans(),
})


@st.composite
def job_body(draw: Any, file_id: str) -> dict[str, Any]:
    fields: dict[str, st.SearchStrategy] = {
        "training_file": st.one_of(st.just(file_id), st.just(file_id), texts, json_values),
        "validation_file": st.one_of(st.just(file_id), texts, json_values),
        "dataset": st.one_of(texts, st.dictionaries(texts, texts, max_size=2), json_values),
        "init_adapter": _maybe(texts),
        "hyperparameters": _maybe(hyper),
        "method": _maybe(st.fixed_dictionaries(
            {"type": st.sampled_from(["supervised", "dpo", 1])},
            optional={"supervised": _maybe(st.fixed_dictionaries(
                {}, optional={"hyperparameters": _maybe(hyper)}))})),
        "suffix": _maybe(texts),
        "seed": _maybe(ints),
        "metadata": _maybe(st.dictionaries(texts, texts, max_size=20)),
        "integrations": _maybe(st.lists(json_values, max_size=2)),
        "lora": _maybe(lora),
        "quantization": _maybe(st.sampled_from(["nf4", "fp4", "int8", "none", "q2"])),
        "max_seq_len": _maybe(ints),
        "micro_batch_size": _maybe(ints),
        "learning_rate": _maybe(nums),
        "checkpoint_every": _maybe(ints),
        "placement": _maybe(placement),
        "unknown_field": json_values,
    }
    odd_model = st.sampled_from(["", "x" * 200, "tiny-llama "]) | texts | json_values
    body: dict[str, Any] = {"model": draw(odd_model) if draw(st.integers(0, 9)) == 0
                            else "tiny-llama"}
    if draw(st.integers(0, 3)):
        body["training_file"] = file_id
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True))
    for name in chosen:
        body[name] = draw(fields[name])
    return body


def _encode(body: Any) -> bytes:
    # allow_nan: the bodies really carry NaN/Infinity, which Python's json (and so FastAPI)
    # accepts; surrogatepass: lone surrogates as raw bytes, which the server must refuse.
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@FUZZ
@given(data=st.data())
def test_job_request_parsing_only_raises_400s(fuzz_env, file_id, data: Any) -> None:
    from pydantic import ValidationError

    from lorapool.service.api.errors import APIError, from_pydantic
    from lorapool.service.api.job_request import CreateJobRequest, resolve

    body = data.draw(job_body(file_id))
    try:
        req = CreateJobRequest.model_validate(body)
        spec, hyper = resolve(req, fuzz_env.store.get_model("tiny-llama"))
    except ValidationError as exc:
        err = from_pydantic(exc)
        assert err.status == 400 and err.message
    except APIError as exc:
        assert 400 <= exc.status < 500
    else:
        assert spec.batch_size % spec.micro_batch_size == 0
        assert math.isfinite(spec.learning_rate) and spec.learning_rate > 0
        assert hyper["n_epochs"] == spec.n_epochs


@FUZZ
@given(data=st.data())
def test_create_job_endpoint_never_5xx(fuzz_client, file_id, data: Any) -> None:
    kind = data.draw(st.sampled_from(["json"] * 8 + ["raw", "deep"]))
    if kind == "json":
        content = _encode(data.draw(job_body(file_id)))
    elif kind == "raw":
        content = data.draw(st.binary(max_size=60))
    else:
        n = data.draw(st.sampled_from([31, 32, 33, 1000]))
        content = b'{"model": "tiny-llama", "metadata": ' + b"[" * n + b"]" * n + b"}"
    resp = fuzz_client.post("/v1/fine_tuning/jobs", content=content,
                            headers={"Content-Type": "application/json"})
    if resp.status_code == 200:
        assert resp.json()["object"] == "fine_tuning.job"
    else:
        assert_4xx_shape(resp)


def test_deeply_nested_job_body_is_a_400_naming_field_and_limit(fuzz_client) -> None:
    content = (b'{"model": "tiny-llama", "integrations": ' + b"[" * 100_000 + b"]" * 100_000
               + b"}")
    resp = fuzz_client.post("/v1/fine_tuning/jobs", content=content,
                            headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == "integrations" and err["code"] == "nesting_too_deep"
    assert "deeper than 32 levels" in err["message"]


def test_oversize_json_body_is_a_413_naming_the_limit(fuzz_client) -> None:
    from lorapool.service.api.body_limits import MAX_JSON_BODY_BYTES

    content = b'{"model": "' + b"x" * MAX_JSON_BODY_BYTES + b'"}'
    for headers in ({}, {"Transfer-Encoding": "chunked"}):
        # The second sends no Content-Length: the limit holds while the body streams in.
        body: Any = content if not headers else iter([content[:1000], content[1000:]])
        resp = fuzz_client.post("/v1/fine_tuning/jobs", content=body,
                                headers={"Content-Type": "application/json", **headers})
        assert resp.status_code == 413, resp.text
        assert str(MAX_JSON_BODY_BYTES) in error_of(resp)["message"]


def test_huge_integer_in_job_body_is_a_400(fuzz_client) -> None:
    resp = fuzz_client.post("/v1/fine_tuning/jobs",
                            content=b'{"model": "tiny-llama", "seed": 1' + b"0" * 5000 + b"}",
                            headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["code"] == "invalid_json"


def test_multipart_with_too_many_parts_or_a_huge_header_is_a_400(fuzz_client, fuzz_env):
    from lorapool.service.api.upload import MAX_PARTS

    boundary = "b0undary"

    def form(parts: list[tuple[str, bytes]]) -> bytes:
        out = b""
        for disposition, data in parts:
            out += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").encode()
            out += data + b"\r\n"
        return out + f"--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    many = [(f'form-data; name="x{i}"', b"v") for i in range(MAX_PARTS + 1)]
    resp = fuzz_client.post("/v1/files", content=form(many), headers=headers)
    assert resp.status_code == 400 and f"limit is {MAX_PARTS}" in error_of(resp)["message"]
    long_name = "a" * (1024 * 1024)  # a part header of 1 MiB is never buffered whole
    resp = fuzz_client.post("/v1/files", headers=headers, content=form(
        [(f'form-data; name="file"; filename="{long_name}"', b'{"text": "x"}')]))
    assert resp.status_code == 400 and "header size" in error_of(resp)["message"]
    assert not fuzz_env.tmp_files()
