"""Conversion between gcache's KVCache state and transformers' Cache API, and the ModelFns of a model."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from gcache.core.cache import KVCache
from gcache.core.latent import ModelFns, StaticFns

FLOAT_LOGITS_CHUNK = 2**25  # lm_head elements widened to float32 at once (128 MiB)


def to_dynamic_cache(cache: KVCache) -> DynamicCache:
    """A plain transformers DynamicCache holding the cache's per-layer keys and values.

    Autograd flows through: a loss computed from a forward on this cache reaches
    ``cache.keys`` and ``cache.values``. A forward appends with torch.cat, so the
    KVCache's tensors are never written.
    """
    return DynamicCache(ddp_cache_data=[(cache.keys[i], cache.values[i]) for i in range(cache.num_layers)])


def from_dynamic_cache(dc: DynamicCache, mask: Tensor, next_pos: Tensor) -> KVCache:
    """Stack a DynamicCache's layers into a KVCache. mask: [B, T] bool, next_pos: [B] long."""
    keys = torch.stack([layer.keys for layer in dc.layers])
    values = torch.stack([layer.values for layer in dc.layers])
    return KVCache(keys, values, mask.to(torch.bool), next_pos.to(torch.long))


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into spare capacity instead of re-concatenating every step.

    DynamicLayer copies a layer's whole cache on every appended token (torch.cat), which
    at batch 8 and ~900 cached positions was 45% of a decode step on two CPU cores. This
    layer keeps a buffer with room for ``max(256, length // 4)`` more positions, writes new
    keys and values into it and exposes views of the filled part; it reallocates only
    when the room runs out or when ``keys`` no longer views the buffer (after a beam
    reorder or a batch selection). Tensors given to ``update`` are copied, never aliased:
    a KVCache read into a state is not written.

    When autograd would record the write (grad mode on and the new or the held states
    require grad), it falls back to DynamicLayer's concatenation, so losses through a
    cache keep their gradients.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad or self.keys.requires_grad):
            self._key_buffer = self._value_buffer = None
            return super().update(key_states, value_states, *args, **kwargs)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not self._fits(key_states, needed):
            batch, heads, _, _ = key_states.shape
            capacity = needed + max(256, needed // 4)
            keys = key_states.new_empty(batch, heads, capacity, key_states.shape[-1])
            values = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])
            if length:
                keys[:, :, :length].copy_(self.keys)
                values[:, :, :length].copy_(self.values)
            self._key_buffer, self._value_buffer = keys, values
        self._key_buffer[:, :, length:needed].copy_(key_states)
        self._value_buffer[:, :, length:needed].copy_(value_states)
        self.keys = self._key_buffer[:, :, :needed]
        self.values = self._value_buffer[:, :, :needed]
        return self.keys, self.values

    def _fits(self, key_states: Tensor, needed: int) -> bool:
        """Whether the buffer exists, still backs ``keys`` and ``values``, matches the new states and has room."""
        kb, vb = self._key_buffer, self._value_buffer
        if kb is None or vb is None or needed > kb.shape[-2]:
            return False
        if kb.shape[:2] != key_states.shape[:2] or kb.dtype != key_states.dtype or kb.device != key_states.device:
            return False
        if self.get_seq_length() == 0:
            return True
        return (
            self.keys.data_ptr() == kb.data_ptr()
            and self.values.data_ptr() == vb.data_ptr()
            and self.keys.stride() == kb.stride()
            and self.values.stride() == vb.stride()
        )

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def growing_cache(config=None, layers: list[tuple[Tensor, Tensor]] | None = None) -> DynamicCache:
    """A DynamicCache whose full-attention layers are GrowingLayers, optionally filled with copies of ``layers``.

    With ``config``, layer types follow the model (sliding-window layers stay transformers' own);
    without, every layer is a GrowingLayer.
    """
    if config is not None:
        state = DynamicCache(config=config)
        state.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in state.layers]
        if not state.layers:
            state.layer_class_to_replicate = GrowingLayer
    else:
        state = DynamicCache()
        state.layer_class_to_replicate = GrowingLayer
    for i, (keys, values) in enumerate(layers or []):
        while len(state.layers) <= i:
            state.layers.append(GrowingLayer())
        state.layers[i].update(keys, values)
    return state


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack of a causal LM (``model.model`` for Llama/Qwen3), whose output is already normed."""
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    return model.get_decoder()


def _layer_devices(model: PreTrainedModel) -> list[torch.device]:
    """The device of each decoder layer (one device unless a device map spreads them)."""
    config = model.config.get_text_config(decoder=True)
    layers = getattr(backbone(model), "layers", None)
    if layers is not None and len(layers) == config.num_hidden_layers:
        return [next(layer.parameters()).device for layer in layers]
    return [model.get_input_embeddings().weight.device] * config.num_hidden_layers


def bucket_capacity(columns: int) -> int:
    """The smallest of 256, 384, 512, 768, 1024, 1536, ... (powers of two and 1.5x between them)
    holding ``columns``: a compiled step then sees a few capacities, at most 1.5x the columns needed
    past 256. Raises ValueError for a negative count."""
    if columns < 0:
        raise ValueError(f"columns: expected a count >= 0, got {columns}")
    size = 256
    while size < columns:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def static_fns(model: PreTrainedModel, *, compile: bool = False, reuse: bool | None = None) -> StaticFns:
    """The core's static decode step over a transformers StaticCache (see gcache.core.latent.StaticFns).

    ``compile``: the step runs under ``torch.compile`` (on CUDA in ``"reduce-overhead"`` mode, which
    replays CUDA graphs), over capacities rounded up by ``bucket_capacity``, so that batches of
    other lengths reuse the compiled step (it compiles once per batch size and capacity).
    ``reuse`` (default: ``compile``): one StaticCache is kept per batch size, capacity, dtype and
    device and refilled by each ``init`` (zeroed, then the incoming cache copied in): CUDA graphs
    replay on fixed addresses. The states of two decodes running at once would then collide: a
    shell that decodes concurrently builds a step per thread. ``to_cache`` copies out, so what
    a decode returns does not change with the next one.
    Raises ValueError for a model whose cache has layers other than full attention (sliding
    windows keep the dynamic path).
    """
    body = backbone(model)
    devices = _layer_devices(model)
    home = model.get_input_embeddings().weight.device
    if any(type(layer) is not StaticLayer for layer in StaticCache(config=model.config, max_cache_len=1).layers):
        raise ValueError(f"model: static decoding needs full-attention layers only, {type(model).__name__} has others")
    kept: dict[tuple, StaticCache] = {}
    reuse = compile if reuse is None else reuse

    def fresh(capacity: int) -> StaticCache:
        return StaticCache(config=model.config, max_cache_len=capacity)

    def init(cache: KVCache, capacity: int) -> StaticCache:
        if capacity < cache.seq_len:
            raise ValueError(f"capacity: expected at least the cache's {cache.seq_len} positions, got {capacity}")
        key = (cache.batch_size, capacity, cache.keys.dtype, cache.keys.device)
        if reuse and key not in kept:
            kept[key] = fresh(capacity)
        state = kept[key] if reuse else fresh(capacity)
        if state.is_initialized:
            state.reset()  # zeroes the keys, values and lengths in place: the addresses stay
        for layer, dev, keys, values in zip(state.layers, devices, cache.keys, cache.values):
            layer.update(keys.to(dev), values.to(dev))  # copied into columns [0, T)
        return state

    def step(embeds: Tensor, mask: Tensor, position_ids: Tensor, state: StaticCache) -> tuple[Tensor, StaticCache]:
        out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=state, use_cache=True)
        return out.last_hidden_state.to(home), out.cache  # see model_fns: the backbone's output is on its last layer's device

    def to_cache(state: StaticCache, mask: Tensor, next_pos: Tensor) -> KVCache:
        width = mask.shape[1]
        keys = torch.stack([layer.keys[:, :, :width].to(home) for layer in state.layers])
        values = torch.stack([layer.values[:, :, :width].to(home) for layer in state.layers])
        return KVCache(keys, values, mask.to(torch.bool), next_pos.to(torch.long))

    if not compile:
        return StaticFns(init, step, to_cache)
    mode = "reduce-overhead" if home.type == "cuda" else None  # CUDA graphs; elsewhere the default mode
    return StaticFns(init, torch.compile(step, mode=mode), to_cache, bucket_capacity)


def model_fns(model: PreTrainedModel, *, static: bool = False, compile: bool = False) -> ModelFns:
    """Wrap a transformers causal LM into the core's ModelFns.

    The forward calls the backbone (no lm_head, no intermediate hidden states)
    with explicit positions and a 2D mask over cache + new positions, and lets
    transformers build the 4D mask. States are DynamicCaches of GrowingLayers
    (appends in place, no per-token copy of the whole cache); with a device map
    spread over several devices, each layer's keys and values go to that layer's
    device and a KVCache is gathered on the embedding's device. ``static`` (implied by
    ``compile``) decodes with ``static_fns``.
    """
    config = model.config.get_text_config(decoder=True)
    body = backbone(model)
    embedding = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"model: expected a causal LM with an lm_head, got {type(model).__name__}")
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    device = embedding.weight.device
    layer_devices = _layer_devices(model)

    def embed(input_ids: Tensor) -> Tensor:  # [B, S] -> [B, S, d]
        return embedding(input_ids)

    # Under a device map, accelerate moves a module's output back only at the top-level model, whose
    # forward these functions skip: the backbone's output stays on its last layer's device and the
    # lm_head's on the lm_head's. Both come back to the embedding's device, where the core keeps
    # masks, positions, tokens and the realignment (a no-op on one device).
    def forward(embeds: Tensor, mask: Tensor, position_ids: Tensor, state: DynamicCache) -> tuple[Tensor, DynamicCache]:
        out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=state, use_cache=True)
        return out.last_hidden_state.to(device), out.cache

    def logits(hidden: Tensor) -> Tensor:  # [..., d] -> [..., V]
        return lm_head(hidden).to(device)

    def float_logits(hidden: Tensor) -> Tensor:  # [N, d] -> [N, V] float32
        weight, bias = lm_head.weight, lm_head.bias
        h = hidden.to(weight.device, torch.float32)
        chunk = max(1, FLOAT_LOGITS_CHUNK // weight.shape[1])  # vocabulary rows widened to float32 at a time

        def part(h: Tensor, lo: int) -> Tensor:
            out = h @ weight[lo : lo + chunk].float().T
            return out if bias is None else out + bias[lo : lo + chunk].float()

        # Recomputed in the backward pass, so no float32 copy of the lm_head is kept for it.
        keep = torch.is_grad_enabled() and h.requires_grad
        parts = [checkpoint(part, h, lo, use_reentrant=False) if keep else part(h, lo) for lo in range(0, weight.shape[0], chunk)]
        return torch.cat(parts, dim=-1).to(device)

    def to_state(cache: KVCache | None) -> DynamicCache:
        if cache is None:
            return growing_cache(config=model.config)
        return growing_cache(layers=[(cache.keys[i].to(dev), cache.values[i].to(dev)) for i, dev in enumerate(layer_devices)])

    def from_state(state: DynamicCache, mask: Tensor, next_pos: Tensor) -> KVCache:
        keep = mask.shape[1]
        keys, values = [], []
        for layer in state.layers:
            total = layer.keys.shape[-2]
            keys.append(layer.keys[:, :, total - keep :].to(device))
            values.append(layer.values[:, :, total - keep :].to(device))
        return KVCache(torch.stack(keys), torch.stack(values), mask.to(torch.bool), next_pos.to(torch.long))

    return ModelFns(
        embed=embed,
        forward=forward,
        logits=logits,
        to_state=to_state,
        from_state=from_state,
        num_layers=config.num_hidden_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        dtype=embedding.weight.dtype,
        device=device,
        static=static_fns(model, compile=compile) if static or compile else None,
        float_logits=float_logits if type(lm_head) is torch.nn.Linear and lm_head.weight.dtype != torch.float32 else None,
    )
