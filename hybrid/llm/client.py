"""LLM providers: Anthropic's Messages API and OpenAI-compatible chat completions, with retries, timing and cost.

Keys come from the environment only (ANTHROPIC_API_KEY / OPENAI_API_KEY, read by the SDKs); nothing here
logs, stores or forwards them. Retry and timeout settings come from the environment too, so that tests can
make waits short: HYBRID_LLM_ATTEMPTS, HYBRID_LLM_BACKOFF_SECONDS, HYBRID_LLM_TIMEOUT_SECONDS.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hybrid.study import records
from hybrid.errors import UserError
from hybrid.llm.spending import SpendingCap

if TYPE_CHECKING:
    from hybrid.config import RunConfig

DEFAULT_MODELS = {"anthropic": "claude-opus-4-6", "openai": "gpt-4.1"}  # Opus 4.6: the paper's Centaur
MAX_TOKENS = 16000  # a whole train.py and some prose; below the SDK's limit for non-streaming requests
PATIENCE = 3        # provider failures in a row (each after its retries) before the run stops

# List prices in USD per million tokens: (input, output, cache read and cache write as fractions of input).
# Matched by substring of the model name, first match wins; a model not listed has no recorded cost.
PRICES: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
    ("opus-4-6", (5.0, 25.0, 0.1, 1.25)),  # assumed as Opus 4.5's
    ("opus-4-5", (5.0, 25.0, 0.1, 1.25)),
    ("opus-4-1", (15.0, 75.0, 0.1, 1.25)),
    ("opus-4-0", (15.0, 75.0, 0.1, 1.25)),
    ("sonnet-4", (3.0, 15.0, 0.1, 1.25)),
    ("haiku-4-5", (1.0, 5.0, 0.1, 1.25)),
    ("3-5-haiku", (0.8, 4.0, 0.1, 1.25)),
    ("gpt-4.1-mini", (0.4, 1.6, 0.25, 1.0)),
    ("gpt-4.1", (2.0, 8.0, 0.25, 1.0)),
    ("gpt-4o-mini", (0.15, 0.6, 0.5, 1.0)),
    ("gpt-4o", (2.5, 10.0, 0.5, 1.0)),
)


class ProviderError(Exception):
    """The provider failed (after retries where retrying made sense); `transient` says whether a later call may work."""

    def __init__(self, message: str, *, transient: bool, usage: Usage | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.usage = usage or Usage()


class LLMUnavailable(UserError):
    """The provider keeps failing: the run stops cleanly (every finished trial is kept; `hybrid resume` goes on)."""


@dataclass
class Usage:
    """What one answer cost: tokens, wall time (apart from the GPU budget), dollars and attempts."""
    input_tokens: int = 0          # uncached prompt tokens
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    seconds: float = 0.0
    cost_usd: float | None = None
    attempts: int = 0

    def attrs(self) -> dict[str, Any]:
        """The trial attributes recorded for a move that used the LLM."""
        attrs = {"llm_seconds": round(self.seconds, 3), "llm_input_tokens": self.input_tokens,
                 "llm_output_tokens": self.output_tokens, "llm_cache_read_tokens": self.cache_read_tokens,
                 "llm_cache_write_tokens": self.cache_write_tokens, "llm_attempts": self.attempts}
        if self.cost_usd is not None:
            attrs[records.LLM_COST_USD] = round(self.cost_usd, 6)
        return attrs


@dataclass
class Reply:
    text: str
    usage: Usage
    model: str
    truncated: bool = False  # the answer hit max_tokens


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4          # calls in all, the first included
    backoff: float = 2.0       # seconds before the first retry, doubled after each
    max_wait: float = 60.0     # cap on one wait, Retry-After included
    timeout: float = 300.0     # seconds for one request

    @classmethod
    def from_env(cls) -> RetryPolicy:
        try:
            return cls(attempts=max(1, int(os.environ.get("HYBRID_LLM_ATTEMPTS", cls.attempts))),
                       backoff=float(os.environ.get("HYBRID_LLM_BACKOFF_SECONDS", cls.backoff)),
                       timeout=float(os.environ.get("HYBRID_LLM_TIMEOUT_SECONDS", cls.timeout)))
        except ValueError as e:
            raise UserError(f"bad HYBRID_LLM_* setting: {e}") from None

    def wait(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to sleep before retry number `attempt` (1, 2, ...)."""
        return min(self.max_wait, max(retry_after or 0.0, self.backoff * 2 ** (attempt - 1)))


def price(model: str) -> tuple[float, float, float, float] | None:
    return next((p for key, p in PRICES if key in model), None)


def cost(model: str, usage: Usage) -> float | None:
    rates = price(model)
    if rates is None:
        return None
    pin, pout, read, write = rates
    return (usage.input_tokens * pin + usage.output_tokens * pout + usage.cache_read_tokens * pin * read
            + usage.cache_write_tokens * pin * write) / 1e6


class Provider:
    """One chat model behind an SDK: `complete` sends the fixed prefix (cached) and the task, retrying transient errors.
    Each provider imports its SDK when it is made (1.6 s for both on a quiet core): a run without an LLM never
    loads one."""
    name = ""
    cap: SpendingCap | None = None  # --llm-max-usd, set by make_provider

    def __init__(self, model: str, policy: RetryPolicy, errors: tuple[type[Exception], ...]) -> None:
        self.model, self.policy = model, policy
        self.errors = errors  # the SDK's exceptions

    def complete(self, prefix: str, prompt: str) -> Reply:
        """The model's answer; ProviderError once retries are spent or at once for a permanent error;
        hybrid.llm.spending.LLMBudgetSpent, without a call, once the study's LLM cost reached the cap."""
        if self.cap is not None:
            self.cap.check()
        started, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                answer = self._request(prefix, prompt)
            except self.errors as e:
                transient, retry_after = self._classify(e)
                if not transient or attempt >= self.policy.attempts:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise ProviderError(f"{self.name} {self.model}: {_describe(e)}{tries}", transient=transient,
                                        usage=Usage(seconds=time.monotonic() - started, attempts=attempt)) from None
                time.sleep(self.policy.wait(attempt, retry_after))
                continue
            answer.usage.seconds, answer.usage.attempts = time.monotonic() - started, attempt
            answer.usage.cost_usd = cost(self.model, answer.usage)
            return answer

    def _request(self, prefix: str, prompt: str) -> Reply:
        """One call; its usage holds the tokens (time, attempts and cost are filled in by `complete`)."""
        raise NotImplementedError

    def _classify(self, error: Exception) -> tuple[bool, float | None]:
        """(transient?, the server's Retry-After in seconds) for an error of this provider's SDK."""
        raise NotImplementedError


def _describe(error: Exception) -> str:
    """One line: HTTP status and the server's message, or the kind of connection failure."""
    status = getattr(error, "status_code", None)
    body = getattr(error, "body", None)
    inner = body.get("error", body) if isinstance(body, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    lines = str(message or getattr(error, "message", "") or error).strip().splitlines()
    text = lines[0][:200] if lines else type(error).__name__
    return f"HTTP {status}: {text}" if status else f"{type(error).__name__}: {text}"


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _transient_status(status: int | None) -> bool:
    return status is not None and (status in (408, 409, 429) or status >= 500)


class AnthropicProvider(Provider):
    """Claude through the official SDK; the prefix is a system block marked for prompt caching."""
    name = "anthropic"

    def __init__(self, model: str, policy: RetryPolicy, base_url: str | None = None) -> None:
        import anthropic
        super().__init__(model, policy, (anthropic.AnthropicError,))
        base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
        try:  # the SDK finds a key, a token or a credentials profile, or raises for a broken profile
            self._sdk = anthropic.Anthropic(base_url=base_url, timeout=policy.timeout, max_retries=0)
            found = bool(self._sdk.api_key or self._sdk.auth_token or self._sdk.credentials)
        except anthropic.AnthropicError:
            found = False
        if not found:
            if base_url is None:
                raise UserError("no Anthropic credentials: set ANTHROPIC_API_KEY in the environment "
                                "(or --llm-base-url for a local Anthropic-compatible server)")
            self._sdk = anthropic.Anthropic(api_key="unused", base_url=base_url, timeout=policy.timeout, max_retries=0)

    def _request(self, prefix: str, prompt: str) -> Reply:
        message = self._sdk.messages.create(
            model=self.model, max_tokens=MAX_TOKENS,
            system=[{"type": "text", "text": prefix, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": prompt}])
        text = "".join(block.text for block in message.content if getattr(block, "type", None) == "text")
        u = message.usage
        usage = Usage(input_tokens=u.input_tokens or 0, output_tokens=u.output_tokens or 0,
                      cache_read_tokens=u.cache_read_input_tokens or 0, cache_write_tokens=u.cache_creation_input_tokens or 0)
        return Reply(text, usage, self.model, message.stop_reason == "max_tokens")

    def _classify(self, error: Exception) -> tuple[bool, float | None]:
        import anthropic
        if isinstance(error, anthropic.APIStatusError):
            return _transient_status(error.status_code), _retry_after(error)
        return isinstance(error, anthropic.APIConnectionError), None  # timeouts are connection errors


class OpenAIProvider(Provider):
    """Any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp); the prefix is the system message."""
    name = "openai"

    def __init__(self, model: str | None, policy: RetryPolicy, base_url: str | None = None) -> None:
        import openai
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        key = os.environ.get("OPENAI_API_KEY")
        if key is None and base_url is None:
            raise UserError("no OpenAI credentials: set OPENAI_API_KEY in the environment, "
                            "or --llm-base-url URL for a local server (vLLM, Ollama, llama.cpp)")
        self._sdk = openai.OpenAI(api_key=key or "unused", base_url=base_url, timeout=policy.timeout, max_retries=0)
        super().__init__(model or (self._served_model() if base_url else DEFAULT_MODELS["openai"]), policy,
                         (openai.OpenAIError,))

    def _served_model(self) -> str:
        """The first model a local server lists (vLLM and llama.cpp serve one)."""
        import openai
        try:
            models = [m.id for m in self._sdk.models.list()]
        except openai.OpenAIError as e:
            raise UserError(f"cannot list the models of {self._sdk.base_url}: {_describe(e)}; pass --llm-model") from None
        if not models:
            raise UserError(f"{self._sdk.base_url} serves no model: pass --llm-model")
        return models[0]

    def _request(self, prefix: str, prompt: str) -> Reply:
        completion = self._sdk.chat.completions.create(
            model=self.model, max_tokens=MAX_TOKENS,
            messages=[{"role": "system", "content": prefix}, {"role": "user", "content": prompt}])
        choice = completion.choices[0]
        u = completion.usage
        cached = (u.prompt_tokens_details.cached_tokens or 0) if u and u.prompt_tokens_details else 0
        usage = Usage(input_tokens=(u.prompt_tokens - cached) if u else 0, output_tokens=u.completion_tokens if u else 0,
                      cache_read_tokens=cached)
        return Reply(choice.message.content or "", usage, self.model, choice.finish_reason == "length")

    def _classify(self, error: Exception) -> tuple[bool, float | None]:
        import openai
        if isinstance(error, openai.APIStatusError):
            return _transient_status(error.status_code), _retry_after(error)
        return isinstance(error, openai.APIConnectionError), None


def make_provider(config: RunConfig) -> Provider:
    """The provider named by --llm, configured by --llm-model and --llm-base-url, capped by --llm-max-usd (UserError
    for --llm none)."""
    provider = _provider(config, RetryPolicy.from_env())
    if config.llm_max_usd is not None:
        provider.cap = SpendingCap(config.llm_max_usd, config.storage, config.study)
    return provider


def _provider(config: RunConfig, policy: RetryPolicy) -> Provider:
    if config.llm == "anthropic":
        return AnthropicProvider(config.llm_model or DEFAULT_MODELS["anthropic"], policy, config.llm_base_url)
    if config.llm == "openai":
        return OpenAIProvider(config.llm_model, policy, config.llm_base_url)
    raise UserError(f"method {config.method} needs an LLM: add --llm anthropic or --llm openai --llm-base-url URL")


@dataclass
class Advisor:
    """A provider and the run's patience with it: PATIENCE failures in a row, or one permanent error, stop the run."""
    provider: Provider
    patience: int = PATIENCE
    failures: int = field(default=0, init=False)

    def ask(self, prefix: str, prompt: str) -> Reply:
        """The answer; ProviderError for a failure the caller records, LLMUnavailable when the run must stop."""
        try:
            reply = self.provider.complete(prefix, prompt)
        except ProviderError as e:
            self.failures += 1
            if not e.transient:
                raise LLMUnavailable(f"the LLM provider refused the request ({e}); fix the model, key or URL, "
                                     "then `hybrid resume` continues the study") from None
            if self.failures >= self.patience:
                raise LLMUnavailable(f"the LLM provider failed {self.failures} times in a row ({e}); the study is "
                                     "intact: `hybrid resume` continues it") from None
            raise
        self.failures = 0
        return reply
