"""`check_merge_request` refuses, from headers alone, what `merge_adapters` would refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorapool.service.merge import MergeError, merge_adapters
from lorapool.service.merge.preflight import (
    AdapterHeader,
    MergeRequestError,
    check_merge_request,
    read_safetensors_shapes,
)


def header(folder: Path, label: str | None = None) -> AdapterHeader:
    with open(folder / "adapter_model.safetensors", "rb") as fh:
        shapes = read_safetensors_shapes(fh)
    return AdapterHeader(label=label or folder.name,
                         config=json.loads((folder / "adapter_config.json").read_text()),
                         metadata=json.loads((folder / "lorapool.json").read_text()),
                         shapes=shapes)


def test_compatible_adapters_pass(make_adapter, tmp_path):
    a, b = make_adapter("pf-a", seed=1), make_adapter("pf-b", seed=2, r=2, alpha=4)
    check_merge_request([header(a), header(b)], "exact")
    check_merge_request([header(a), header(b)], "svd", target_rank=3)
    merge_adapters([a, b], "exact", output_dir=tmp_path / "out")  # the library agrees


@pytest.mark.parametrize("kwargs, param", [
    ({"method": "nope"}, "method"),
    ({"method": "ties"}, "density"),
    ({"method": "exact", "density": 0.5}, "density"),
    ({"method": "ties", "density": 1.5}, "density"),
    ({"method": "exact", "target_rank": 2}, "target_rank"),
    ({"method": "exact", "weights": [1.0]}, "weights"),
    ({"method": "exact", "weights": [1.0, float("nan")]}, "weights[1]"),
    ({"method": "exact", "weights": [1.0, -1.0]}, "weights"),
    ({"method": "ties", "density": 0.5, "majority_sign": "most"}, "majority_sign"),
])
def test_bad_parameters_name_the_field(make_adapter, kwargs, param):
    hs = [header(make_adapter("pf-a", seed=1)), header(make_adapter("pf-c", seed=3))]
    method = kwargs.pop("method")
    with pytest.raises(MergeRequestError) as info:
        check_merge_request(hs, method, **kwargs)
    assert info.value.param == param, str(info.value)


def test_refusals_match_the_library(make_adapter, tmp_path):
    a = make_adapter("pf-a", seed=1)
    other_base = make_adapter("pf-other", seed=4, sha="b" * 64)
    other_modules = make_adapter("pf-mods", seed=5, targets=("q_proj",))
    low_rank = make_adapter("pf-r2", seed=6, r=2, alpha=4)
    no_count = make_adapter("pf-nocount", seed=7, n_examples=None)
    cases = [
        ([a, other_base], "exact", {}, "different base models"),
        ([a, other_modules], "exact", {}, "incompatible target modules"),
        ([a, low_rank], "ties", {"density": 0.5}, "needs equal ranks"),
        ([a, no_count], "exact", {}, "n_examples"),
    ]
    for i, (folders, method, kwargs, words) in enumerate(cases):
        with pytest.raises(MergeError, match=words):
            check_merge_request([header(f) for f in folders], method, **kwargs)
        with pytest.raises(MergeError):
            merge_adapters(folders, method, output_dir=tmp_path / f"o{i}", **kwargs)


def test_broken_header_is_refused(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with open(bad, "rb") as fh, pytest.raises(MergeError, match="header"):
        read_safetensors_shapes(fh)
