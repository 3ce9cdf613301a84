"""Conversion between gcache's KVCache state and transformers' Cache API, and the ModelFns of a model."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from gcache.core.cache import KVCache
from gcache.core.latent import ModelFns


def to_dynamic_cache(cache: KVCache) -> DynamicCache:
    """A DynamicCache holding views of the cache's per-layer keys and values (no copy).

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


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack of a causal LM (``model.model`` for Llama/Qwen3), whose output is already normed."""
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    return model.get_decoder()


def model_fns(model: PreTrainedModel) -> ModelFns:
    """Wrap a transformers causal LM into the core's ModelFns.

    The forward calls the backbone (no lm_head, no intermediate hidden states)
    with explicit positions and a 2D mask over cache + new positions, and lets
    transformers build the 4D mask. States are DynamicCaches; with a device map
    spread over several devices, each layer's keys and values go to that layer's
    device and a KVCache is gathered on the embedding's device.
    """
    config = model.config.get_text_config(decoder=True)
    body = backbone(model)
    embedding = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"model: expected a causal LM with an lm_head, got {type(model).__name__}")
    num_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    device = embedding.weight.device
    layers = getattr(body, "layers", None)
    if layers is not None and len(layers) == config.num_hidden_layers:
        layer_devices = [next(layer.parameters()).device for layer in layers]
    else:
        layer_devices = [device] * config.num_hidden_layers

    def embed(input_ids: Tensor) -> Tensor:  # [B, S] -> [B, S, d]
        return embedding(input_ids)

    def forward(embeds: Tensor, mask: Tensor, position_ids: Tensor, state: DynamicCache) -> tuple[Tensor, DynamicCache]:
        out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=state, use_cache=True)
        return out.last_hidden_state, out.cache

    def logits(hidden: Tensor) -> Tensor:  # [..., d] -> [..., V]
        return lm_head(hidden)

    def to_state(cache: KVCache | None) -> DynamicCache:
        if cache is None:
            return DynamicCache(config=model.config)
        return DynamicCache(
            ddp_cache_data=[
                (cache.keys[i].to(dev), cache.values[i].to(dev)) for i, dev in enumerate(layer_devices)
            ]
        )

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
        num_heads=num_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        dtype=embedding.weight.dtype,
        device=device,
    )
