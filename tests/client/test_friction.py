"""The CLI friction points of issue 11, each as a test that failed before the fix: clean
`logs` lines, tables that never break ids at 80 columns, one-stream `download`, complete
help texts, global options after a sub-command, a refused submit leaving no upload,
`files list/delete`, one data dir for every server-side command, and quiet library loggers."""

from __future__ import annotations

import json
import logging
import re

import click
import pytest
import typer.main
from typer.testing import CliRunner

from lorapool.cli import app

API_KEY = "sk-test-good"
JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def run80(server, monkeypatch):
    """The CLI at an 80-column terminal, talking to the test server."""
    monkeypatch.setenv("LORAPOOL_BASE_URL", server.base_url)
    monkeypatch.setenv("LORAPOOL_API_KEY", API_KEY)
    monkeypatch.setenv("COLUMNS", "80")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)


def test_logs_print_one_clean_line_per_metrics_event(run80, server):
    jid = server.state.make_job(status="running")["id"]
    server.state.make_event(jid, "Step 1/8: training loss=0.6859", type="metrics", data={
        "step": 1, "total_steps": 8, "loss": 0.685912345678, "lr": 0.000199999,
        "grad_norm": None, "tokens_per_s": 512.3333, "memory_allocated": None,
        "memory_peak": None, "train_loss": 0.685912345678})
    result = run80("logs", jid)
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert line.count("loss=") == 1 and "step=" not in line and "total_steps" not in line
    assert "None" not in line and "0.685912" not in line
    assert "lr=0.0002" in line and "tok/s=512.3" in line


def test_jobs_list_never_cuts_or_wraps_ids_at_80_columns(run80, server):
    jid = "ftjob-" + "a1b2c3d4e5f6" * 2
    adapter = "ft:smollm2-135m-instruct:acme:" + "f00dfeed" * 3
    server.state.jobs[jid] = {"object": "fine_tuning.job", "id": jid,
                              "model": "HuggingFaceTB/SmolLM2-135M-Instruct-long-name",
                              "created_at": 5, "organization_id": "acme",
                              "status": "succeeded", "step": 8, "total_steps": 8,
                              "fine_tuned_model": adapter, "node_id": "desk-with-a-long-name"}
    result = run80("jobs", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(jid in ln for ln in lines), result.stdout
    assert any(adapter in ln for ln in lines), result.stdout
    as_json = json.loads(run80("jobs", "list", "--json").stdout)
    assert jid in [j["id"] for j in as_json["data"]]


@pytest.mark.parametrize("command", [["jobs", "list"], ["nodes"], ["models", "list"],
                                     ["files", "list"], ["adapters", "list"],
                                     ["merges", "list"]])
def test_every_list_command_has_json(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0 and "--json" in result.stdout, command


def test_download_prints_one_line_on_one_stream(run80, tmp_path):
    result = run80("download", "ad-good", str(tmp_path / "adapter"))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.strip() == str(tmp_path / "adapter")


def _all_commands() -> list[list[str]]:
    root = typer.main.get_command(app)
    found: list[list[str]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        found.append(path)
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(root, [])
    return found


def test_help_is_complete_at_80_columns():
    runner = CliRunner()
    for path in _all_commands():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, path
        text = result.stdout
        assert "<bool>" not in text, path
        # Nothing cut mid-word (rich's panels ended squeezed option names with "…").
        assert not re.search(r"\w…", text), (path, text)
        assert max(len(ln) for ln in text.splitlines()) <= 80, path


def test_submit_help_shows_required_positionals_and_described_options():
    text = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "80"}).stdout
    assert "Usage: lorapool submit [OPTIONS] MODEL TRAINING_FILE" in text
    flat = " ".join(text.split())
    for option, default in (("--n-epochs", "auto"), ("--batch-size", "auto"),
                            ("--learning-rate", "2e-4"), ("--validation-file", "none")):
        m = re.search(re.escape(option) + r" <\w+> (.*?)(?= --|$)", flat)
        assert m, option
        described = m.group(1)
        assert len(described) > 20 and "default" in described and default in described, \
            (option, described)


def test_global_options_work_after_the_sub_command(run80, server):
    wrong = run80("nodes", "--api-key", "sk-wrong")
    assert wrong.exit_code == 1 and "401" in wrong.stderr
    good = run80("jobs", "list", f"--api-key={API_KEY}", "--base-url", server.base_url)
    assert good.exit_code == 0, good.output


def test_submit_refused_for_an_unknown_model_leaves_no_upload(run80, server, train_file):
    result = run80("submit", "no-such-model", str(train_file))
    assert result.exit_code == 1 and "no-such-model" in result.stderr
    assert server.state.n("POST", "/v1/files") == 1  # it was uploaded …
    assert server.state.files == {}  # … and deleted when the job was refused


def test_client_submit_refused_leaves_no_upload(client, server, train_file):
    from lorapool import BadRequestError

    with pytest.raises(BadRequestError):
        client.submit("tiny", train_file, max_seq_len=9000)
    assert server.state.files == {}


def test_files_list_and_delete(run80, server, train_file):
    fid = json.loads(json.dumps(run80("files", "upload", str(train_file)).stdout.strip()))
    listed = run80("files", "list", "--json")
    assert [f["id"] for f in json.loads(listed.stdout)["data"]] == [fid]
    table = run80("files", "list")
    assert fid in table.stdout and train_file.name in table.stdout
    deleted = run80("files", "delete", fid)
    assert deleted.exit_code == 0 and deleted.stdout.strip() == fid
    assert server.state.files == {}


def test_one_data_dir_for_serve_and_token_create(tmp_path, monkeypatch):
    pytest.importorskip("lorapool.service.config")
    from lorapool.cli._datadir import config_path, remember_data_dir
    from lorapool.cli.server import settings

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("LORAPOOL_CONFIG", raising=False)
    monkeypatch.delenv("LORAPOOL_DATA_DIR", raising=False)
    served = tmp_path / "served"
    remember_data_dir(served)  # what `serve --data-dir served` does
    assert config_path() == tmp_path / "config" / "lorapool" / "config.toml"
    assert settings().data_dir == served.resolve()  # a plain `token create` finds it
    assert settings(tmp_path / "flag").data_dir == (tmp_path / "flag").resolve()
    monkeypatch.setenv("LORAPOOL_DATA_DIR", str(tmp_path / "env"))
    assert settings().data_dir == (tmp_path / "env").resolve()


def test_library_noise_is_quieted_in_the_entry_points(run80, tmp_path):
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    noisy.setLevel(logging.NOTSET)
    from lorapool import load

    with pytest.raises(FileNotFoundError):
        load(tmp_path)  # quiets before it imports peft (and bitsandbytes through it)
    assert noisy.getEffectiveLevel() >= logging.ERROR
    noisy.setLevel(logging.NOTSET)
    run80("nodes", "--json")
    assert noisy.getEffectiveLevel() >= logging.ERROR
