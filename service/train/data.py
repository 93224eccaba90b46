"""The trainer's data pipeline: a JSONL training file → a tokenized, memory-mapped data set.

`build_dataset` validates the file (`data_validate`), renders and masks every record
(`data_render`), applies the over-long policy, optionally packs short examples, and stores the
result as Arrow under ``cache_dir/tok-<hash>``. The hash covers the raw bytes, the tokenizer
(its serialised vocabulary/model, chat template and special tokens) and the spec fields that
change tokens (max_seq_len, overlong, packing, loss_on), so the same inputs are tokenized only
once and a large file is never held in RAM: raw lines are streamed into Arrow with
`datasets.Dataset.from_generator`, tokenized with `.map`, and the result is memory-mapped.

Policies, stated once:

- over-long (more than ``max_seq_len`` tokens): ``overlong="truncate"`` keeps the first
  ``max_seq_len`` tokens (counted in `DataStats.n_truncated`); ``"drop"`` drops the example
  (counted in `n_dropped`).
- An example with no token left to learn (e.g. truncation cut off every assistant turn) is
  dropped and counted in `n_dropped`. The first token of every example never carries loss
  (nothing precedes it to predict it from), so its label is always -100; this is what makes a
  packed row's loss identical to its examples' losses taken alone.
- packing: examples are concatenated greedily, in file order, into rows of at most
  ``max_seq_len`` tokens; ``position_ids`` restart at 0 for each example and `collate` builds a
  block-diagonal causal mask so that no token attends across examples.

Without ``cache_dir`` the cache lives in ``$LORAPOOL_DATA_CACHE`` or
``<$LORAPOOL_CACHE or ~/.cache/lorapool>/datasets`` (`resolve.resolve_cache_dir`).

Batching lives in collate.py (`PaddedCollator`, `FlatCollator`); `collate` is re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorapool.service.train.collate import collate, packed_mask_dtype
from lorapool.service.train.data_render import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    render_example,
)
from lorapool.service.train.data_validate import (
    DatasetReport,
    DataSource,
    InvalidRecord,
    format_errors,
    open_source,
    parse_line,
    validate_dataset,
)
from lorapool.service.train.errors import DataError, LineError
from lorapool.service.train.resolve import resolve_cache_dir

if TYPE_CHECKING:  # datasets is heavy; only the trainer's side imports it, lazily
    import datasets

    from lorapool.service.train.spec import TrainSpec

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "DataSource",
    "DataStats",
    "DatasetReport",
    "TokenizedData",
    "build_dataset",
    "collate",
    "packed_mask_dtype",
    "render_example",
    "validate_dataset",
]

# Bump when the tokenization output changes, so old caches are not reused.
PIPELINE_VERSION = 1
_STATS_FILE = "lorapool_stats.json"

# Per-example status written by the tokenizing map.
_KEPT, _TRUNCATED, _DROPPED_LONG, _DROPPED_NO_LABEL, _ERROR = 0, 1, 2, 3, 4


@dataclass
class DataStats:
    n_examples: int  # kept after the overlong policy
    n_truncated: int
    n_dropped: int  # dropped as over-long (overlong="drop") or left without any label
    n_tokens: int
    n_label_tokens: int  # tokens that carry loss


@dataclass
class TokenizedData:
    # columns: input_ids (list[int]), labels (list[int], -100 = no loss), and when packed:
    # position_ids (restart at 0 for each example)
    dataset: datasets.Dataset
    stats: DataStats
    packed: bool


def default_cache_dir() -> Path:
    """Where tokenized data is cached without an explicit `cache_dir` (resolve.py decides)."""
    return resolve_cache_dir(None, "datasets")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in a tokenizer that changes the ids it produces."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocab, merges, normalizer, post-processor
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": [str(t) for t in getattr(tokenizer, "all_special_tokens", [])],
        "ids": [getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id")],
        "add_bos": repr(getattr(tokenizer, "add_bos_token", None)),
        "add_eos": repr(getattr(tokenizer, "add_eos_token", None)),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_key(report: DatasetReport, tokenizer: Any, spec: TrainSpec) -> str:
    parts = {
        "version": PIPELINE_VERSION,
        "data": report.sha256,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "fallback_template": FALLBACK_CHAT_TEMPLATE,
        "max_seq_len": spec.max_seq_len,
        "overlong": spec.overlong,
        "packing": spec.packing,
        "loss_on": spec.loss_on,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _raw_examples(path: str, sha256: str) -> Iterator[dict]:
    """Non-blank lines of a validated JSONL file as {"line", "raw"} rows.

    `sha256` is unused here but part of the generator's arguments, which `datasets` hashes:
    it keeps a changed file at the same path from hitting a stale generator cache."""
    del sha256
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield {"line": number, "raw": raw.decode("utf-8")}


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, max_seq_len: int, overlong: str,
                    loss_on: str) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in
                            ("line", "input_ids", "labels", "status", "error", "n_tok", "n_lab")}
    for line, raw in zip(batch["line"], batch["raw"]):
        ids: list[int] = []
        labels: list[int] = []
        error = ""
        try:
            ids, labels = render_example(parse_line(raw.encode("utf-8")), tokenizer, loss_on)
            status = _KEPT
            if len(ids) > max_seq_len:
                if overlong == "drop":
                    status, ids, labels = _DROPPED_LONG, [], []
                else:
                    status, ids, labels = _TRUNCATED, ids[:max_seq_len], labels[:max_seq_len]
            if ids:
                labels[0] = IGNORE_INDEX  # nothing precedes the first token to predict it
                if all(x == IGNORE_INDEX for x in labels):
                    status, ids, labels = _DROPPED_NO_LABEL, [], []
        except (DataError, InvalidRecord) as exc:
            status, ids, labels, error = _ERROR, [], [], str(exc)
        out["line"].append(line)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
        out["error"].append(error)
        out["n_tok"].append(len(ids))
        out["n_lab"].append(sum(x != IGNORE_INDEX for x in labels))
    return out


def _pack_batch(batch: dict[str, list], max_seq_len: int) -> dict[str, list]:
    """Greedy, order-preserving packing of one batch of examples into rows."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    row: dict[str, list] = {k: [] for k in out}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        if row["input_ids"] and len(row["input_ids"]) + len(ids) > max_seq_len:
            for k, done in row.items():
                out[k].append(done)
            row = {k: [] for k in out}
        row["input_ids"] += ids
        row["labels"] += labels
        row["position_ids"] += range(len(ids))
    if row["input_ids"]:
        for k, done in row.items():
            out[k].append(done)
    return out


def _column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """One scalar column as a numpy array, read from the memory-mapped Arrow table (the data set
    must have no indices mapping: flatten a filtered one first)."""
    return np.asarray(ds.data.column(name).to_numpy(), dtype=np.int64)


def _load(final: Path, packed: bool) -> TokenizedData:
    import datasets

    stats = DataStats(**json.loads((final / _STATS_FILE).read_text()))
    return TokenizedData(datasets.load_from_disk(str(final)), stats, packed)


def _remove_stale_work(root: Path, max_age_s: float = 86400.0) -> None:
    """Work folders a killed build left behind (a day old: no live build takes that long)."""
    now = time.time()
    for stale in root.glob(".work-*"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # removed by someone else meanwhile


def build_dataset(source: DataSource, tokenizer: Any, spec: TrainSpec, *,
                  cache_dir: str | Path | None = None) -> TokenizedData:
    """Validate, tokenize (once per content/tokenizer/spec) and optionally pack a data set."""
    report = validate_dataset(source)
    key = _cache_key(report, tokenizer, spec)
    root = resolve_cache_dir(cache_dir, "datasets")
    final = root / f"tok-{key[:32]}"
    if (final / _STATS_FILE).is_file():
        return _load(final, spec.packing)

    import datasets

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_work(root)
    # Everything intermediate goes to a private work folder that is removed on success and on
    # failure; the result appears under its final name only once complete (atomic rename).
    work = Path(tempfile.mkdtemp(prefix=f".work-{key[:12]}-", dir=root))
    try:
        if isinstance(source, (str, Path)):
            raw_path = Path(source)
        else:
            raw_path = work / "raw.jsonl"
            with open_source(source) as src, raw_path.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        features = datasets.Features({"line": datasets.Value("int64"),
                                      "raw": datasets.Value("large_string")})
        raw = datasets.Dataset.from_generator(
            _raw_examples, features=features, cache_dir=str(work / "gen"),
            gen_kwargs={"path": str(raw_path), "sha256": report.sha256},
        )
        tok = raw.map(
            _tokenize_batch, batched=True, batch_size=256, remove_columns=raw.column_names,
            fn_kwargs={"tokenizer": tokenizer, "max_seq_len": spec.max_seq_len,
                       "overlong": spec.overlong, "loss_on": spec.loss_on},
            cache_file_name=str(work / "tokenized.arrow"), new_fingerprint=key[:32] + "-tok",
            desc="tokenizing",
        )
        status = _column(tok, "status")
        n_errors = int((status == _ERROR).sum())
        if n_errors:
            bad = tok.filter(lambda s: [x == _ERROR for x in s], input_columns="status",
                             batched=True, cache_file_name=str(work / "errors.arrow"))
            errors = [LineError(int(r["line"]), r["error"]) for r in bad.select(range(min(100, n_errors)))]
            raise DataError(f"{n_errors} example(s) cannot be tokenized:\n"
                            + format_errors(errors, n_errors - len(errors)), errors)
        keep = tok.filter(lambda s: [x <= _TRUNCATED for x in s], input_columns="status",
                          batched=True, cache_file_name=str(work / "kept-indices.arrow"))
        keep = keep.flatten_indices(cache_file_name=str(work / "kept.arrow"))
        stats = DataStats(
            n_examples=len(keep),
            n_truncated=int((status == _TRUNCATED).sum()),
            n_dropped=int(((status == _DROPPED_LONG) | (status == _DROPPED_NO_LABEL)).sum()),
            n_tokens=int(_column(keep, "n_tok").sum()),
            n_label_tokens=int(_column(keep, "n_lab").sum()),
        )
        if not stats.n_examples:
            raise DataError(
                f"no example left to train on: {stats.n_dropped} of {report.n_examples} dropped "
                f"(over max_seq_len={spec.max_seq_len} with overlong={spec.overlong!r}, or no "
                "token left to learn)"
            )
        keep = keep.remove_columns(["line", "status", "error", "n_tok", "n_lab"])
        if spec.packing:
            keep = keep.map(
                _pack_batch, batched=True, batch_size=1000, remove_columns=keep.column_names,
                fn_kwargs={"max_seq_len": spec.max_seq_len},
                cache_file_name=str(work / "packed.arrow"), new_fingerprint=key[:32] + "-pack",
                desc="packing",
            )
        staged = work / "final"
        keep.save_to_disk(str(staged))
        (staged / _STATS_FILE).write_text(json.dumps(asdict(stats)))
        del raw, tok, keep
        try:
            os.replace(staged, final)
        except OSError:
            if not (final / _STATS_FILE).is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _load(final, spec.packing)
