"""Bring your own adapter: a PEFT folder sent as an archive, checked before anything is kept.

`unpack_archive` extracts a .tar(.gz) or .zip into a fresh folder under limits (archive size,
member count, total size, compression ratio) and refuses links, devices, absolute paths and
`../`; `check_adapter` then validates `adapter_config.json` (a plain peft `LoraConfig`, sane r
and alpha), reads the weights as safetensors only, and checks every adapted module against the
registered base by shape (the module exists; A is (r, in), B is (out, r) of that layer).
Every refusal is an `ImportRefused` naming the member, field or limit. Pure library: the API
calls it in a temporary folder and removes that folder whatever happens.
"""

from __future__ import annotations

import json
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from .adapter_io import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, load_adapter
from .errors import MergeError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files of a PEFT folder that are kept; anything else (training args, tokenizer copies) is
# dropped, pickles are refused.
KEPT_FILES = (CONFIG_FILE, WEIGHTS_FILE, "README.md")
MAX_RANK = 1024
MAX_ALPHA = 65536.0


class ImportRefused(ValueError):
    """The archive or adapter cannot be imported; `.param` names what is wrong."""

    def __init__(self, message: str, param: str = "file") -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True)
class ImportLimits:
    max_archive_bytes: int = 512 * 1024**2
    max_members: int = 64
    max_total_bytes: int = 1024**3
    max_ratio: float = 100.0  # uncompressed / compressed, over the whole archive


def _member_path(name: str) -> PurePosixPath:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ImportRefused(f"archive member {name!r} has an absolute path")
    p = PurePosixPath(name.replace("\\", "/"))
    if ".." in p.parts:
        raise ImportRefused(f"archive member {name!r} points outside the archive ('..')")
    return p


def _strip_root(paths: list[PurePosixPath]) -> int:
    """1 when every file sits in one top-level folder (a tarred folder), else 0."""
    tops = {p.parts[0] for p in paths if p.parts}
    return 1 if len(tops) == 1 and all(len(p.parts) > 1 for p in paths) else 0


def _check_name(p: PurePosixPath, original: str) -> None:
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ImportRefused(f"archive member {original!r} is a pickle file; lorapool takes "
                            f"only safetensors weights ({WEIGHTS_FILE})")


def unpack_archive(archive: str | Path, dest: str | Path,
                   limits: ImportLimits = ImportLimits()) -> Path:
    """Extract the adapter files of `archive` (tar, tar.gz or zip) flat into `dest`."""
    archive, dest = Path(archive), Path(dest)
    size = archive.stat().st_size
    if size > limits.max_archive_bytes:
        raise ImportRefused(f"archive is {size} bytes; the limit is {limits.max_archive_bytes}")
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _unpack_zip(archive, dest, size, limits)
    else:
        try:
            tar = tarfile.open(archive, "r:*")
        except (tarfile.TarError, OSError) as exc:
            raise ImportRefused(f"not a .tar.gz, .tar or .zip archive ({exc})") from None
        with tar:
            _unpack_tar(tar, dest, size, limits)
    if not (dest / CONFIG_FILE).is_file():
        raise ImportRefused(f"the archive has no {CONFIG_FILE}")
    if not (dest / WEIGHTS_FILE).is_file():
        raise ImportRefused(f"the archive has no {WEIGHTS_FILE}")
    return dest


def _budget(members: int, total: int, compressed: int, limits: ImportLimits) -> None:
    if members > limits.max_members:
        raise ImportRefused(f"the archive has more than {limits.max_members} members")
    if total > limits.max_total_bytes:
        raise ImportRefused(f"the archive unpacks to more than {limits.max_total_bytes} bytes")
    if total > 1024**2 and total > limits.max_ratio * max(compressed, 1):
        raise ImportRefused(f"the archive's compression ratio exceeds {limits.max_ratio:g} "
                            "(a decompression bomb?)")


def _unpack_tar(tar: tarfile.TarFile, dest: Path, compressed: int,
                limits: ImportLimits) -> None:
    members: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
    total = 0
    for info in tar:  # streamed, so a huge member list is refused before it is all read
        p = _member_path(info.name)
        if info.issym() or info.islnk():
            raise ImportRefused(f"archive member {info.name!r} is a link; links are refused")
        if not (info.isfile() or info.isdir()):
            raise ImportRefused(f"archive member {info.name!r} is not a regular file")
        if info.isfile():
            _check_name(p, info.name)
            total += info.size
            members.append((info, p))
        _budget(len(members), total, compressed, limits)
    strip = _strip_root([p for _, p in members])
    for info, p in members:
        rel = PurePosixPath(*p.parts[strip:])
        if str(rel) not in KEPT_FILES:
            continue
        src = tar.extractfile(info)
        if src is None:
            continue
        with src, open(dest / str(rel), "wb") as out:
            _copy_limited(src, out, info.size, info.name)


def _unpack_zip(archive: Path, dest: Path, compressed: int, limits: ImportLimits) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        members = []
        total = 0
        for info in infos:
            p = _member_path(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ImportRefused(f"archive member {info.filename!r} is a link; links are "
                                    "refused")
            if info.is_dir():
                continue
            _check_name(p, info.filename)
            total += info.file_size
            members.append((info, p))
            _budget(len(members), total, compressed, limits)
        strip = _strip_root([p for _, p in members])
        for info, p in members:
            rel = PurePosixPath(*p.parts[strip:])
            if str(rel) not in KEPT_FILES:
                continue
            with zf.open(info) as src, open(dest / str(rel), "wb") as out:
                _copy_limited(src, out, info.file_size, info.filename)


def _copy_limited(src: Any, out: Any, declared: int, name: str) -> None:
    """Copy at most the declared size: a member that inflates past its header is refused."""
    written = 0
    for chunk in iter(lambda: src.read(1 << 20), b""):
        written += len(chunk)
        if written > declared:
            raise ImportRefused(f"archive member {name!r} is larger than its header says")
        out.write(chunk)


# -- the adapter itself -----------------------------------------------------------------------


def check_config(config: Any) -> dict[str, Any]:
    """`adapter_config.json` as peft reads it, with sane r and lora_alpha; raises
    `ImportRefused(param="adapter_config.json")` naming the field."""
    from peft import LoraConfig

    param = CONFIG_FILE
    if not isinstance(config, dict):
        raise ImportRefused(f"{CONFIG_FILE} must be a JSON object", param)
    if config.get("peft_type") != "LORA":
        raise ImportRefused(f"{CONFIG_FILE}: peft_type must be 'LORA', got "
                            f"{config.get('peft_type')!r}", param)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        raise ImportRefused(f"{CONFIG_FILE}: r must be an integer from 1 to {MAX_RANK}, "
                            f"got {r!r}", param)
    if (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
            or not 0 < alpha <= MAX_ALPHA):
        raise ImportRefused(f"{CONFIG_FILE}: lora_alpha must be a number in (0, {MAX_ALPHA:g}], "
                            f"got {alpha!r}", param)
    fields = set(LoraConfig.__dataclass_fields__)
    known = {k: v for k, v in config.items() if k in fields}
    try:
        LoraConfig(**known)
    except (TypeError, ValueError) as exc:
        raise ImportRefused(f"{CONFIG_FILE}: not a valid peft LoraConfig: {exc}", param) from None
    return config


def base_shapes(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """{HF weight name → shape (out, in)} of a registered base, read from headers only.

    An HF folder: its safetensors headers. A .gguf file: its tensor infos, named back to HF
    names through llama.cpp's table (so the adapter's module names can be looked up)."""
    path = Path(model_path)
    if path.is_file():
        import gguf

        reader = gguf.GGUFReader(str(path))
        out = {}
        for t in reader.tensors:
            # GGUF lists dimensions innermost first: (in, out) → (out, in).
            out[t.name] = tuple(int(d) for d in reversed(list(t.shape)))
        return out
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                out[key] = tuple(st.get_slice(key).get_shape())
    return out


def gguf_base_config(model_path: str | Path) -> dict[str, Any]:
    """The few HF config fields the tensor-name table needs, from a .gguf file's metadata."""
    import gguf

    reader = gguf.GGUFReader(str(model_path))
    arch = reader.fields["general.architecture"].contents()
    cfg: dict[str, Any] = {"model_type": arch}
    for hf, key in (("num_hidden_layers", "block_count"),
                    ("num_attention_heads", "attention.head_count"),
                    ("num_key_value_heads", "attention.head_count_kv")):
        field = reader.fields.get(f"{arch}.{key}")
        if field is not None:
            cfg[hf] = int(field.contents())
    return cfg


def _lookup(name: str, shapes: dict[str, tuple[int, ...]], gguf_names: Optional[dict[str, str]]
            ) -> Optional[tuple[int, ...]]:
    if gguf_names is not None:
        key = gguf_names.get(name)
        return shapes.get(key) if key else None
    for key in (f"{name}.weight", f"model.{name}.weight"):
        if key in shapes:
            return shapes[key]
    return None


def check_adapter(folder: str | Path, *, model_path: str | Path,
                  base_config: Optional[dict[str, Any]] = None) -> Any:
    """Validate the unpacked PEFT folder against the registered base at `model_path`; returns
    the `LoadedAdapter`. `base_config` (the base's HF config) is needed for a .gguf base."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImportRefused(f"{CONFIG_FILE} is not valid JSON: {exc}", CONFIG_FILE) from None
    check_config(config)
    if not (folder / METADATA_FILE).exists():
        (folder / METADATA_FILE).write_text("{}")  # load_adapter wants one; the API rewrites it
    try:
        adapter = load_adapter(folder)
    except MergeError as exc:
        raise ImportRefused(str(exc).replace(f"{folder}/", "").replace(str(folder), "adapter"),
                            WEIGHTS_FILE) from None
    shapes = base_shapes(model_path)
    gguf_names = None
    if Path(model_path).is_file():
        from .export_gguf import gguf_tensor_names

        try:
            gguf_names = gguf_tensor_names(sorted(adapter.modules),
                                           base_config or gguf_base_config(model_path))
        except MergeError as exc:
            raise ImportRefused(f"{exc}", WEIGHTS_FILE) from None
    for name, mod in sorted(adapter.modules.items()):
        if mod.embedding:
            raise ImportRefused(f"module {name!r}: embedding adapters cannot be imported",
                                WEIGHTS_FILE)
        shape = _lookup(name, shapes, gguf_names)
        if shape is None:
            raise ImportRefused(f"module {name!r} does not exist in the base model",
                                "target_modules")
        out_f, in_f = shape[0], shape[-1]
        if mod.A.shape[1] != in_f or mod.B.shape[0] != out_f:
            raise ImportRefused(
                f"module {name!r}: lora_A is {tuple(mod.A.shape)} and lora_B is "
                f"{tuple(mod.B.shape)}, but the base layer is {out_f}x{in_f} (out x in): this "
                "adapter was trained for another model", WEIGHTS_FILE)
    return adapter
