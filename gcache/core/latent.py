"""Prefill, latent rollout, decoding and teacher-forced scoring over a model's step functions.

The core never sees a transformers object: the shell wraps a model into a
``ModelFns`` (embedding, backbone forward, lm_head, and conversion of the
model's own cache object to and from ``KVCache``). The model-native cache is
grown in place by the backbone during a rollout or a decode loop, and turned
into a ``KVCache`` once, at the end; the caller's inputs are never mutated.

Batches are LEFT padded: ``attention_mask`` [B, S] is False (0) on a prefix of
each row and True (1) after it, so that every row's last position is a real
token. Each row's real tokens take the RoPE positions ``cache.next_pos[b]``,
``cache.next_pos[b] + 1``, ...; pads attend nowhere that matters and are never
attended, so a batch gives, row by row, the results of running each row alone.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from gcache.core.cache import KVCache, select_rows, validate
from gcache.core.realign import Realign, apply_realign

State = Any  # a model-native cache (transformers' DynamicCache in the shell), grown in place


class ModelFns(NamedTuple):
    """What the core needs of a causal LM; built by the shell (gcache.io.hf.model_fns).

    embed(input_ids [B, S]) -> [B, S, d]
    forward(inputs_embeds [B, S, d], attention_mask [B, T+S] bool, position_ids [B, S], state)
        -> (last_hidden [B, S, d] after the final norm, state holding T+S positions);
        attention_mask None means every position is real, position_ids None means the
        new positions continue at the state's length (both only when that is true)
    logits(hidden [..., d]) -> [..., V]
    to_state(cache: KVCache | None) -> state (None: an empty state); may share the cache's storage
        but must never write into it
    from_state(state, mask [B, T'] bool, next_pos [B]) -> KVCache of the state's last T' positions
    """

    embed: Callable[[Tensor], Tensor]
    forward: Callable[[Tensor, Tensor, Tensor, State], tuple[Tensor, State]]
    logits: Callable[[Tensor], Tensor]
    to_state: Callable[[KVCache | None], State]
    from_state: Callable[[State, Tensor, Tensor], KVCache]
    num_layers: int
    num_heads: int  # key/value heads
    head_dim: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device


class Prefill(NamedTuple):
    """A prompt read on top of a cache; ``state`` is model-native and owned by whoever holds this."""

    hidden: Tensor  # [B, S, d] last hidden states of the prompt positions
    state: State  # T + S positions
    mask: Tensor  # [B, T + S] bool
    next_pos: Tensor  # [B] long


class Rollout(NamedTuple):
    """Result of ``rollout``."""

    cache: KVCache  # incoming + prompt + latent positions, or the latent positions only
    prompt_tokens: Tensor  # [B] long, real (non-pad) prompt tokens per row
    latent_tokens: int  # latent positions appended to every row (= latent_steps)
    hidden: Tensor  # [B, d] last hidden state of the last position (not yet fed back)


class Generation(NamedTuple):
    """Result of ``generate``.

    tokens[b, :lengths[b]] is row b's answer; EOS is NOT counted in ``lengths``.
    When a row stopped at EOS, tokens[b, lengths[b]] is that EOS token; every
    later slot holds ``pad_token_id``. A row ended by ``generate``'s ``stop`` rule
    keeps (and counts) the token after which the rule fired. ``cache`` holds the
    incoming cache, the prompt and exactly the answer tokens tokens[b, :lengths[b]]
    (EOS and what follows are masked out), so its next_pos is where a continuation goes.
    """

    tokens: Tensor  # [B, N] long, N <= max_new_tokens
    lengths: Tensor  # [B] long, generated tokens per row, EOS excluded
    stopped: Tensor  # [B] bool, True where the row ended before max_new_tokens (EOS or the stop rule)
    cache: KVCache


# --------------------------------------------------------------------------- checks


def _check_prompt(fns: ModelFns, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Validate a left-padded prompt batch; returns the mask as bool [B, S]."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a tensor [B, S], got {shape}")
    if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected shape [B, S] = {tuple(input_ids.shape)} like input_ids, got {shape}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty prompt [B, S] with B, S > 0, got {tuple(input_ids.shape)}")
    mask = attention_mask.to(torch.bool)
    real = mask.sum(dim=1)
    if bool((real == 0).any()):
        rows = (real == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask: expected at least one real token in every row, rows {rows} have none")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask: expected LEFT padding (False/0 only before a row's first real token)")
    if input_ids.device != fns.device:
        raise ValueError(f"input_ids: expected device {fns.device} (the model's), got {input_ids.device}")
    return mask


def _check_cache(fns: ModelFns, cache: KVCache, batch: int) -> None:
    validate(cache, "cache")
    want = (fns.num_layers, batch, fns.num_heads, fns.head_dim)
    got = (cache.num_layers, cache.batch_size, cache.num_heads, cache.head_dim)
    if got != want:
        raise ValueError(
            f"cache: expected [L, B, H, *, D] = [{want[0]}, {want[1]}, {want[2]}, *, {want[3]}] "
            f"(the model's layers, KV heads, head dim and the prompt's batch), got {tuple(cache.keys.shape)}"
        )
    if cache.keys.dtype != fns.dtype:
        raise ValueError(f"cache: expected dtype {fns.dtype} (the model's), got {cache.keys.dtype}")
    if cache.keys.device != fns.device:
        raise ValueError(f"cache: expected device {fns.device} (the model's), got {cache.keys.device}")


# --------------------------------------------------------------------------- steps


def prefill(
    fns: ModelFns,
    input_ids: Tensor,  # [B, S]
    attention_mask: Tensor,  # [B, S]
    *,
    cache: KVCache | None = None,
) -> Prefill:
    """Read a left-padded prompt on top of an optional cache.

    Real tokens of row b take positions cache.next_pos[b], +1, ...; the attention
    mask covers the cache's positions and the prompt's. Raises ValueError on an
    empty prompt, a row without real tokens, right padding, or a cache whose
    layers, heads, head dim, batch, dtype or device do not match.
    """
    mask = _check_prompt(fns, input_ids, attention_mask)
    batch = input_ids.shape[0]
    if cache is not None:
        _check_cache(fns, cache, batch)
        start, past_mask = cache.next_pos, cache.mask
    else:
        start = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        past_mask = torch.zeros(batch, 0, dtype=torch.bool, device=input_ids.device)
    offsets = mask.long().cumsum(dim=1) - 1  # [B, S], -1 on left pads
    # Pads get the row's first position: any value works (they are masked), this one keeps RoPE in range.
    position_ids = start[:, None] + offsets.clamp_min(0)  # [B, S]
    full_mask = torch.cat([past_mask, mask], dim=1)  # [B, T + S]
    hidden, state = fns.forward(fns.embed(input_ids), full_mask, position_ids, fns.to_state(cache))
    return Prefill(hidden, state, full_mask, start + mask.sum(dim=1))


def latent_step(
    fns: ModelFns,
    realign: Realign,
    hidden: Tensor,  # [B, d]
    state: State,
    attention_mask: Tensor | None,  # [B, T + 1] bool, covering the state and the new position
    position_ids: Tensor | None,  # [B, 1]
) -> tuple[Tensor, State]:
    """Feed the realigned hidden state as the next input embedding; returns (new last hidden [B, d], state).

    One backbone forward of one position plus one [d, d] product: no lm_head, no
    intermediate hidden states. The state grows by one position in place.
    attention_mask and position_ids may be None when every position is real and
    every row's next position is the state's length (see ModelFns.forward).
    """
    embeds = apply_realign(realign, hidden)[:, None, :]  # [B, 1, d]
    out, state = fns.forward(embeds, attention_mask, position_ids, state)
    return out[:, -1], state


def rollout(
    fns: ModelFns,
    realign: Realign,
    input_ids: Tensor,  # [B, S]
    attention_mask: Tensor,  # [B, S]
    *,
    cache: KVCache | None = None,
    latent_steps: int,
    latent_only: bool = False,
) -> Rollout:
    """Prefill the prompt on top of ``cache``, then run ``latent_steps`` latent steps.

    Each step feeds the realigned last hidden state back as the next input
    embedding at the row's next position. Returns the cache of the incoming
    positions, the prompt and the latent positions, or with ``latent_only`` the
    last ``latent_steps`` positions alone (next_pos kept, so a reader continues
    after them). latent_steps == 0 is a plain prefill. Raises ValueError on
    latent_steps < 0 and on the prompt or cache errors of ``prefill``.
    """
    if not isinstance(latent_steps, int) or isinstance(latent_steps, bool) or latent_steps < 0:
        raise ValueError(f"latent_steps: expected a non-negative integer, got {latent_steps!r}")
    pre = prefill(fns, input_ids, attention_mask, cache=cache)
    batch, past = pre.mask.shape
    # One mask for every step, sliced per step, so the loop allocates nothing for it.
    mask = torch.cat([pre.mask, pre.mask.new_ones(batch, latent_steps)], dim=1)  # [B, T + S + steps]
    hidden, state = pre.hidden[:, -1], pre.state
    # Without padding and with positions that continue at the cache's length (one unsliced
    # prompt, the common case) the model's defaults are exact, and skipping the explicit
    # mask and positions makes a latent step cost what a bare forward costs.
    dense = bool(pre.mask.all()) and bool((pre.next_pos == past).all())
    for i in range(latent_steps):
        step_mask = None if dense else mask[:, : past + i + 1]
        step_pos = None if dense else (pre.next_pos + i)[:, None]
        hidden, state = latent_step(fns, realign, hidden, state, step_mask, step_pos)
    next_pos = pre.next_pos + latent_steps
    kept = mask[:, past:] if latent_only else mask
    out = fns.from_state(state, kept, next_pos)
    return Rollout(out, attention_mask.to(torch.bool).sum(dim=1), latent_steps, hidden)


def _check_stop(done: Any, batch: int) -> Tensor:
    if not isinstance(done, Tensor) or done.shape != (batch,):
        shape = tuple(done.shape) if isinstance(done, Tensor) else type(done).__name__
        raise ValueError(f"stop: expected the rule to return a [B] = ({batch},) bool tensor, got {shape}")
    return done.to(torch.bool)


def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """One token per row from logits [B, V]: argmax when temperature == 0, else nucleus sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    fns: ModelFns,
    input_ids: Tensor,  # [B, S]
    attention_mask: Tensor,  # [B, S]
    *,
    cache: KVCache | None = None,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    pad_token_id: int | None = None,
    stop: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Generation:
    """Decode up to ``max_new_tokens`` tokens per row after the prompt (read on top of ``cache``).

    Greedy when temperature == 0; otherwise samples from softmax(logits / temperature)
    restricted to the top_p nucleus, drawing with ``generator`` (seeded, reproducible).
    A row stops at its first token in ``eos_token_ids``; the loop stops when every
    row has. ``stop(tokens, running) -> done``, when given, is called after each step
    with the tokens decoded so far ([B, n] long, to be read, not written) and the rows
    still running ([B] bool); a running row where ``done`` ([B] bool) is True ends
    after that step's token, which it keeps (for example once an answer line is
    complete). See ``Generation`` for what the result holds. pad_token_id (default:
    the first EOS id, else 0) fills slots after a row's end. Raises ValueError on
    max_new_tokens < 0, temperature < 0, top_p outside (0, 1], a ``stop`` result that
    is not a [B] tensor, and the errors of ``prefill``.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    eos_ids = [int(t) for t in eos_token_ids]
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    pre = prefill(fns, input_ids, attention_mask, cache=cache)
    batch, past = pre.mask.shape
    device = input_ids.device
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    mask = torch.cat([pre.mask, pre.mask.new_zeros(batch, max_new_tokens)], dim=1)  # [B, T + S + N]
    running = torch.ones(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    ended_by_rule = torch.zeros(batch, dtype=torch.bool, device=device)
    state, next_pos = pre.state, pre.next_pos
    logits = fns.logits(pre.hidden[:, -1])  # [B', V] for the rows the state holds
    # The state holds the batch rows ``rows`` (all at first). Once half of them have ended,
    # the ended ones are taken out (their caches set aside in ``parked``), so that a long
    # answer does not make every finished row pay for each of its steps.
    rows = torch.arange(batch, device=device)
    parked: list[tuple[Tensor, KVCache]] = []
    fed = 0  # answer slots read back by the model
    for step in range(max_new_tokens):
        token = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
        token[rows] = _sample(logits, temperature, top_p, generator)
        token = torch.where(running, token, torch.full_like(token, pad_token_id))
        at_eos = running & torch.isin(token, eos)
        tokens[:, step] = token
        running = running & ~at_eos
        lengths += running.long()
        if not bool(running.any()):
            break
        # Rows the stop rule ends keep this token: it is read back with the others below.
        done = _check_stop(stop(tokens[:, : step + 1], running), batch) & running if stop is not None else None
        held = running[rows]
        if 2 * int(held.sum()) <= rows.numel():
            kept = fns.from_state(state, mask[rows, : past + fed], next_pos[rows])
            parked.append((rows[~held], select_rows(kept, (~held).nonzero().flatten())))
            state = fns.to_state(select_rows(kept, held.nonzero().flatten()))
            rows = rows[held]
        # Read the token back even on the last step, so the cache holds every answer token.
        mask[:, past + step] = running
        hidden, state = fns.forward(
            fns.embed(token[rows][:, None]), mask[rows, : past + step + 1], next_pos[rows][:, None], state
        )
        fed = step + 1
        next_pos = next_pos + running.long()
        if done is not None:
            ended_by_rule |= done
            running = running & ~done
            if not bool(running.any()):
                break
        if step + 1 < max_new_tokens:
            logits = fns.logits(hidden[:, -1])
    at_eos_end = ~running & ~ended_by_rule  # these rows hold their EOS token after the answer
    stopped = ~running
    width = int((lengths + at_eos_end.long()).max()) if max_new_tokens else 0
    out = fns.from_state(state, mask[rows, : past + fed], next_pos[rows])
    if parked:
        out = _unpark(out, rows, parked, mask[:, : past + fed], next_pos)
    return Generation(tokens[:, :width].clone(), lengths, stopped, out)


def _unpark(out: KVCache, rows: Tensor, parked: list[tuple[Tensor, KVCache]], mask: Tensor, next_pos: Tensor) -> KVCache:
    """Reassemble the whole batch's cache from the rows still held and the parked ones.

    A parked cache ends where its rows stopped; it is extended on the right with zero
    keys and values, which ``mask`` (all rows, every column) marks as not attended.
    """
    width = mask.shape[1]
    keys, values, order = [out.keys], [out.values], [rows]
    for ids, c in parked:
        pad = width - c.seq_len
        keys.append(torch.cat([c.keys, c.keys.new_zeros(*c.keys.shape[:3], pad, c.keys.shape[4])], dim=3))
        values.append(torch.cat([c.values, c.values.new_zeros(*c.values.shape[:3], pad, c.values.shape[4])], dim=3))
        order.append(ids)
    back = torch.argsort(torch.cat(order))
    return KVCache(torch.cat(keys, dim=1)[:, back], torch.cat(values, dim=1)[:, back], mask.clone(), next_pos.clone())


def sequence_logprob(
    fns: ModelFns,
    cache: KVCache | None,
    input_ids: Tensor,  # [B, S]
    attention_mask: Tensor,  # [B, S]
    target_mask: Tensor,  # [B, S] bool
) -> Tensor:  # [B]
    """Sum over target positions of log p(input_ids[b, s] | cache, input_ids[b, :s]), teacher-forced.

    Differentiable with respect to cache.keys and cache.values (the model's
    weights are the caller's to freeze). A target at position 0 has no
    predicting position in the prompt and raises ValueError, as do targets on
    padding and the errors of ``prefill``.
    """
    mask = _check_prompt(fns, input_ids, attention_mask)
    if not isinstance(target_mask, Tensor) or target_mask.shape != input_ids.shape:
        shape = tuple(target_mask.shape) if isinstance(target_mask, Tensor) else type(target_mask).__name__
        raise ValueError(f"target_mask: expected shape [B, S] = {tuple(input_ids.shape)} like input_ids, got {shape}")
    target = target_mask.to(torch.bool)
    if bool(target[:, 0].any()):
        raise ValueError("target_mask: position 0 cannot be a target (no earlier prompt position predicts it)")
    if bool((target & ~mask).any()):
        raise ValueError("target_mask: expected targets on real tokens only, got targets on padding")
    pre = prefill(fns, input_ids, mask, cache=cache)
    # Only the positions that predict a target go through lm_head: [N, d] -> [N, V].
    predicts = target[:, 1:]  # [B, S-1]
    logits = fns.logits(pre.hidden[:, :-1][predicts]).float()  # [N, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:][predicts][:, None]).squeeze(-1)  # [N]
    rows = predicts.nonzero()[:, 0]  # [N]
    return torch.zeros(input_ids.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


__all__ = [
    "Generation",
    "ModelFns",
    "Prefill",
    "Rollout",
    "State",
    "generate",
    "latent_step",
    "prefill",
    "rollout",
    "sequence_logprob",
]
