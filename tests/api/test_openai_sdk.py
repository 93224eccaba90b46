"""The official `openai` SDK, unchanged, against lorapool on a live uvicorn (jobs stay queued:
the executor here runs nothing — the full run through Ray is tests/e2e)."""

from __future__ import annotations

import pytest

from .conftest import chat_lines


@pytest.fixture
def oa(env, live):
    import openai

    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=env.tokens["acme"], max_retries=0)


def test_files_and_jobs_through_the_openai_sdk(oa, env, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_lines(10))
    with open(path, "rb") as fh:
        f = oa.files.create(file=fh, purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == path.stat().st_size
    assert f.purpose == "fine-tune" and f.status == "processed"
    assert oa.files.retrieve(f.id).filename == "train.jsonl"
    assert f.id in [x.id for x in oa.files.list()]

    job = oa.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                     hyperparameters={"n_epochs": 2, "batch_size": 4},
                                     suffix="sdk", seed=11, metadata={"k": "v"},
                                     extra_body={"max_seq_len": 64, "lora": {"r": 2}})
    assert job.status == "queued" and job.hyperparameters.n_epochs == 2 and job.seed == 11
    assert env.executor.checked[-1].lora.r == 2 and env.executor.checked[-1].max_seq_len == 64

    got = oa.fine_tuning.jobs.retrieve(job.id)
    assert got.id == job.id and got.model == "tiny-llama" and got.metadata == {"k": "v"}

    second = oa.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    page = oa.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [second.id] and page.has_more
    assert [j.id for j in oa.fine_tuning.jobs.list(limit=1)] == [second.id, job.id]  # auto-pages

    events = oa.fine_tuning.jobs.list_events(job.id, limit=10)
    assert [e.message for e in events.data] == ["Job queued"]
    assert events.data[0].object == "fine_tuning.job.event"

    env.store.add_checkpoint(job.id, 2, env.artifacts.put_bytes(b"c"), {"train_loss": 0.7})
    ckpts = oa.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in ckpts.data] == [2]
    assert ckpts.data[0].metrics.train_loss == pytest.approx(0.7)

    cancelled = oa.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    import openai

    with pytest.raises(openai.ConflictError, match=second.id):  # still used by a queued job
        oa.files.delete(f.id)
    oa.fine_tuning.jobs.cancel(second.id)
    assert oa.files.delete(f.id).deleted
    import hashlib

    assert not env.artifacts.exists("sha256:" + hashlib.sha256(path.read_bytes()).hexdigest())


def test_openai_sdk_sees_typed_errors(oa, env):
    import openai

    with pytest.raises(openai.NotFoundError) as nf:
        oa.fine_tuning.jobs.retrieve("ftjob-nope")
    assert "ftjob-nope" in nf.value.message
    with pytest.raises(openai.BadRequestError) as br:
        oa.fine_tuning.jobs.create(model="gpt-4o-mini", training_file="file-x")
    assert br.value.param == "model" and "tiny-llama" in br.value.message
    bad_key = openai.OpenAI(base_url=str(oa.base_url), api_key="lp-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    assert "tiny-llama" in [m.id for m in oa.models.list()]
