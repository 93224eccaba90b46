"""Rate limit per API token and open event streams per tenant: 429s that say when to retry,
and the client honouring them."""

from __future__ import annotations

import time

import httpx
import pytest

from lorapool.service.api.limits import Limits, LimitSettings, TokenBuckets
from lorapool.service.store import JobRecord, new_id

from .conftest import chat_lines, error_of

JOBS = "/v1/fine_tuning/jobs"


def _limit(env, **settings) -> Limits:
    limits = Limits(LimitSettings(**settings))
    env.app.state.ctx.limits = limits
    return limits


# -- settings and the bucket itself -----------------------------------------------------------


def test_settings_from_env_and_clear_errors():
    s = LimitSettings.from_env({})
    assert (s.rate, s.burst, s.max_streams_per_tenant) == (20.0, 100, 64)
    s = LimitSettings.from_env({"LORAPOOL_RATE_LIMIT": "5,7",
                                "LORAPOOL_MAX_STREAMS_PER_TENANT": "3"})
    assert (s.rate, s.burst, s.max_streams_per_tenant) == (5.0, 7, 3)
    assert LimitSettings.from_env({"LORAPOOL_RATE_LIMIT": "4"}).burst == 20
    assert LimitSettings.from_env({"LORAPOOL_RATE_LIMIT": "off"}).rate == 0
    for var, bad in (("LORAPOOL_RATE_LIMIT", "fast"), ("LORAPOOL_RATE_LIMIT", "-1"),
                     ("LORAPOOL_RATE_LIMIT", "5,0"), ("LORAPOOL_MAX_STREAMS_PER_TENANT", "-2"),
                     ("LORAPOOL_MAX_STREAMS_PER_TENANT", "many")):
        with pytest.raises(ValueError, match=var):
            LimitSettings.from_env({var: bad})


def test_token_bucket_allows_the_burst_then_the_rate():
    b = TokenBuckets(rate=10, burst=3)
    assert [b.take("k", now=100.0) for _ in range(3)] == [None, None, None]
    wait = b.take("k", now=100.0)
    assert wait == pytest.approx(0.1)
    assert b.take("other", now=100.0) is None  # buckets are per key
    assert b.take("k", now=100.05) == pytest.approx(0.05)
    assert b.take("k", now=100.2) is None  # refilled at 10/s
    assert b.take("k", now=1000.0) is None  # and never beyond the burst:
    assert [b.take("k", now=1000.0) for _ in range(3)][-1] is not None


def test_bucket_memory_is_bounded():
    b = TokenBuckets(rate=1, burst=1, max_keys=50)
    for i in range(500):
        b.take(f"k{i}", now=0.0)
    assert len(b._buckets) == 50


# -- over HTTP --------------------------------------------------------------------------------


def test_rate_limit_per_token_answers_429_with_retry_after(client, env):
    # A slow refill (one token per 2 s) so that a loaded machine serving the first three
    # requests slowly cannot refill the bucket before the fourth.
    _limit(env, rate=0.5, burst=3)
    codes = [client.get("/v1/models").status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    r = client.get("/v1/models")
    assert r.status_code == 429
    err = error_of(r)
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert "0.5 requests per second" in err["message"] and "Retry after" in err["message"]
    assert int(r.headers["Retry-After"]) >= 1
    wait_ms = int(r.headers["retry-after-ms"])
    assert 0 < wait_ms <= 2000
    # Another tenant's token has its own bucket; a bad token is still a 401, not a 429.
    assert client.get("/v1/models", headers=env.headers("globex")).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    time.sleep(wait_ms / 1000 + 0.05)
    assert client.get("/v1/models").status_code == 200


def test_rate_limit_off(client, env):
    _limit(env, rate=0, burst=0)
    assert {client.get("/v1/models").status_code for _ in range(150)} == {200}


def test_the_client_retries_a_post_after_429_as_told(env, live, tmp_path):
    from lorapool import Client

    _limit(env, rate=0.5, burst=1)  # 2 s to refill: the upload surely comes before that
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_lines(4))
    with Client(live.url, api_key=env.tokens["acme"]) as c:
        c.models.list()  # spends the burst
        started = time.monotonic()
        uploaded = c.files.upload(path)  # a POST without idempotency key: refused, retried
        took = time.monotonic() - started
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(chat_lines(4))
    assert 0.3 <= took < 6  # it waited about the 2 s the server asked for
    assert len(env.store.list_files("acme")[0]) == 1  # made once


def _running_job(env, tenant="acme") -> str:
    job_id = new_id("ftjob")
    env.store.create_job(JobRecord(id=job_id, tenant=tenant, model="tiny-llama",
                                   status="running"))
    return job_id


def test_open_streams_per_tenant_are_limited(env, live):
    limits = _limit(env, rate=0, burst=0, max_streams_per_tenant=2)
    job_id = _running_job(env)
    other_job = _running_job(env, "globex")
    url = f"{JOBS}/{job_id}/events"
    with httpx.Client(base_url=live.url, headers=env.headers(), timeout=30) as http:
        first = http.send(http.build_request("GET", url, params={"stream": "true"}), stream=True)
        second = http.send(http.build_request("GET", url, params={"stream": "true"}), stream=True)
        assert (first.status_code, second.status_code) == (200, 200)
        r = http.get(url, params={"stream": "true"})
        assert r.status_code == 429
        err = error_of(r)
        assert err["code"] == "too_many_streams" and "limit is 2" in err["message"]
        assert "acme" in err["message"] and int(r.headers["Retry-After"]) >= 1
        # Listing events is not a stream; another tenant has its own allowance.
        assert http.get(url).status_code == 200
        with http.stream("GET", f"{JOBS}/{other_job}/events", params={"stream": "true"},
                         headers=env.headers("globex")) as g:
            assert g.status_code == 200
        first.close()
        deadline = time.monotonic() + 10
        while limits.streams.open("acme") > 1:  # the slot comes back when the stream ends
            assert time.monotonic() < deadline, "the closed stream's slot was not given back"
            time.sleep(0.02)
        with http.stream("GET", url, params={"stream": "true"}) as third:
            assert third.status_code == 200
        second.close()
    deadline = time.monotonic() + 10
    while limits.streams.open("acme") or limits.streams.open("globex"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
