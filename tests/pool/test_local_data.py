"""Node-local data sets on the node's side: references, validation, what a report may carry."""

from __future__ import annotations

import json
import os

import pytest

from lorapool.service.pool.local_data import DatasetCatalog, parse_ref


def test_references_parse_from_both_forms_and_refuse_the_rest():
    assert parse_ref("desk-1:sales") == ("desk-1", "sales")
    assert parse_ref("10.0.0.5:8000:sales") == ("10.0.0.5:8000", "sales")  # last colon splits
    assert parse_ref({"node": "desk-1", "name": "sales"}) == ("desk-1", "sales")
    for bad in ("sales", ":sales", "desk:", "desk:../x", {"node": "d"}, {"node": "d", "name": "s",
                                                                       "path": "/etc"}, 3):
        with pytest.raises(ValueError):
            parse_ref(bad)


def test_catalog_reports_counts_and_line_errors_never_content_or_paths(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"SECRET-{i}"}) + "\n" for i in range(5)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "SECRET-x"}\nnot json\n')
    cat = DatasetCatalog({"good": str(good), "bad": str(bad), "gone": str(tmp_path / "no")},
                         {"good": ["acme", "acme", "hr"]})
    info = {d["name"]: d for d in cat.describe()}
    assert info["good"] == {"name": "good", "examples": 5, "lines": 5, "format": "text",
                            "valid": True, "errors": [], "tenants": ["acme", "hr"]}
    assert info["bad"]["tenants"] == []  # granted to nobody: offered to nobody
    assert not info["bad"]["valid"] and any(e.startswith("line 2:") for e in info["bad"]["errors"])
    assert not info["gone"]["valid"] and "missing" in info["gone"]["errors"][0]
    text = json.dumps(info)
    assert "SECRET" not in text and str(tmp_path) not in text
    # A changed file is validated again; an unchanged one is not re-read.
    good.write_text(good.read_text() + json.dumps({"text": "more"}) + "\n")
    os.utime(good, ns=(1, 1))
    assert {d["name"]: d for d in cat.describe()}["good"]["examples"] == 6


def test_agent_config_refuses_bad_data_set_names():
    from pydantic import ValidationError

    from lorapool.service.pool.agent import AgentConfig

    cfg = AgentConfig(name="n", work_dir="/tmp/w", datasets={"sales": "~/d.jsonl"})
    assert os.path.isabs(cfg.datasets["sales"])
    with pytest.raises(ValidationError, match="data set name"):
        AgentConfig(name="n", work_dir="/tmp/w", datasets={"../x": "/d.jsonl"})


def test_grants_must_name_data_sets_the_node_offers():
    from lorapool.service.pool.agent import AgentConfig

    with pytest.raises(ValueError, match="does not offer: payroll"):
        AgentConfig(name="n", work_dir="/tmp/w", datasets={"sales": "/d.jsonl"},
                    dataset_tenants={"payroll": ["hr"]})
