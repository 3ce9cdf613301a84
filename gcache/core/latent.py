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

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from gcache.core.cache import KVCache, select_rows, validate
from gcache.core.checks import check_int
from gcache.core.realign import Realign, apply_realign

State = Any  # a model-native cache (transformers' DynamicCache in the shell), grown in place


class StaticFns(NamedTuple):
    """A decode step over a cache preallocated to the decoding's bound; built by the shell
    (gcache.io.models.hf.static_fns). Its shapes do not change from step to step, so a compiler
    (torch.compile, CUDA graphs) can own ``forward``.

    init(cache: KVCache [L, B, H, T, D], capacity) -> state holding the cache in its first T
        columns, with room for ``capacity`` in all (never writes into ``cache``)
    forward(inputs_embeds [B, 1, d], attention_mask [B, capacity] bool, position_ids [B, 1], state)
        -> (last_hidden [B, 1, d], state): the new position's keys and values go in place to
        the state's next column, the same column for every row
    to_cache(state, mask [B, W] bool, next_pos [B]) -> KVCache of the state's first W columns
    capacity(columns) -> the capacity to allocate for ``columns`` needed (>= columns): the
        identity by default; a compiled step rounds up to a few sizes, so that batches of other
        lengths reuse its graphs (the spare columns are masked)
    """

    init: Callable[[KVCache, int], State]
    forward: Callable[[Tensor, Tensor, Tensor, State], tuple[Tensor, State]]
    to_cache: Callable[[State, Tensor, Tensor], KVCache]
    capacity: Callable[[int], int] = int


class ModelFns(NamedTuple):
    """What the core needs of a causal LM; built by the shell (gcache.io.models.hf.model_fns).

    embed(input_ids [B, S]) -> [B, S, d]
    forward(inputs_embeds [B, S, d], attention_mask [B, T+S] bool, position_ids [B, S], state)
        -> (last_hidden [B, S, d] after the final norm, state holding T+S positions);
        attention_mask None means every position is real, position_ids None means the
        new positions continue at the state's length (both only when that is true)
    logits(hidden [..., d]) -> [..., V]
    forward's hidden states and logits' result are on ``device`` (the core keeps masks, positions,
        tokens and the realignment there), whichever devices the model's layers are spread over
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
    num_kv_heads: int  # key/value heads (fewer than the query heads under grouped-query attention)
    head_dim: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    static: StaticFns | None = None  # when given, ``generate`` decodes with it (no row leaves the batch early)
    decoder: ModelFns | None = None  # when given, ``generate`` decodes with it after this model's prefill
    # (the same architecture with other weights, e.g. int8 linears: its states are this model's)
    # float_logits(hidden [N, d]) -> [N, V] float32, the lm_head's product kept in float32 (not rounded to
    # ``dtype`` first: in bf16 that costs ~0.05-0.1 nat per token at logits of 16-32); ``sequence_logprob``
    # scores with it. None: ``logits(hidden).float()``, exact when ``dtype`` is float32.
    float_logits: Callable[[Tensor], Tensor] | None = None


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


@dataclass(frozen=True)
class Decoding:
    """How to decode an answer; one frozen value handed from the caller to ``generate``.

    max_new_tokens: the most tokens decoded per row (an int >= 0; EOS counts as one).
    temperature: 0 decodes greedily (argmax); > 0 samples from softmax(logits / temperature).
    top_p: sampled decoding keeps the smallest set of most likely tokens whose mass reaches
        top_p (nucleus sampling), in (0, 1]; 1 keeps every token. Ignored when greedy.
    seed: sampled decoding draws from ``torch.Generator(device).manual_seed(seed)`` made
        afresh by each ``generate`` call, so a seed repeats its answers; None means 0.
    stop: ``stop(tokens [B, n] long, running [B] bool) -> done [B] bool``, called after each
        step; a running row where ``done`` is True ends after that step's token, which it
        keeps (see ``generate``). None: rows end at EOS or max_new_tokens only.
    Raises ValueError naming the field on a value out of range, TypeError on a ``stop``
    that is not callable.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampled decoding draws from torch.Generator().manual_seed(seed); None -> 0
    stop: Callable[[Tensor, Tensor], Tensor] | None = None  # the stop(tokens, running) -> done rule

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        check_int(n, "max_new_tokens", 0)
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature: expected a finite number >= 0, got {t!r}")
        p = self.top_p
        if not _is_real(p) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p: expected a number in (0, 1], got {p!r}")
        s = self.seed
        if s is not None and (not isinstance(s, int) or isinstance(s, bool) or not -(2**63) <= s < 2**64):
            raise ValueError(f"seed: expected None or an integer in [-2**63, 2**64), got {s!r}")
        if self.stop is not None and not callable(self.stop):
            raise TypeError(f"stop: expected None or a callable stop(tokens, running) -> done, got {type(self.stop).__name__}")


def _is_real(x: Any) -> bool:
    """A plain real number (int or float, bool excluded)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
    want = (fns.num_layers, batch, fns.num_kv_heads, fns.head_dim)
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
    check_int(latent_steps, "latent_steps", 0)
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


def _generator(decoding: Decoding, device: torch.device) -> torch.Generator | None:
    """The draws of sampled decoding, seeded from ``decoding.seed`` (None: 0) on ``device``; None when greedy."""
    if decoding.temperature == 0.0:
        return None
    return torch.Generator(device=device).manual_seed(0 if decoding.seed is None else decoding.seed)


def decode_one_token(
    fns: ModelFns,
    token: Tensor,  # [B'] long, the token just chosen for each row the state holds
    state: State,
    attention_mask: Tensor,  # [B', T + 1] bool, covering the state and the token's position
    position_ids: Tensor,  # [B'] long, the token's position
    decoding: Decoding,
    generator: torch.Generator | None,
    *,
    sample: bool = True,
    forward: Callable[[Tensor, Tensor, Tensor, State], tuple[Tensor, State]] | None = None,
) -> tuple[Tensor | None, State]:
    """Read ``token`` back (one forward of one position, the state grows by it in place) and,
    when ``sample``, choose each row's next token from the new logits; returns (next [B'] or None, state).
    ``forward`` replaces ``fns.forward`` (a ``StaticFns.forward``, whose mask spans its capacity)."""
    forward = fns.forward if forward is None else forward
    hidden, state = forward(fns.embed(token[:, None]), attention_mask, position_ids[:, None], state)
    if not sample:
        return None, state
    return _sample(fns.logits(hidden[:, -1]), decoding.temperature, decoding.top_p, generator), state


class _Held(NamedTuple):
    """The batch rows the model-native state holds while decoding, and the ended rows set aside."""

    rows: Tensor  # [B'] long, batch indices of the rows in ``state``, ascending
    state: State
    parked: tuple[tuple[Tensor, KVCache], ...]  # (batch indices [b], their cache [L, b, H, T_i, D]) per parking


def _park_ended(fns: ModelFns, held: _Held, running: Tensor, n_still: int, mask: Tensor, next_pos: Tensor) -> _Held:
    """Take the ended rows out of the state once at most half of the held rows still run.

    running: [B] bool; n_still: how many held rows run (read by the loop with its other
    host reads, see ``_host_reads``); mask: [B, T] bool over the state's positions; next_pos:
    [B] long. A long answer then no longer makes every finished row pay for each of its steps.
    """
    if 2 * n_still > held.rows.numel():
        return held
    still = running[held.rows]  # [B']
    kept = fns.from_state(held.state, mask[held.rows], next_pos[held.rows])
    ended = (held.rows[~still], select_rows(kept, (~still).nonzero().flatten()))
    state = fns.to_state(select_rows(kept, still.nonzero().flatten()))
    return _Held(held.rows[still], state, (*held.parked, ended))


def _unpark(out: KVCache, rows: Tensor, parked: Sequence[tuple[Tensor, KVCache]], mask: Tensor, next_pos: Tensor) -> KVCache:
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


class _Answers(NamedTuple):
    """What both decode loops keep per batch row: the tokens so far and which rows still run."""

    tokens: Tensor  # [B, N] long, pad after a row's end
    running: Tensor  # [B] bool
    lengths: Tensor  # [B] long, answer tokens before any EOS
    by_rule: Tensor  # [B] bool, rows the stop rule ended


def _begin(batch: int, steps: int, pad_token_id: int, device: torch.device) -> _Answers:
    return _Answers(
        torch.full((batch, steps), pad_token_id, dtype=torch.long, device=device),
        torch.ones(batch, dtype=torch.bool, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
        torch.zeros(batch, dtype=torch.bool, device=device),
    )


def _emit(ans: _Answers, step: int, token: Tensor, eos: Tensor, pad_token_id: int) -> tuple[_Answers, Tensor]:
    """Write step's token [B] (pad where a row has ended); a row that emits EOS stops. -> (answers, token).
    The token buffer belongs to the loop (``_begin`` made it) and is filled in place: copying it every
    step would cost O(rows x max_new_tokens) per token."""
    token = torch.where(ans.running, token, torch.full_like(token, pad_token_id))
    running = ans.running & ~torch.isin(token, eos)
    ans.tokens[:, step] = token
    return ans._replace(running=running, lengths=ans.lengths + running.long()), token


def _ruled(ans: _Answers, step: int, stop: Any) -> Tensor | None:
    """[B] bool: running rows the stop rule ends after this step's token (None without a rule)."""
    if stop is None:
        return None
    return _check_stop(stop(ans.tokens[:, : step + 1], ans.running), ans.running.shape[0]) & ans.running


def _stopped(ans: _Answers, done: Tensor | None) -> _Answers:
    return ans if done is None else ans._replace(running=ans.running & ~done, by_rule=ans.by_rule | done)


def _host_reads(*values: Tensor) -> list[int]:
    """The loop's per-step scalars, read to the host in one transfer: each read waits for the
    device, so a step makes one (with a stop rule two, besides the rule's own) rather than one
    per question asked of the running rows."""
    return torch.stack([v.long() for v in values]).tolist()


def _goes(ans: _Answers, done: Tensor | None) -> bool:
    """Whether any row runs after this step. Without a stop rule those are the running rows,
    which the caller has just found non-empty: nothing is read."""
    return True if done is None else bool((ans.running & ~done).any())


def _width(ans: _Answers, steps: int) -> int:
    """Columns of ``tokens`` any row used: its answer, plus its EOS where it ended on one."""
    at_eos = ~ans.running & ~ans.by_rule
    return int((ans.lengths + at_eos.long()).max()) if steps else 0


def _decode_static(fns: ModelFns, pre: Prefill, decoding: Decoding, eos: Tensor, pad_token_id: int) -> Generation:
    """The loop on ``fns.static``'s cache preallocated to ``past + max_new_tokens`` columns (rounded up
    by ``static.capacity``): every row stays in the batch to the end, so every step has the same
    shapes (one compiled graph)."""
    static = fns.static
    batch, past = pre.mask.shape
    steps, stop = decoding.max_new_tokens, decoding.stop
    capacity = static.capacity(past + steps)
    if capacity < past + steps:
        raise ValueError(f"fns.static.capacity: expected at least the {past + steps} columns asked for, got {capacity}")
    state = static.init(fns.from_state(pre.state, pre.mask, pre.next_pos), capacity)
    mask = torch.cat([pre.mask, pre.mask.new_zeros(batch, capacity - past)], dim=1)  # [B, capacity]: spare columns masked
    ans, next_pos = _begin(batch, steps, pad_token_id, pre.next_pos.device), pre.next_pos
    logits = fns.logits(pre.hidden[:, -1])  # [B, V]
    generator = _generator(decoding, logits.device)
    chosen = _sample(logits, decoding.temperature, decoding.top_p, generator)  # [B]
    fed = 0  # answer slots read back by the model
    for step in range(steps):
        ans, token = _emit(ans, step, chosen, eos, pad_token_id)
        if not bool(ans.running.any()):
            break
        done = _ruled(ans, step, stop)  # rows the rule ends keep this token: it is read back below
        goes = _goes(ans, done)
        mask[:, past + step] = ans.running  # read back even on the last step: the cache holds every answer token
        chosen, state = decode_one_token(
            fns, token, state, mask, next_pos, decoding, generator,
            sample=step + 1 < steps and goes, forward=static.forward,
        )  # fmt: skip
        fed, next_pos = step + 1, next_pos + ans.running.long()
        ans = _stopped(ans, done)
        if not goes:  # the rows still running after _stopped are the going ones
            break
    cache = static.to_cache(state, mask[:, : past + fed], next_pos)
    return Generation(ans.tokens[:, : _width(ans, steps)].clone(), ans.lengths, ~ans.running, cache)


def _decode_dynamic(fns: ModelFns, pre: Prefill, decoding: Decoding, eos: Tensor, pad_token_id: int) -> Generation:
    """The loop on the model-native cache, which grows by a column per step; rows that have ended
    are parked outside the batch once at most half still run (``_park_ended``) and put back at the end."""
    batch, past = pre.mask.shape
    steps, stop = decoding.max_new_tokens, decoding.stop
    device = pre.next_pos.device
    mask = torch.cat([pre.mask, pre.mask.new_zeros(batch, steps)], dim=1)  # [B, T + N]
    ans, next_pos = _begin(batch, steps, pad_token_id, device), pre.next_pos
    held = _Held(torch.arange(batch, device=device), pre.state, ())
    logits = fns.logits(pre.hidden[:, -1])  # [B, V]
    generator = _generator(decoding, logits.device)
    chosen = _sample(logits, decoding.temperature, decoding.top_p, generator)  # [B'] for the held rows
    fed = 0
    for step in range(steps):
        token = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
        token[held.rows] = chosen
        ans, token = _emit(ans, step, token, eos, pad_token_id)
        running, n_still = _host_reads(ans.running.any(), ans.running[held.rows].sum())
        if not running:
            break
        done = _ruled(ans, step, stop)
        held = _park_ended(fns, held, ans.running, n_still, mask[:, : past + fed], next_pos)
        goes = _goes(ans, done)
        mask[:, past + step] = ans.running
        rows = held.rows
        chosen, state = decode_one_token(
            fns, token[rows], held.state, mask[rows, : past + step + 1], next_pos[rows], decoding, generator,
            sample=step + 1 < steps and goes,
        )  # fmt: skip
        held = held._replace(state=state)
        fed, next_pos = step + 1, next_pos + ans.running.long()
        ans = _stopped(ans, done)
        if not goes:  # the rows still running after _stopped are the going ones
            break
    out = fns.from_state(held.state, mask[held.rows, : past + fed], next_pos[held.rows])
    if held.parked:
        out = _unpark(out, held.rows, held.parked, mask[:, : past + fed], next_pos)
    return Generation(ans.tokens[:, : _width(ans, steps)].clone(), ans.lengths, ~ans.running, out)


def decode_tokens(
    fns: ModelFns,
    pre: Prefill,
    decoding: Decoding,
    eos: Tensor,  # [E] long
    pad_token_id: int,
) -> Generation:
    """The decoding loop after a prefill: up to ``decoding.max_new_tokens`` tokens per row (see ``generate``),
    on ``fns.static``'s preallocated cache when the model has one (``_decode_static``), else on the
    model-native growing cache with ended rows parked (``_decode_dynamic``). Both share the step
    (``decode_one_token``) and the per-row bookkeeping (``_emit``, ``_ruled``, ``_stopped``)."""
    if fns.static is not None and decoding.max_new_tokens:
        return _decode_static(fns, pre, decoding, eos, pad_token_id)
    return _decode_dynamic(fns, pre, decoding, eos, pad_token_id)


def generate(
    fns: ModelFns,
    input_ids: Tensor,  # [B, S]
    attention_mask: Tensor,  # [B, S]
    decoding: Decoding,
    *,
    cache: KVCache | None = None,
    eos_token_ids: Sequence[int],
    pad_token_id: int | None = None,
) -> Generation:
    """Decode up to ``decoding.max_new_tokens`` tokens per row after the prompt (read on top of ``cache``).

    Greedy when decoding.temperature == 0; otherwise samples from softmax(logits /
    temperature) restricted to the top_p nucleus, drawing from a generator seeded with
    ``decoding.seed`` on the model's device (so a seed repeats its answers). A row stops
    at its first token in ``eos_token_ids``; the loop stops when every row has.
    ``decoding.stop(tokens, running) -> done``, when given, is called after each step
    with the tokens decoded so far ([B, n] long, to be read, not written) and the rows
    still running ([B] bool); a running row where ``done`` ([B] bool) is True ends after
    that step's token, which it keeps (for example once an answer line is complete).
    Rows that have ended leave the model's batch once half of them have, so that a long
    answer does not make every finished row pay for each of its steps (not with
    ``fns.static``, whose steps keep their shapes). With ``fns.decoder`` the prompt is read by
    ``fns`` and the answer decoded by ``fns.decoder``.
    See ``Generation`` for what the result holds. pad_token_id (default: the first EOS
    id, else 0) fills slots after a row's end. Raises TypeError when ``decoding`` is not
    a ``Decoding``, ValueError on a ``stop`` result that is not a [B] tensor, and the
    errors of ``prefill``.
    """
    if not isinstance(decoding, Decoding):
        raise TypeError(f"decoding: expected a Decoding, got {type(decoding).__name__}")
    eos_ids = [int(t) for t in eos_token_ids]
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    pre = prefill(fns, input_ids, attention_mask, cache=cache)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)
    return decode_tokens(fns if fns.decoder is None else fns.decoder, pre, decoding, eos, pad_token_id)


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
    selected = pre.hidden[:, :-1][predicts]  # [N, d]
    logits = fns.logits(selected).float() if fns.float_logits is None else fns.float_logits(selected)  # [N, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:][predicts][:, None]).squeeze(-1)  # [N]
    rows = predicts.nonzero()[:, 0]  # [N]
    return torch.zeros(input_ids.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


__all__ = [
    "Decoding",
    "Generation",
    "ModelFns",
    "Prefill",
    "Rollout",
    "State",
    "StaticFns",
    "decode_one_token",
    "decode_tokens",
    "generate",
    "latent_step",
    "prefill",
    "rollout",
    "sequence_logprob",
]
