"""What merge_adapters refuses, with a message naming the cause, and that it writes nothing then."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

from lorapool.service.merge import MergeError, load_adapter, merge_adapters


@pytest.fixture(scope="module")
def pair(make_adapter):
    return [make_adapter("r0", seed=201, n_examples=5), make_adapter("r1", seed=202)]


def copy_with(src, dest, *, config=None, drop=()):
    shutil.copytree(src, dest)
    if config:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        cfg.update(config)
        (dest / "adapter_config.json").write_text(json.dumps(cfg))
    for name in drop:
        (dest / name).unlink()
    return dest


def refused(adapters, method="exact", *, out, match, **kwargs):
    with pytest.raises(MergeError, match=match):
        merge_adapters(adapters, method, output_dir=out, **kwargs)
    assert not out.exists(), "a refused merge must write nothing"
    assert not list(out.parent.glob(".tmp-*"))


def test_different_base_models_are_refused(pair, make_adapter, tmp_path):
    other = make_adapter("other-base", seed=203, sha="b" * 64)
    refused([pair[0], other], out=tmp_path / "out", match=r"different base models.*aaaaaaaaaaaa"
                                                          r".*bbbbbbbbbbbb")


def test_different_target_modules_are_refused_naming_them(pair, make_adapter, tmp_path):
    other = make_adapter("other-targets", seed=204, targets=("q_proj", "k_proj", "down_proj"))
    with pytest.raises(MergeError, match="incompatible target modules") as e:
        merge_adapters([pair[0], other], "exact", output_dir=tmp_path / "out")
    msg = str(e.value)
    assert "model.layers.0.self_attn.v_proj" in msg and "model.layers.0.self_attn.k_proj" in msg


def test_pickle_adapters_are_refused_without_unpickling(pair, tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:  # loading this pickle would create `marker`
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    bad = copy_with(pair[0], tmp_path / "bin", drop=["adapter_model.safetensors"])
    (bad / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    refused([bad, pair[1]], out=tmp_path / "out", match=r"pickle.*adapter_model\.bin")
    assert not marker.exists()


def test_non_lora_and_unsupported_lora_variants_are_refused(pair, make_adapter, tmp_path):
    ia3 = copy_with(pair[0], tmp_path / "ia3", config={"peft_type": "IA3"})
    refused([ia3, pair[1]], out=tmp_path / "o1", match="not a LoRA adapter.*IA3")
    dora = make_adapter("dora", seed=205, use_dora=True)
    refused([dora, pair[1]], out=tmp_path / "o2", match="DoRA")
    pissa = copy_with(pair[0], tmp_path / "pissa", config={"init_lora_weights": "pissa"})
    refused([pissa, pair[1]], out=tmp_path / "o3", match="changes the base weights")


def test_broken_folders_are_refused(pair, tmp_path):
    no_meta = copy_with(pair[0], tmp_path / "no-meta", drop=["lorapool.json"])
    refused([no_meta, pair[1]], out=tmp_path / "o1", match="no lorapool.json")
    wrong_r = copy_with(pair[0], tmp_path / "wrong-r", config={"r": 8})
    refused([wrong_r, pair[1]], out=tmp_path / "o2", match="has rank 4 but .* r=8")
    garbage = copy_with(pair[0], tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    refused([garbage, pair[1]], out=tmp_path / "o3", match="unreadable safetensors")
    refused([tmp_path / "missing", pair[1]], out=tmp_path / "o4", match="no such directory")


def test_methods_needing_equal_ranks_refuse_mixed_ranks(pair, make_adapter, tmp_path):
    r2 = make_adapter("rank2", r=2, seed=206)
    refused([pair[0], r2], "naive", out=tmp_path / "o1", match=r"ranks \[4, 2\].*exact or svd")
    refused([pair[0], r2], "ties", density=0.5, out=tmp_path / "o2", match="ties_svd")


@pytest.mark.parametrize("method,kwargs,match", [
    ("mean", {}, "unknown merge method 'mean'"),
    ("ties", {}, "density: required"),
    ("ties", {"density": 0.0}, r"density: must be in \(0, 1\]"),
    ("dare_linear", {"density": 1.5}, r"density: must be in \(0, 1\]"),
    ("exact", {"density": 0.5}, "density: applies only"),
    ("exact", {"target_rank": 2}, "target_rank: applies only"),
    ("svd", {"target_rank": 0}, "target_rank: must be a positive integer"),
    ("ties", {"density": 0.5, "majority_sign": "median"}, "majority_sign"),
    ("exact", {"weights": [1.0]}, "weights: 1 given for 2 adapters"),
    ("exact", {"weights": [1.0, float("nan")]}, "weights: must be finite"),
    ("exact", {"weights": [1.0, -1.0]}, "sum must be positive"),
    ("exact", {"normalize_weights": False}, "needs explicit weights"),
])
def test_bad_parameters_are_refused(pair, tmp_path, method, kwargs, match):
    refused(pair, method, out=tmp_path / "out", match=match, **kwargs)


def test_adapter_lists(pair, tmp_path):
    refused([pair[0]], "exact", out=tmp_path / "o1", match="needs at least 2")
    refused([pair[0], pair[0]], out=tmp_path / "o2", match="listed more than once")


def test_default_weights_need_sample_counts(pair, make_adapter, tmp_path):
    unknown = make_adapter("no-count", seed=207, n_examples=None)
    refused([pair[0], unknown], out=tmp_path / "o1", match="n_examples is None.*weights=")
    res = merge_adapters([pair[0], unknown], "exact", weights=[1, 3], output_dir=tmp_path / "o2")
    assert res.weights == [0.25, 0.75]


def test_existing_output_is_never_overwritten(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        merge_adapters(pair, "exact", output_dir=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine
    assert load_adapter(merge_adapters(pair, "exact", output_dir=empty).output_dir).modules


def test_a_failed_write_leaves_nothing(pair, tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        merge_adapters(pair, "exact", output_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
