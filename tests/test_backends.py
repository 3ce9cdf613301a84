"""API configuration, the mode requirements, prompts, the four generation modes and key hygiene.

The modes run against a real HTTP server on loopback (tests/_openai_server.py): with a
word-count echo and a tiny random local model in the fast tests, with the embedded model
behind both the server and the local side in the slow ones.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging

import pytest
import torch
from _openai_server import OpenAIServer, Reply, echo_backend

from gcache.core.latent import Decoding
from gcache.io.models.api import ApiClient, ApiConfig, ApiStatusError, require_api, resolve_api_config
from gcache.io.models.apiconfig import GENERATION_MODES, SETTING_VARS, scrub
from gcache.io.models.generation import (
    HYBRID_INSTRUCTION,
    CacheInfo,
    answer_stop,
    describe_cache_hint,
    generate_answer,
    generate_local,
    with_cache_hint,
    with_draft,
)

KEY = "sk-live-9f8e7d6c5b4a39281706"
QUESTION = [
    {"role": "system", "content": "You are a careful math solver."},
    {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"},
]
SHORT = [{"role": "user", "content": "Say hello."}]


# --------------------------------------------------------------------------- configuration

TIERS = ("flag", "env", "dotenv")
FIELDS = {"model": ("API_MODEL", "OPENAI_MODEL"), "base_url": ("BASE_URL", "OPENAI_BASE_URL"), "api_key": ("API_KEY", "OPENAI_API_KEY")}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_flags_beat_the_environment_which_beats_dotenv(field, tmp_path):
    seed_name, sdk_name = FIELDS[field]
    # Every subset of tiers, each setting the value under either name: the highest tier present wins.
    for present in itertools.product([False, True], repeat=3):
        for name in (seed_name, sdk_name):
            flag = "from-flag" if present[0] else None
            env = {name: "from-env"} if present[1] else {}
            dotenv = tmp_path / ".env"
            dotenv.write_text(f"{name}=from-dotenv\n" if present[2] else "")
            config = resolve_api_config(**{field: flag}, env=env, dotenv_path=dotenv)
            winner = next((f"from-{t}" for t, p in zip(TIERS, present) if p), None)
            assert getattr(config, field) == winner, (present, name)


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_the_seed_name_beats_the_sdk_name_within_a_tier(field, tmp_path):
    seed_name, sdk_name = FIELDS[field]
    assert getattr(resolve_api_config(env={seed_name: "seed", sdk_name: "sdk"}, dotenv_path=None), field) == "seed"
    (tmp_path / ".env").write_text(f"{sdk_name}=sdk\n{seed_name}=seed\n")
    assert getattr(resolve_api_config(env={}, dotenv_path=tmp_path / ".env"), field) == "seed"
    # ...but a tier above wins whatever the name: the environment's SDK name beats .env's seed name.
    assert getattr(resolve_api_config(env={sdk_name: "sdk"}, dotenv_path=tmp_path / ".env"), field) == "sdk"


def test_empty_values_count_as_unset_and_a_missing_dotenv_is_fine(tmp_path):
    (tmp_path / ".env").write_text("API_KEY=\nBASE_URL=http://h/v1\n")
    config = resolve_api_config(api_key="  ", env={"API_KEY": "", "OPENAI_API_KEY": "k"}, dotenv_path=tmp_path / ".env")
    assert config.api_key == "k" and config.base_url == "http://h/v1" and config.model is None
    assert resolve_api_config(env={}, dotenv_path=tmp_path / "absent.env") == ApiConfig()


def test_resolve_does_not_touch_the_process_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("API_KEY", raising=False)
    (tmp_path / ".env").write_text(f"API_KEY={KEY}\n")
    assert resolve_api_config(dotenv_path=tmp_path / ".env").api_key == KEY
    import os

    assert "API_KEY" not in os.environ


def test_settings_pass_through_and_are_checked():
    config = resolve_api_config(env={}, dotenv_path=None, timeout=2.5, max_retries=0, max_concurrency=3, backoff=0.1)
    assert (config.timeout, config.max_retries, config.max_concurrency, config.backoff) == (2.5, 0, 3, 0.1)
    with pytest.raises(TypeError, match="retries"):
        resolve_api_config(env={}, dotenv_path=None, retries=3)


@pytest.mark.parametrize("field", sorted(SETTING_VARS))
def test_http_settings_come_from_the_argument_then_the_environment_then_dotenv(field, tmp_path):
    var = SETTING_VARS[field][0]
    values = {"flag": 7, "env": 5, "dotenv": 4}
    default = getattr(ApiConfig(), field)
    for present in itertools.product([False, True], repeat=3):
        flag = type(default)(values["flag"]) if present[0] else None
        env = {var: str(values["env"])} if present[1] else {}
        dotenv = tmp_path / ".env"
        dotenv.write_text(f"{var}={values['dotenv']}\n" if present[2] else "")
        config = resolve_api_config(env=env, dotenv_path=dotenv, **{field: flag})
        winner = next((values[t] for t, p in zip(TIERS, present) if p), default)
        assert getattr(config, field) == winner, present
        assert type(getattr(config, field)) is type(default), present


@pytest.mark.parametrize(
    "var, raw, expected",
    [
        ("GCACHE_API_TIMEOUT", "0", "expected a positive number of seconds"),
        ("GCACHE_API_TIMEOUT", "-2", "expected a positive number of seconds"),
        ("GCACHE_API_TIMEOUT", "inf", "expected a positive number of seconds"),
        ("GCACHE_API_TIMEOUT", "soon", "expected a number, got 'soon'"),
        ("GCACHE_API_MAX_RETRIES", "-1", "expected an integer >= 0"),
        ("GCACHE_API_MAX_RETRIES", "1.5", "expected an integer, got '1.5'"),
        ("GCACHE_API_CONCURRENCY", "0", "expected an integer >= 1"),
        ("GCACHE_API_CONCURRENCY", "many", "expected an integer, got 'many'"),
    ],
)
def test_a_bad_http_setting_in_the_environment_or_dotenv_names_the_variable(var, raw, expected, tmp_path):
    with pytest.raises(ValueError) as err:
        resolve_api_config(env={var: raw}, dotenv_path=None)
    assert str(err.value).startswith(f"{var} (in the environment): {expected}"), str(err.value)
    (tmp_path / ".env").write_text(f"{var}={raw}\n")
    with pytest.raises(ValueError) as err:
        resolve_api_config(env={}, dotenv_path=tmp_path / ".env")
    assert str(err.value).startswith(f"{var} (in {tmp_path / '.env'}): {expected}"), str(err.value)
    # A value given as an argument wins, so a bad one below it is never read.
    field = next(f for f, (v, _) in SETTING_VARS.items() if v == var)
    assert getattr(resolve_api_config(env={var: raw}, dotenv_path=None, **{field: 2}), field) == 2


@pytest.mark.parametrize(
    "settings, word",
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"backoff": -0.1}, "backoff"),
        ({"backoff": 2.0, "max_backoff": 1.0}, "max_backoff"),
    ],
)
def test_bad_settings_are_value_errors_naming_the_field(settings, word):
    with pytest.raises(ValueError, match=word):
        ApiConfig(**settings)


def test_the_key_is_masked_in_repr_and_left_out_of_records():
    config = ApiConfig(model="m", base_url="http://h/v1", api_key=KEY)
    for text in (repr(config), str(config), f"{config}", repr(ApiClient(config)), json.dumps(config.to_record())):
        assert KEY not in text
    assert "api_key='***'" in repr(config) and config.to_record()["api_key_set"] is True
    assert "api_key=None" in repr(ApiConfig())
    assert scrub(f"Bearer {KEY} and {KEY}", KEY) == "Bearer *** and ***"
    assert scrub("nothing", None) == "nothing"
    assert scrub("an EMPTY key", "EMPTY") == "an EMPTY key"  # a placeholder, not a secret


# --------------------------------------------------------------------------- mode requirements


def test_local_mode_needs_no_api():
    require_api("local", None)
    require_api("local", ApiConfig())


@pytest.mark.parametrize("mode", ["api_hint", "hybrid", "api"])
@pytest.mark.parametrize("missing", ["base_url", "api_key", "model"])
def test_an_api_mode_without_a_setting_is_one_line_naming_it(mode, missing):
    full = {"model": "m", "base_url": "http://h/v1", "api_key": KEY}
    config = ApiConfig(**{**full, missing: None})
    with pytest.raises(ValueError) as caught:
        require_api(mode, config)
    message = str(caught.value)
    words = {"base_url": "no base URL", "api_key": "no key", "model": "no model name"}
    assert "\n" not in message and mode in message and words[missing] in message
    assert KEY not in message
    require_api(mode, ApiConfig(**full))  # complete: no error


def test_require_api_names_every_missing_setting_and_rejects_unknown_modes():
    message = str(pytest.raises(ValueError, require_api, "hybrid", ApiConfig()).value)
    assert "no base URL" in message and "no key" in message and "no model name" in message
    with pytest.raises(ValueError, match="local, api_hint, hybrid, api"):
        require_api("cloud", ApiConfig())
    assert GENERATION_MODES == ("local", "api_hint", "hybrid", "api")


def test_the_client_refuses_an_incomplete_config():
    with pytest.raises(ValueError, match="base URL"):
        ApiClient(ApiConfig(model="m", api_key=KEY))


# --------------------------------------------------------------------------- prompts


def test_the_hint_states_the_cache_size_and_nothing_else():
    hint = describe_cache_hint(3, 120, 10)
    assert "3 agents" in hint and "120 positions" in hint and "10 latent steps" in hint
    assert "1 agent:" in describe_cache_hint(1, 5, 0)
    with pytest.raises(ValueError, match="cache_len"):
        describe_cache_hint(2, -1, 3)


def test_the_hint_goes_before_the_last_user_message_and_the_input_is_kept():
    conversation = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "second"}]
    before = json.dumps(conversation)
    out = with_cache_hint(conversation, "[HINT]")
    assert json.dumps(conversation) == before
    assert out[:2] == conversation[:2] and out[2] == {"role": "user", "content": "[HINT]\n\nsecond"}
    with pytest.raises(ValueError, match="user"):
        with_cache_hint([{"role": "system", "content": "s"}], "[HINT]")


def test_the_draft_follows_the_conversation_as_the_assistant_turn():
    out = with_draft(QUESTION, "The answer is 7.")
    assert out[: len(QUESTION)] == QUESTION
    assert out[-2:] == [{"role": "assistant", "content": "The answer is 7."}, {"role": "user", "content": HYBRID_INSTRUCTION}]


# --------------------------------------------------------------------------- modes, fast (echo server, tiny model)


def _client(server: OpenAIServer, **settings) -> ApiClient:
    settings = {"backoff": 0.005, "max_backoff": 0.02, "timeout": 30.0, **settings}
    return ApiClient(ApiConfig(model="loopback", base_url=server.base_url, api_key=KEY, **settings))


@pytest.fixture(scope="module")
def tiny():
    from gcache.io.models.local import tiny_model

    return tiny_model("llama", seed=0)


def _tiny_cache(local, conversations, latent_steps=2):
    """A cache as an agent passes it on: its prompt read, then a few latent steps."""
    from gcache.core.latent import rollout
    from gcache.io.models.local import encode_chat

    ids, mask = encode_chat(local, conversations)
    return rollout(local.fns, local.realign, ids, mask, latent_steps=latent_steps).cache


def test_api_mode_sends_the_conversation_as_is_and_reads_usage():
    rows = [QUESTION, SHORT]
    with OpenAIServer() as server:
        answers = generate_answer("api", rows, Decoding(6), api=_client(server))
    # Rows go as concurrent requests: they may arrive in any order.
    assert sorted(json.dumps(r["messages"]) for r in server.requests) == sorted(json.dumps(r) for r in rows)
    for answer, row in zip(answers, rows):
        text, prompt_tokens, completion_tokens = echo_backend(row, 6, 0.0)
        assert answer.text == text and answer.draft is None
        assert answer.api_tokens == {"prompt": prompt_tokens, "completion": completion_tokens}
        assert answer.tokens == {"prompt": 0, "latent": 0, "generated": 0}


def test_sampling_settings_reach_the_api_and_top_p_only_when_set():
    with OpenAIServer() as server:
        generate_answer("api", [SHORT], Decoding(5, temperature=0.7, top_p=0.9), api=_client(server))
        generate_answer("api", [SHORT], Decoding(5), api=_client(server))
    nucleus, default = server.requests
    assert (nucleus["temperature"], nucleus["top_p"], nucleus["max_tokens"]) == (0.7, 0.9, 5)
    assert default["temperature"] == 0.0 and "top_p" not in default


def test_api_hint_mode_prepends_one_hint_per_row():
    infos = [CacheInfo(2, 40, 5), CacheInfo(4, 90, 5)]
    with OpenAIServer() as server:
        generate_answer("api_hint", [QUESTION, SHORT], Decoding(6), api=_client(server), cache_info=infos)
    # Rows go as concurrent requests: they may arrive in any order.
    expected = [
        original[:-1] + [{**original[-1], "content": f"{describe_cache_hint(*info)}\n\n{original[-1]['content']}"}]
        for original, info in zip([QUESTION, SHORT], infos)
    ]
    assert sorted(json.dumps(r["messages"]) for r in server.requests) == sorted(json.dumps(m) for m in expected)


def test_local_mode_batched_equals_one_row_at_a_time(tiny):
    rows = [QUESTION, SHORT]
    cache = _tiny_cache(tiny, [[{"role": "user", "content": "Agent one thinks about apples."}]] * 2)
    batched = generate_answer("local", rows, Decoding(8), local=tiny, cache=cache)
    from gcache.core.cache import select_rows

    for i, row in enumerate(rows):
        (alone,) = generate_local(tiny, [row], Decoding(8), cache=select_rows(cache, [i]))
        assert batched[i].text == alone.text
        assert batched[i].tokens == {"prompt": alone.prompt_tokens, "latent": 0, "generated": alone.generated_tokens}
        assert batched[i].api_tokens == {"prompt": 0, "completion": 0}
    from gcache.io.models.local import encode_chat

    _, mask = encode_chat(tiny, rows)
    assert [a.tokens["prompt"] for a in batched] == mask.sum(-1).tolist()
    assert all(0 <= a.tokens["generated"] <= 8 for a in batched)


def test_the_cache_changes_what_the_local_model_says(tiny):
    cache = _tiny_cache(tiny, [[{"role": "user", "content": "A long preamble about something else entirely."}]])
    with_cache = generate_local(tiny, [SHORT], Decoding(8), cache=cache)
    without = generate_local(tiny, [SHORT], Decoding(8))
    assert with_cache[0].text != without[0].text, "the same words with and without the cache"


def test_hybrid_mode_gives_the_api_the_local_draft(tiny):
    cache = _tiny_cache(tiny, [[{"role": "user", "content": "Agent one thinks about apples."}]])
    (local,) = generate_answer("local", [QUESTION], Decoding(8), local=tiny, cache=cache)
    with OpenAIServer() as server:
        (hybrid,) = generate_answer("hybrid", [QUESTION], Decoding(8), local=tiny, api=_client(server), cache=cache)
    (request,) = server.requests
    assert hybrid.draft == local.text and hybrid.tokens == local.tokens
    assert request["messages"] == with_draft(QUESTION, local.text)
    assert hybrid.text == echo_backend(request["messages"], 8, 0.0)[0]
    assert hybrid.api_tokens["completion"] > 0


@pytest.mark.parametrize(
    "mode, kwargs, word",
    [
        ("local", {}, "local"),
        ("hybrid", {"local": "set"}, "api"),
        ("api", {"api": "set", "cache": "set"}, "cache"),
        ("api_hint", {"api": "set"}, "cache_info"),
        ("api_hint", {"api": "set", "cache_info": [CacheInfo(1, 1, 1)] * 3}, "cache_info"),
        ("cloud", {}, "mode"),
    ],
)
def test_a_mode_without_what_it_needs_is_a_value_error(mode, kwargs, word, tiny):
    with OpenAIServer() as server:
        values = {"local": tiny, "api": _client(server), "cache": _tiny_cache(tiny, [SHORT, SHORT])}
        kwargs = {k: values[k] if v == "set" else v for k, v in kwargs.items()}
        with pytest.raises(ValueError, match=word):
            generate_answer(mode, [SHORT, SHORT], Decoding(4), **kwargs)
        assert server.requests == []


@pytest.mark.parametrize("mode", ["local", "api", "api_hint", "hybrid"])
def test_generate_answer_is_synchronous_and_closes_the_api_connections(mode, tiny):
    cache = None if mode == "api" else _tiny_cache(tiny, [SHORT])
    with OpenAIServer() as server:
        api = _client(server)
        for _ in range(2):  # the same client serves one call after another, each in a loop of its own
            answers = generate_answer(mode, [SHORT], Decoding(4), local=tiny, api=api, cache=cache,
                                      cache_info=CacheInfo(1, 3, 2))  # fmt: skip
            assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0].text, str)
            assert api._client is None  # the call's SDK client (and its connections) closed before returning
    assert len(server.requests) == (0 if mode == "local" else 2)


@pytest.mark.parametrize("decoding, error", [(8, TypeError), ({"max_new_tokens": 8}, TypeError), (Decoding(0), ValueError)])
def test_a_decoding_that_is_not_one_or_decodes_nothing_is_refused(decoding, error, tiny):
    with OpenAIServer() as server:
        with pytest.raises(error, match="decoding"):
            generate_answer("api", [SHORT], decoding, api=_client(server))
        with pytest.raises(error, match="decoding"):
            generate_local(tiny, [SHORT], decoding)
    assert server.requests == []


def test_local_sampling_follows_the_decoding_seed(tiny):
    rows = [QUESTION, SHORT]
    sampled = [generate_local(tiny, rows, Decoding(8, temperature=1.0, seed=s)) for s in (5, 5, 6)]
    greedy = generate_local(tiny, rows, Decoding(8))
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2] and sampled[0] != greedy


def test_a_cache_with_the_wrong_rows_is_a_value_error(tiny):
    with pytest.raises(ValueError, match="one row per conversation"):
        generate_local(tiny, [SHORT], Decoding(4), cache=_tiny_cache(tiny, [SHORT, SHORT]))


# --------------------------------------------------------------------------- key hygiene


def test_the_key_never_reaches_logs_results_or_errors(tiny, caplog):
    """A run that used the key: every mode, a retried 429 and a 401 whose body echoes the key sent."""
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and the HTTP library's included
    cache = _tiny_cache(tiny, [SHORT])
    leaky_429 = json.dumps({"error": {"message": f"slow down, {KEY}"}})
    results, errors = [], []
    with OpenAIServer(api_key=KEY, script=[Reply("status", 429, body=leaky_429)]) as server:
        api = _client(server)
        for mode in ("api", "api_hint", "hybrid"):
            results += generate_answer(mode, [SHORT], Decoding(6), local=tiny, api=api,
                                       cache=None if mode == "api" else cache, cache_info=CacheInfo(1, cache.seq_len, 2))
        # A wrong key, which the server echoes back in its 401 body.
        other = "sk-other-key-5566778899"
        async def wrong_key() -> None:
            async with ApiClient(ApiConfig(model="m", base_url=server.base_url, api_key=other)) as wrong:
                await wrong.complete(SHORT, max_tokens=4)

        try:
            asyncio.run(wrong_key())
        except ApiStatusError as err:
            errors.append((err, other))
    assert server.auth_headers[0] == f"Bearer {KEY}" and len(results) == 3
    assert api.totals["retries"] == 1  # the 429 happened, and its warning was logged
    assert any("retry 1 of" in r.getMessage() for r in caplog.records)
    (err, other), = errors
    assert err.status_code == 401 and "Incorrect API key" in str(err)
    for secret in (KEY, other):
        assert secret not in caplog.text
        assert all(secret not in r.getMessage() for r in caplog.records)
        assert secret not in str(err) and secret not in repr(err) and err.__cause__ is None
    dumped = json.dumps([{k: v for k, v in vars(a).items() if k != "read"} for a in results]) + repr(results) + repr(api) + json.dumps(api.totals)
    assert KEY not in dumped


# --------------------------------------------------------------------------- stopping at the answer


def test_answer_stop_fires_on_the_token_that_ends_the_answer_line(tiny):
    stop = answer_stop(tiny, "math")
    text = "Half of 10 is 5, plus 37.\n#### 42\nThen more words\n#### 43\n"
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    other = tiny.tokenizer("no answer here\nat all\n", add_special_tokens=False)["input_ids"]
    fired = []
    for n in range(1, len(ids) + 1):
        done = stop(torch.tensor([ids[:n]]), torch.tensor([True]))
        if bool(done[0]):
            fired.append(n)
    first = fired[0]
    assert tiny.tokenizer.decode(ids[:first]).endswith("#### 42\n")
    assert "\n" not in tiny.tokenizer.decode(ids[first - 1 : first]).rstrip("\n")  # nothing after the line
    # rows that no longer run are never ended again, and text without the answer line never ends
    assert not bool(stop(torch.tensor([ids[:first]]), torch.tensor([False]))[0])
    assert not any(bool(stop(torch.tensor([other[:n]]), torch.tensor([True]))[0]) for n in range(1, len(other) + 1))
    with pytest.raises(ValueError, match="family"):
        answer_stop(tiny, "poetry")


def test_generate_local_stops_each_row_where_the_rule_first_holds(tiny, monkeypatch):
    # Brute-force reference: decode freely, then cut each row at the first prefix the rule
    # accepts. The rule here ('at least 12 characters', every token a candidate) fires on the
    # random tiny model's output, which never writes '#### N'.
    import gcache.io.models.generation as generation
    from gcache.core.latent import generate
    from gcache.io.models.local import encode_chat

    rows = [QUESTION, SHORT, [{"role": "user", "content": "Say something long about rivers."}]]
    ids, mask = encode_chat(tiny, rows)
    free = generate(tiny.fns, ids, mask, Decoding(12), eos_token_ids=tiny.eos_token_ids, pad_token_id=tiny.pad_token_id)
    monkeypatch.setattr(generation, "answer_complete", lambda family, text: len(text) >= 12)
    monkeypatch.setattr(generation, "_newline_token_ids", lambda tokenizer: torch.arange(len(tokenizer)))
    cut = generate_local(tiny, rows, Decoding(12, stop=answer_stop(tiny, "math")))
    for b, c in enumerate(cut):
        tokens = free.tokens[b, : int(free.lengths[b])].tolist()
        texts = [tiny.tokenizer.decode(tokens[:n], skip_special_tokens=True) for n in range(1, len(tokens) + 1)]
        want = next((n for n, t in enumerate(texts, 1) if len(t) >= 12), len(tokens))
        assert c.generated_tokens == want and c.text == texts[want - 1]
    assert sum(c.generated_tokens for c in cut) < int(free.lengths.sum())


# --------------------------------------------------------------------------- modes, slow (the embedded model)


@pytest.fixture(scope="module")
def embedded():
    from gcache.io.models.local import load_model

    return load_model()


def _hf_backend(local):
    """The server's answers: plain transformers generate (greedy) on the chat template."""

    def backend(messages, max_tokens, temperature):
        tok = local.tokenizer
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = local.model.generate(
                **enc, max_new_tokens=max_tokens, do_sample=False,
                eos_token_id=list(local.eos_token_ids), pad_token_id=local.pad_token_id,
            )  # fmt: skip
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        if any(t in local.eos_token_ids for t in new):
            new = new[: min(new.index(t) for t in local.eos_token_ids if t in new)]
        return tok.decode(new, skip_special_tokens=True), int(enc["input_ids"].shape[1]), len(new)

    return backend


@pytest.fixture(scope="module")
def model_server(embedded):
    with OpenAIServer(_hf_backend(embedded), api_key=KEY) as server:
        yield server


@pytest.mark.slow
def test_stopping_at_the_answer_only_cuts_the_tail_on_the_embedded_model(embedded):
    from gcache.io.runner.prompts import decision_messages
    from gcache.io.tasks.contracts import answer_complete
    from gcache.io.tasks.datasets import load_items

    # on this project's machines the model states its answer early and then writes on in
    # several of the first ten questions (5, 6 and 7); these four hold them and one that does not
    items = load_items("gsm8k", "test", limit=8)[4:]
    rows = [decision_messages("gsm8k", item.question) for item in items]
    free = generate_local(embedded, rows, Decoding(170))
    cut = generate_local(embedded, rows, Decoding(170, stop=answer_stop(embedded, "math")))
    stopped = 0
    for f, c in zip(free, cut):
        assert f.text.startswith(c.text)
        lines = f.text.splitlines(keepends=True)
        ends = [i for i in range(1, len(lines) + 1) if answer_complete("math", "".join(lines[:i]))]
        if ends:  # the free answer holds a complete answer line: the cut one ends right after it
            assert c.text == "".join(lines[: ends[0]]) and c.generated_tokens < f.generated_tokens
            stopped += 1
        else:
            assert c == f
    assert stopped >= 1, [f.text for f in free]


@pytest.mark.slow
def test_all_four_modes_on_the_embedded_model(embedded, model_server):
    from gcache.core.latent import rollout
    from gcache.io.models.local import encode_chat

    api = _client(model_server)
    rows = [QUESTION]
    agent = [[{"role": "user", "content": "Tom has 3 apples and buys 4 more. Think it through."}]]
    ids, mask = encode_chat(embedded, agent)
    cache = rollout(embedded.fns, embedded.realign, ids, mask, latent_steps=3).cache
    n = 16

    # api: the text baseline, over HTTP: transformers' generate in the server thread.
    (text,) = generate_answer("api", rows, Decoding(n), api=api)
    (prompt_len,) = encode_chat(embedded, rows)[1].sum(-1).tolist()
    assert text.text.strip() and text.api_tokens["prompt"] == prompt_len
    assert 1 <= text.api_tokens["completion"] <= n and text.tokens == {"prompt": 0, "latent": 0, "generated": 0}

    # local without a cache: the latent core's greedy decoding equals transformers' generate.
    (plain,) = generate_answer("local", rows, Decoding(n), local=embedded)
    assert plain.text == text.text
    assert plain.tokens == {"prompt": prompt_len, "latent": 0, "generated": text.api_tokens["completion"]}

    # local on the cache (that a cache changes the answer is shown on the tiny model).
    (local,) = generate_answer("local", rows, Decoding(n), local=embedded, cache=cache)
    assert local.text.strip() and local.tokens["prompt"] == prompt_len and 1 <= local.tokens["generated"] <= n

    # api_hint: the server model answers the hinted prompt.
    info = CacheInfo(1, cache.seq_len, 3)
    (hinted,) = generate_answer("api_hint", rows, Decoding(n), api=api, cache_info=info)
    hinted_messages = with_cache_hint(QUESTION, describe_cache_hint(*info))
    assert model_server.requests[-1]["messages"] == hinted_messages and hinted.text.strip()

    # hybrid: the draft is the local answer on the cache; the API answers with it in context.
    (hybrid,) = generate_answer("hybrid", rows, Decoding(n), local=embedded, api=api, cache=cache)
    assert hybrid.draft == local.text and hybrid.tokens == local.tokens
    assert model_server.requests[-1]["messages"] == with_draft(QUESTION, local.text) and hybrid.text.strip()
    assert hybrid.api_tokens["prompt"] > text.api_tokens["prompt"]  # the draft was in the API's context
