"""Where the OpenAI-compatible API is, and what each generation mode needs.

This module imports neither transformers nor openai: the CLI resolves
the API configuration and checks the mode's needs with it *before* any model is
loaded, so a missing key or base URL costs the user one clear line, not a
15-second model load followed by a traceback.

Each of ``model``, ``base_url`` and ``api_key`` is taken from the first place
that sets it (an empty string counts as unset):

    1. the explicit argument (the CLI flag),
    2. the process environment,
    3. the ``.env`` file (read without touching ``os.environ``).

Within the environment and within ``.env`` the seed's names come first, then
the OpenAI SDK's: ``API_KEY`` then ``OPENAI_API_KEY``; ``BASE_URL`` then
``OPENAI_BASE_URL``; ``API_MODEL`` then ``OPENAI_MODEL``.

The HTTP settings ``timeout``, ``max_retries``, ``max_concurrency`` and
``outage_after`` follow the same order (argument, environment, ``.env``) under
``GCACHE_API_TIMEOUT``, ``GCACHE_API_MAX_RETRIES``, ``GCACHE_API_CONCURRENCY`` and
``GCACHE_API_OUTAGE_AFTER``; unset everywhere, they take :class:`ApiConfig`'s defaults.

The key is a secret: ``repr``/``str`` of an :class:`ApiConfig` mask it,
:meth:`ApiConfig.to_record` (what goes into results) leaves it out, and
:func:`scrub` removes it from any text (exception messages, logs).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Literal, Mapping, get_args

from dotenv import dotenv_values

from gcache.core.checks import check_int

GenerationMode = Literal["local", "api_hint", "hybrid", "api"]
GENERATION_MODES: tuple[str, ...] = get_args(GenerationMode)
API_MODES: frozenset[str] = frozenset({"api_hint", "hybrid", "api"})
LOCAL_MODES: frozenset[str] = frozenset({"local", "hybrid"})

KEY_VARS = ("API_KEY", "OPENAI_API_KEY")
BASE_URL_VARS = ("BASE_URL", "OPENAI_BASE_URL")
MODEL_VARS = ("API_MODEL", "OPENAI_MODEL")
# ApiConfig field -> (variable, parser) of the HTTP settings the environment may set.
SETTING_VARS: dict[str, tuple[str, type]] = {
    "timeout": ("GCACHE_API_TIMEOUT", float),
    "max_retries": ("GCACHE_API_MAX_RETRIES", int),
    "max_concurrency": ("GCACHE_API_CONCURRENCY", int),
    "outage_after": ("GCACHE_API_OUTAGE_AFTER", int),
}

_MASK = "***"
_MIN_SECRET_LEN = 8


@dataclasses.dataclass(frozen=True, repr=False)
class ApiConfig:
    """How to reach an OpenAI-compatible chat-completions endpoint.

    timeout: seconds for one HTTP attempt; max_retries: extra attempts after a
    429, a 408, a 5xx, a timeout or a connection error; backoff: the first wait
    between attempts in seconds, doubled each retry up to max_backoff, less a
    random 0-25% (a server's Retry-After of up to a minute is honoured instead);
    max_concurrency: requests in flight at once from one client;
    outage_after: requests in a row that end in a connection error or a timeout
    (each after its retries) before the client declares the endpoint down and
    refuses every further request (0: never).
    Raises ValueError on a non-positive or infinite timeout, a non-positive
    concurrency, or negative retries, backoff or outage_after.
    """

    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    max_concurrency: int = 8
    backoff: float = 0.5
    max_backoff: float = 8.0
    outage_after: int = 3

    def __post_init__(self) -> None:
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout: expected a positive number of seconds, got {self.timeout!r}")
        check_int(self.max_retries, "max_retries", 0)
        check_int(self.max_concurrency, "max_concurrency")
        check_int(self.outage_after, "outage_after", 0)
        if not self.backoff >= 0:
            raise ValueError(f"backoff: expected a non-negative number of seconds, got {self.backoff!r}")
        if not self.max_backoff >= self.backoff:
            raise ValueError(f"max_backoff: expected at least backoff ({self.backoff}), got {self.max_backoff!r}")

    def __repr__(self) -> str:
        fields = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key" and value is not None:
                fields.append(f"api_key='{_MASK}'")
            else:
                fields.append(f"{f.name}={value!r}")
        return f"ApiConfig({', '.join(fields)})"

    __str__ = __repr__

    def to_record(self) -> dict[str, object]:
        """The settings worth keeping with results: everything but the key (only whether one was set)."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "api_key"}
        record["api_key_set"] = self.api_key is not None
        return record

    def scrub(self, text: str) -> str:
        """``text`` with this config's key replaced by a mask."""
        return scrub(text, self.api_key)


def scrub(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***``.

    Unchanged when secret is None or shorter than 8 characters: such a value is a
    placeholder for a server that checks no key ("EMPTY", "ollama"), and masking
    every occurrence of a short word would garble the text.
    """
    if not secret or len(secret) < _MIN_SECRET_LEN:
        return text
    return text.replace(secret, _MASK)


def _first(names: tuple[str, ...], source: Mapping[str, str | None]) -> str | None:
    for name in names:
        value = source.get(name)
        if value is not None and value.strip():
            return value.strip()
    return None


def read_dotenv(path: str | os.PathLike[str] | None) -> dict[str, str | None]:
    """The variables a ``.env`` file sets ({} when path is None or the file does not exist)."""
    if path is None or not Path(path).is_file():
        return {}
    return dict(dotenv_values(path))


def resolve_api_config(
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike[str] | None = ".env",
    **settings: object,
) -> ApiConfig:
    """An ApiConfig from flags, then the environment, then ``.env`` (see the module docstring).

    env defaults to ``os.environ``; dotenv_path None skips the file. ``settings``
    are passed to ApiConfig (timeout, max_retries, max_concurrency, backoff,
    max_backoff, outage_after); a setting given as None counts as unset, and
    those of ``SETTING_VARS`` then come from the environment or ``.env``. Nothing is
    required here: :func:`require_api` says what a mode lacks. Raises ValueError
    on bad settings (naming the variable when one came from the environment or
    ``.env``), TypeError on an unknown one.
    """
    env = os.environ if env is None else env
    dotenv = read_dotenv(dotenv_path)

    def pick(flag: str | None, names: tuple[str, ...]) -> str | None:
        if flag is not None and flag.strip():
            return flag.strip()
        return _first(names, env) or _first(names, dotenv)

    known = {f.name for f in dataclasses.fields(ApiConfig)} - {"model", "base_url", "api_key"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"settings: unknown ApiConfig field(s) {unknown}; expected some of {sorted(known)}")
    settings = {k: v for k, v in settings.items() if v is not None}
    for field, (var, parse) in SETTING_VARS.items():
        if field in settings:
            continue
        for source, where in ((env, "the environment"), (dotenv, str(dotenv_path))):
            raw = _first((var,), source)
            if raw is not None:
                settings[field] = _parse_setting(field, var, where, raw, parse)
                break
    return ApiConfig(
        model=pick(model, MODEL_VARS),
        base_url=pick(base_url, BASE_URL_VARS),
        api_key=pick(api_key, KEY_VARS),
        **settings,  # type: ignore[arg-type]
    )


def _parse_setting(field: str, var: str, where: str, raw: str, parse: type) -> object:
    """``raw`` as the value of ApiConfig's ``field``; ValueError naming ``var`` and ``where`` when it is not one."""
    try:
        value = parse(raw)
    except ValueError:
        kind = "a number" if parse is float else "an integer"
        raise ValueError(f"{var} (in {where}): expected {kind}, got {raw!r}") from None
    try:
        ApiConfig(**{field: value})  # the range checks live in one place
    except ValueError as err:
        raise ValueError(f"{var} (in {where}): {str(err).split(': ', 1)[1]}") from None
    return value


def check_mode(mode: str) -> GenerationMode:
    """``mode`` if it is one of the four generation modes. Raises ValueError naming the choices otherwise."""
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode: expected one of {', '.join(GENERATION_MODES)}; got {mode!r}")
    return mode  # type: ignore[return-value]


def missing_api_settings(config: ApiConfig) -> list[str]:
    """The settings an API call needs that ``config`` lacks, each named with where to set it."""
    missing = []
    if config.base_url is None:
        missing.append("base URL (--base-url, or BASE_URL / OPENAI_BASE_URL in the environment or .env)")
    if config.api_key is None:
        # No flag named here: a key belongs in the environment or .env, not in shell history.
        missing.append(
            "key (API_KEY / OPENAI_API_KEY in the environment or .env;"
            " any value for a local server that checks none)"
        )
    if config.model is None:
        missing.append("model name (--api-model, or API_MODEL / OPENAI_MODEL in the environment or .env)")
    return missing


def require_api(mode: str, config: ApiConfig | None) -> None:
    """Raise ValueError, in one line naming what is missing, when ``mode`` calls the API and
    ``config`` cannot reach it. ``local`` needs nothing; an unknown mode is a ValueError too."""
    check_mode(mode)
    if mode not in API_MODES:
        return
    missing = missing_api_settings(config if config is not None else ApiConfig())
    if missing:
        raise ValueError(f"mode {mode!r} calls an OpenAI-compatible API but has no {'; no '.join(missing)}")


check_mode_requirements = require_api
