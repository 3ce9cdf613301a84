"""Model loading: the embedded model's safetensors copy, tiny random models, chat encoding, bad input."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from gcache.io.models import local as models
from gcache.io.models.local import (
    LocalModel,
    cache_dir,
    decode_text,
    embedded_copy_dir,
    embedded_gguf,
    encode_chat,
    load_model,
    tiny_model,
)

NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny() -> LocalModel:
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def embedded() -> LocalModel:
    return load_model("smollm2-135m")


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_model_is_seeded_frozen_and_reads_real_prompts(arch):
    state = torch.random.get_rng_state()
    a, b, c = tiny_model(arch, seed=1), tiny_model(arch, seed=1), tiny_model(arch, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    wa, wb, wc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert all(not p.requires_grad for p in a.model.parameters()) and not a.model.training
    cfg = a.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (2, 64, 49152)
    assert len(a.tokenizer) == 49152 and a.dtype == torch.float32
    assert a.fns.num_layers == 2 and a.fns.num_kv_heads == 2 and a.fns.head_dim == 16
    ids, mask = a.encode_chat([[{"role": "user", "content": "Hello there"}]])
    assert bool(mask.all()) and int(ids.max()) < 49152
    assert tiny_model(arch, num_hidden_layers=3).fns.num_layers == 3


def test_tiny_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match=r"arch: expected one of \['llama', 'qwen3'\], got 'gpt2'"):
        tiny_model("gpt2")


# --------------------------------------------------------------------------- chat encoding


def test_encode_chat_left_pads_and_matches_single_encoding(tiny):
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is the capital of France?"}],
    ]
    ids, mask = encode_chat(tiny, convs)
    assert ids.shape == mask.shape and mask.dtype == torch.bool
    for b, conv in enumerate(convs):
        one, one_mask = encode_chat(tiny, [conv])
        n = one.shape[1]
        assert bool(one_mask.all()) and int(mask[b].sum()) == n
        assert torch.equal(ids[b, -n:], one[0])
        assert not bool(mask[b, : ids.shape[1] - n].any())
    text = tiny.tokenizer.decode(ids[1][mask[1]])
    assert "Be terse." in text and "capital of France" in text and text.rstrip().endswith("assistant")
    no_prompt, _ = encode_chat(tiny, convs[:1], add_generation_prompt=False)
    assert no_prompt.shape[1] < encode_chat(tiny, convs[:1])[0].shape[1]


def test_encode_chat_merges_system_when_template_rejects_it(tiny):
    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    lm = dataclasses.replace(tiny, tokenizer=tok)
    conv = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hello."}]
    ids, mask = encode_chat(lm, [conv])
    text = tok.decode(ids[0])
    assert "system" not in text
    assert "<|im_start|>user\nAnswer in French.\n\nSay hello.<|im_end|>" in text
    # without a system message the template is used as is
    ids2, _ = encode_chat(lm, [conv[1:]])
    assert tok.decode(ids2[0]) == "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"


def test_decode_text_cuts_each_row_at_its_length(tiny):
    tok = tiny.tokenizer
    rows = [tok("one two three", add_special_tokens=False)["input_ids"], tok("four", add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows)) + 2
    tokens = torch.full((2, width), tiny.pad_token_id)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.tensor(r)
    assert decode_text(tiny, tokens, torch.tensor([len(r) for r in rows])) == ["one two three", "four"]
    assert tiny.decode_text(tokens, [0, 1]) == ["", "four"]


def test_encode_and_decode_reject_bad_input(tiny):
    with pytest.raises(ValueError, match="conversations"):
        encode_chat(tiny, [])
    with pytest.raises(ValueError, match=r"conversations\[0\]"):
        encode_chat(tiny, [[]])
    with pytest.raises(ValueError, match=r"conversations\[0\]\[0\]"):
        encode_chat(tiny, [[{"role": "user"}]])
    with pytest.raises(ValueError, match="lengths"):
        decode_text(tiny, torch.zeros(2, 3, dtype=torch.long), [1])


# --------------------------------------------------------------------------- loader arguments


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GCACHE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "gcache" / "models"
    monkeypatch.setenv("GCACHE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "models"
    monkeypatch.delenv("GCACHE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "gcache" / "models"


def test_bad_loader_arguments_raise_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"model: expected a known name \['smollm2-135m'\].*'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="model: expected a known name"):
        load_model(str(tmp_path / "missing" / "folder"))
    with pytest.raises(ValueError, match="model: folder .* holds no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"model: could not load 'nobody/nothing-here-42'.*allow_download"):
        load_model("nobody/nothing-here-42")
    with pytest.raises(ValueError, match=r"dtype: expected one of .* got 'fp8'"):
        load_model(dtype="fp8")
    with pytest.raises(ValueError, match=r"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got 'tpu'"):
        load_model(device="tpu")
    with pytest.raises(ValueError, match="threads"):
        load_model(threads=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: 'cuda:1' requested but CUDA is not available"):
            load_model(device="cuda:1")


def test_local_folder_loads_like_the_named_model(tiny, tmp_path):
    folder = tmp_path / "tiny"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    again = load_model(str(folder), dtype="float32")
    ids, mask = tiny.encode_chat([[{"role": "user", "content": "Hi"}]])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, tiny.model(ids).logits)
    assert again.name == str(folder) and again.tokenizer.padding_side == "left"


# --------------------------------------------------------------------------- the embedded model (slow)


@pytest.mark.slow
def test_embedded_copy_holds_the_gguf_weights(embedded):
    """The safetensors copy against the GGUF file dequantized by the gguf package itself."""
    import gguf

    reader = gguf.GGUFReader(str(embedded_gguf()))
    tensors = {t.name: t for t in reader.tensors}
    layers = embedded.model.model.layers
    pairs = [
        ("output_norm.weight", embedded.model.model.norm.weight),
        ("blk.0.ffn_down.weight", layers[0].mlp.down_proj.weight),
        ("blk.29.attn_v.weight", layers[29].self_attn.v_proj.weight),
    ]
    for name, weight in pairs:
        t = tensors[name]
        want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(weight.shape)
        assert torch.equal(weight, want), name
    folder = embedded_copy_dir()
    assert (folder / "config.json").is_file() and not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_embedded_model_is_the_expected_frozen_llama(embedded):
    cfg = embedded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert embedded.dtype == models.CPU_DEFAULT_DTYPE and embedded.device == torch.device("cpu")
    assert embedded.tokenizer.convert_ids_to_tokens(list(embedded.eos_token_ids))[0] == "<|im_end|>"
    assert all(not p.requires_grad for p in embedded.model.parameters()) and not embedded.model.training
    assert torch.allclose(embedded.realign.matrix, torch.eye(576), atol=1e-3)


@pytest.mark.slow
def test_embedded_model_loads_in_bfloat16(embedded):
    half = load_model("smollm2-135m", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.fns.dtype == torch.bfloat16
    ids, mask = half.encode_chat([[{"role": "user", "content": "What is 2+2?"}]])
    from gcache.core.latent import rollout

    r = rollout(half.fns, half.realign, ids, mask, latent_steps=2)
    assert r.cache.keys.dtype == torch.bfloat16 and bool(torch.isfinite(r.cache.keys).all())
