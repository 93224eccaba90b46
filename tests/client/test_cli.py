"""The `lorapool` CLI through typer's CliRunner, its client commands against the real test
server (conftest.py), and its server-side commands' install hint."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
from typer.testing import CliRunner

from lorapool.cli import app

API_KEY = "sk-test-good"
JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def run(server, monkeypatch):
    monkeypatch.setenv("LORAPOOL_BASE_URL", server.base_url)
    monkeypatch.setenv("LORAPOOL_API_KEY", API_KEY)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "lorapool.cli", "--help"], capture_output=True,
                         text=True, timeout=60, env={"COLUMNS": "200", "PATH": ""})
    assert out.returncode == 0, out.stderr
    for cmd in ("serve", "token", "models", "submit", "jobs", "logs", "download", "nodes",
                "demo"):
        assert f" {cmd} " in out.stdout, cmd


def test_help_does_not_show_the_api_key(monkeypatch):
    monkeypatch.setenv("LORAPOOL_API_KEY", "sk-secret-value")
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "sk-secret-value" not in result.output
    assert "LORAPOOL_API_KEY" in result.output


def test_jobs_list_and_get(run, server):
    a = server.state.make_job(status="running", step=2)
    result = run("jobs", "list")
    assert result.exit_code == 0, result.output
    assert a["id"] in result.stdout and "running" in result.stdout and "2/4" in result.stdout
    got = run("jobs", "get", a["id"])
    assert json.loads(got.stdout)["id"] == a["id"]


def test_client_error_is_one_red_line_exit_1(run, server):
    result = run("jobs", "get", "ftjob-missing")
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "404" in lines[0] and "ftjob-missing" in lines[0] and "Traceback" not in lines[0]


def test_wrong_key_from_flag_is_an_auth_error(run):
    result = run("--api-key", "sk-wrong", "nodes")
    assert result.exit_code == 1 and "401" in result.stderr


def test_submit_with_config_and_flags(run, server, tmp_path, train_file):
    spec = tmp_path / "spec" / "job.yaml"
    spec.parent.mkdir()
    (spec.parent / "data.jsonl").write_text(train_file.read_text())
    spec.write_text("model: tiny\ntraining_file: data.jsonl\nn_epochs: 2\n"
                    "lora: {r: 8, alpha: 16}\nmetadata: {team: nlp}\n")
    result = run("submit", "--config", str(spec), "--lora-r", "4", "--seed", "9",
                 "--metadata", "run=a")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    body = server.state.jobs[job_id]["request_body"]
    assert server.state.uploads[body["training_file"]] == train_file.read_bytes()
    assert body["hyperparameters"] == {"n_epochs": 2} and body["seed"] == 9
    assert body["lora"]["r"] == 4 and body["lora"]["alpha"] == 16
    assert body["metadata"] == {"team": "nlp", "run": "a"}


def test_submit_unknown_config_key_names_it(run, server, tmp_path, train_file):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: tiny\ntraining_file: {train_file}\nepochs: 2\n")
    result = run("submit", "-c", str(spec))
    assert result.exit_code == 1 and "epochs" in result.stderr
    assert server.state.seen == []


def test_submit_wait_exits_1_when_the_job_fails(run, server, train_file):
    # The submit makes file-0001, then the job: script that job's GETs before it exists.
    job_id = f"ftjob-{server.state.counter + 2:04d}"
    server.state.scripts[job_id] = [{"status": "running", "step": 1},
                                    {"status": "failed", "error": {"code": "oom",
                                                                   "message": "out of memory"}}]
    result = run("submit", "tiny", str(train_file), "--wait", "--poll-interval", "0.02")
    assert result.stdout.strip() == job_id
    assert result.exit_code == 1 and "out of memory" in result.stderr


def test_logs_and_follow(run, server):
    job = server.state.make_job(status="running")
    jid = job["id"]
    server.state.make_event(jid, "placed on desk-1")
    server.state.make_event(jid, "step 2", type="metrics", data={"step": 2, "train_loss": 0.5})
    result = run("logs", jid)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert "placed on desk-1" in lines[0] and "train_loss=0.5" in lines[1]
    ev = {"object": "fine_tuning.job.event", "id": f"{jid}-s1", "created_at": 3000,
          "message": "Training finished"}
    server.state.streams[jid] = [([ev], "end")]
    followed = run("logs", jid, "-f")
    assert followed.exit_code == 0
    assert followed.stdout.splitlines()[-1].endswith("Training finished")


def test_download(run, tmp_path):
    result = run("download", "ad-good", str(tmp_path / "adapter"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    evil = run("download", "ad-evil", str(tmp_path / "evil"))
    assert evil.exit_code == 1 and ".." in evil.stderr and not (tmp_path / "evil").exists()


def test_nodes_and_models(run):
    nodes = run("nodes", "--json")
    assert [n["name"] for n in json.loads(nodes.stdout)] == ["desk-0", "desk-1", "desk-2"]
    models = run("models", "list")
    assert "smollm2-135m" in models.stdout


def test_server_command_without_the_service_extra_prints_the_hint(run, monkeypatch, tmp_path):
    # Stand-in for an install without the service extra: the server's config module fails
    # the way it would if one of its dependencies were missing.
    fake = types.ModuleType("lorapool.service.config")

    def missing(name):
        raise ModuleNotFoundError("No module named 'sqlalchemy'", name="sqlalchemy")

    fake.__getattr__ = missing  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "lorapool.service.config", fake)
    result = run("token", "create", "--tenant", "acme", "--data-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "pip install 'lorapool[service]'" in result.stderr and "sqlalchemy" in result.stderr
    assert "Traceback" not in result.output


def test_donate_sizes_read_like_the_deploy_recipe():
    import typer

    from lorapool.cli.server import size as _size

    assert _size("10GiB", "--memory-cap") == 10 * 1024**3
    assert _size("8 GB", "--memory") == 8 * 1000**3
    assert _size("1.5gib", "--memory") == int(1.5 * 1024**3)
    assert _size("4096", "--memory") == 4096
    assert _size(None, "--memory") is None
    with pytest.raises(typer.BadParameter, match="10GiB"):
        _size("ten gigs", "--memory-cap")
