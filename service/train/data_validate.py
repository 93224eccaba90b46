"""Cheap, tokenizer-free validation of a training file (the API runs this at upload time).

A training file is JSONL in one of three formats, the same on every line:

- chat (OpenAI fine-tuning format): ``{"messages": [{"role": ..., "content": ...}, ...]}``
- prompt/completion: ``{"prompt": "...", "completion": "..."}``
- plain text: ``{"text": "..."}``

`validate_dataset` streams the source line by line (a 500 MiB upload never sits in RAM whole),
hashes the raw bytes on the way and reports *every* bad line with its 1-based number and the
reason, e.g. ``line 7: messages[2].role must be one of system, user, assistant, tool (got 'bot')``.
Blank lines are skipped but still counted, so numbers match what an editor shows.

Every line is untrusted input, so each is bounded before it is decoded: at most
`MAX_LINE_BYTES` (a longer line is reported and skipped without being held in memory whole),
no NUL byte, strict UTF-8, and arrays/objects nested at most `MAX_JSON_DEPTH` deep. The depth is
checked by a cheap, string-aware scan *before* `json.loads`, whose C parser recurses once per
level and would otherwise end in a RecursionError (a 500) on ``[[[[…]]]]``. Numbers that JSON
cannot carry (NaN, Infinity, overflowing floats, integers past Python's digit limit) are
reported as such.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from lorapool.service.train.errors import DataError, LineError

DataSource = str | Path | bytes | list[dict]
Format = Literal["chat", "prompt_completion", "text"]

ROLES = ("system", "user", "assistant", "tool")
# The key that identifies each format; a record carrying keys of two formats is ambiguous.
_FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_FORMAT_NAMES = {"chat": "chat", "prompt_completion": "prompt/completion", "text": "text"}

# One line is one example; even a 32k-token chat is well under 1 MiB of text, so 8 MiB leaves
# room for long tool outputs while bounding what one line can make the server hold in memory.
MAX_LINE_BYTES = 8 * 1024 * 1024
# Chat records nest 3 levels (object → messages list → message object); tool schemas a few more.
MAX_JSON_DEPTH = 64


@dataclass
class DatasetReport:
    """What validation found: a valid file's example count, format and content hash."""

    n_examples: int
    format: Format
    n_lines: int
    sha256: str  # of the raw bytes (records: of their canonical JSONL encoding)


class InvalidRecord(ValueError):
    """One record is malformed; the message is the reason without the line number."""


def records_to_jsonl(records: list[dict]) -> bytes:
    """The canonical JSONL encoding of in-memory records (what their sha256 is taken over)."""
    buf = io.BytesIO()
    for rec in records:
        buf.write(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        buf.write(b"\n")
    return buf.getvalue()


def open_source(source: DataSource) -> IO[bytes]:
    """A binary stream over a JSONL path, raw JSONL bytes, or records."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if isinstance(source, list):
        return io.BytesIO(records_to_jsonl(source))
    if isinstance(source, (str, Path)):
        # A missing file is FileNotFoundError, not bad data (the API answers 409 for an upload
        # removed under it, and the trainer's caller reports a missing input as such).
        return Path(source).open("rb")
    raise TypeError(
        f"data source must be a path, JSONL bytes or a list of records, not {type(source).__name__}"
    )


class LineTooLong(bytes):
    """What `iter_lines` yields in place of a line over its limit: its first bytes only;
    `.length` is the whole line's length in bytes."""

    length: int


def iter_lines(stream: IO[bytes], hasher: Any | None = None,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without the newline) for every line, hashing as it goes.

    A line longer than `max_line_bytes` is yielded as a `LineTooLong` (its head only); the rest
    of it is read in bounded pieces and hashed, never held whole."""
    number = 0
    while True:
        raw = stream.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        if hasher is not None:
            hasher.update(raw)
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            length = len(raw)
            while True:
                piece = stream.readline(1024 * 1024)
                if not piece:
                    break
                length += len(piece)
                if hasher is not None:
                    hasher.update(piece)
                if piece.endswith(b"\n"):
                    length -= 1
                    break
            head = LineTooLong(raw[:80])
            head.length = length
            yield number, head
            continue
        yield number, raw.rstrip(b"\r\n")


def detect_format(record: dict) -> Format:
    """Which of the three formats a record is in; InvalidRecord when none or several."""
    found = [fmt for fmt, keys in _FORMAT_KEYS.items() if any(k in record for k in keys)]
    if not found:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise InvalidRecord(
            "unknown format: expected a 'messages' (chat), 'prompt'/'completion' or 'text' field "
            f"(got keys: {keys})"
        )
    if len(found) > 1:
        raise InvalidRecord(
            "ambiguous format: fields of " + " and ".join(_FORMAT_NAMES[f] for f in found)
            + " in one record"
        )
    return found[0]  # type: ignore[return-value]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_text(where: str, value: str) -> None:
    # JSON may spell a lone UTF-16 surrogate ("\\ud800"); no tokenizer can encode it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRecord(f"{where} holds a lone surrogate (U+{ord(value[exc.start]):04X}), "
                            "which is not valid Unicode text") from None


def check_record(record: Any, expected: Format | None = None) -> Format:
    """Validate one decoded record; return its format. Raises InvalidRecord with the reason."""
    if not isinstance(record, dict):
        raise InvalidRecord(f"expected a JSON object, got {_type_name(record)}")
    fmt = detect_format(record)
    if expected is not None and fmt != expected:
        raise InvalidRecord(
            f"format is {_FORMAT_NAMES[fmt]} but the file's first example is "
            f"{_FORMAT_NAMES[expected]}; all lines must share one format"
        )
    if fmt == "chat":
        _check_chat(record["messages"])
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in record:
                raise InvalidRecord(f"missing '{key}' (prompt/completion format needs both)")
            if not isinstance(record[key], str):
                raise InvalidRecord(f"{key} must be a string (got {_type_name(record[key])})")
            _check_text(key, record[key])
        if not record["completion"].strip():
            raise InvalidRecord("completion must not be empty")
    else:
        text = record["text"]
        if not isinstance(text, str):
            raise InvalidRecord(f"text must be a string (got {_type_name(text)})")
        _check_text("text", text)
        if not text.strip():
            raise InvalidRecord("text must not be empty")
    return fmt


def _check_chat(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InvalidRecord(f"messages must be a list (got {_type_name(messages)})")
    if not messages:
        raise InvalidRecord("messages must not be empty")
    has_assistant = False
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRecord(f"{where} must be an object (got {_type_name(msg)})")
        if "role" not in msg:
            raise InvalidRecord(f"{where} has no role")
        role = msg["role"]
        if role not in ROLES:
            raise InvalidRecord(f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})")
        if "content" not in msg:
            raise InvalidRecord(f"{where} has no content")
        content = msg["content"]
        if not isinstance(content, str):
            raise InvalidRecord(f"{where}.content must be a string (got {_type_name(content)})")
        _check_text(f"{where}.content", content)
        if "weight" in msg and (
            role != "assistant" or isinstance(msg["weight"], bool) or msg["weight"] not in (0, 1)
        ):
            # OpenAI's format: `weight` 0/1 on assistant messages says whether to learn it.
            raise InvalidRecord(f"{where}.weight must be 0 or 1, and only on assistant messages")
        if role == "assistant":
            if not content.strip():
                raise InvalidRecord(f"{where}.content must not be empty (assistant message)")
            has_assistant = True
    if not has_assistant:
        raise InvalidRecord("no assistant message: a chat example needs at least one to learn from")


# A complete JSON string (escapes included); what is left outside strings is structure.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Bracket bytes → 2 (open) / 0 (close), every other byte deleted (see `json_depth`).
_DEPTH_TABLE = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def scan_depth(raw: bytes) -> int:
    """How deep arrays/objects nest in the JSON text `raw`, as far as a parser would get.

    Strings are cut out (C regex), brackets kept, and the running depth's maximum taken with
    C-level iterators: no Python loop per byte, so a 8 MiB line takes milliseconds."""
    outside = _JSON_STRING.sub(b"", raw)
    quote = outside.find(b'"')
    if quote >= 0:  # an unterminated string: a parser stops there, so does the count
        outside = outside[:quote]
    steps = outside.translate(_DEPTH_TABLE, _NOT_BRACKETS)
    return max(itertools.accumulate(map(operator.sub, steps, itertools.repeat(1))), default=0)


def nests_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether arrays/objects in the JSON text `raw` nest more than `limit` levels deep.

    Cheap enough for every line: a text with no more than `limit` opening brackets at all
    (strings included) cannot nest deeper, and is not scanned."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    return scan_depth(raw) > limit


def _reject_constant(name: str) -> Any:
    raise InvalidRecord(f"invalid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRecord(f"invalid JSON: the number {text[:40]} is too large for a float")
    return value


def parse_line(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode one raw line (bounded, strict UTF-8, then JSON); InvalidRecord with the reason."""
    if isinstance(raw, LineTooLong):
        raise InvalidRecord(f"line is {raw.length} bytes long; the limit for one example is "
                            f"{MAX_LINE_BYTES} bytes ({MAX_LINE_BYTES // 1024**2} MiB)")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise InvalidRecord(f"contains a NUL byte at position {nul} (binary data is not JSONL)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at position {exc.start})"
        ) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark, as Windows editors write one
    if nests_deeper_than(raw, max_depth):
        raise InvalidRecord(f"arrays/objects nest deeper than {max_depth} levels (the limit)")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except InvalidRecord:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidRecord(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:  # cannot happen below the depth limit; a 400 all the same
        raise InvalidRecord(f"arrays/objects nest deeper than {max_depth} levels (the limit)") \
            from None
    except ValueError as exc:  # e.g. an integer past sys.get_int_max_str_digits()
        raise InvalidRecord(f"invalid JSON: a number is too large ({exc})") from None


def format_errors(errors: list[LineError], n_more: int) -> str:
    lines = [str(e) for e in errors]
    if n_more:
        lines.append(f"... and {n_more} more invalid line(s)")
    return "\n".join(lines)


def validate_dataset(source: DataSource, *, max_errors: int = 100) -> DatasetReport:
    """Check every line of a training file without a tokenizer; raise DataError naming each bad
    line (up to `max_errors`, then how many more), or when the file holds no example."""
    if max_errors < 1:
        raise ValueError("max_errors must be at least 1")
    hasher = hashlib.sha256()
    errors: list[LineError] = []
    n_bad = n_examples = n_lines = 0
    fmt: Format | None = None
    with open_source(source) as stream:
        for number, raw in iter_lines(stream, hasher):
            n_lines = number
            if not raw.strip() and not isinstance(raw, LineTooLong):
                continue  # blank lines are allowed and skipped
            try:
                record = parse_line(raw)
                if fmt is None and isinstance(record, dict):
                    # The first line with a recognisable format fixes the file's format, even
                    # when that line is otherwise invalid, so later lines are judged against it.
                    try:
                        fmt = detect_format(record)
                    except InvalidRecord:
                        pass
                check_record(record, fmt)
            except InvalidRecord as exc:
                n_bad += 1
                if len(errors) < max_errors:
                    errors.append(LineError(number, str(exc)))
                continue
            n_examples += 1
    if n_bad:
        head = (
            f"training file has no valid example: all {n_bad} non-blank line(s) are invalid"
            if not n_examples
            else f"training file has {n_bad} invalid line(s)"
        )
        raise DataError(head + ":\n" + format_errors(errors, n_bad - len(errors)), errors)
    if not n_examples:
        what = "is empty" if not n_lines else f"has only blank lines ({n_lines})"
        raise DataError(f"training file {what}: it holds no example", [])
    assert fmt is not None
    return DatasetReport(n_examples=n_examples, format=fmt, n_lines=n_lines,
                         sha256=hasher.hexdigest())
