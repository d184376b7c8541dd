"""The providers through the real SDKs against the fake server: usage, caching, cost, retries, failures."""
from __future__ import annotations

import pytest
from llm_server import MODEL, Drop, Fail, FakeLLM, Hang

from hybrid.errors import UserError
from hybrid.llm.client import (Advisor, AnthropicProvider, LLMUnavailable, OpenAIProvider, ProviderError, RetryPolicy,
                               Usage, cost, make_provider)
from hybrid.config import RunConfig
from util import closed_port

PREFIX = "You are a research engineer. " * 50
# A request to the fake server takes 0.02-0.1 s here (0.2 s with the SDK client's start): successful requests get
# far more; only the requests that hang wait for a timeout, HANG_POLICY's (still over ten times a request's need).
FAST = RetryPolicy(attempts=3, backoff=0.01, timeout=60.0)
HANG_POLICY = RetryPolicy(attempts=3, backoff=0.01, timeout=2.0)
KEY = "sk-test-SECRET123"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL",
                 "ANTHROPIC_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "no-anthropic-config"))


def test_anthropic_caches_the_prefix_and_counts_usage(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    with FakeLLM(["first answer", "second answer"]) as llm:
        provider = AnthropicProvider("claude-sonnet-4-6", FAST, llm.base_url)
        first, second = provider.complete(PREFIX, "task one"), provider.complete(PREFIX, "task two")
    assert (first.text, second.text) == ("first answer", "second answer")
    request = llm.requests[0]
    assert request.path == "/v1/messages" and request.body["model"] == "claude-sonnet-4-6"
    assert request.body["system"][0]["cache_control"] == {"type": "ephemeral"} and request.prompt == "task one"
    assert KEY in (request.headers.get("x-api-key", "") + request.headers.get("authorization", ""))
    assert first.usage.cache_write_tokens > 0 and first.usage.cache_read_tokens == 0
    assert second.usage.cache_read_tokens == first.usage.cache_write_tokens and second.usage.cache_write_tokens == 0
    assert second.usage.cost_usd == pytest.approx(cost("claude-sonnet-4-6", second.usage))
    assert second.usage.cost_usd > 0
    assert second.usage.cost_usd < first.usage.cost_usd  # cache reads are cheap
    attrs = second.usage.attrs()
    assert {"llm_seconds", "llm_input_tokens", "llm_output_tokens", "llm_cache_read_tokens", "llm_cost_usd"} <= set(attrs)


def test_the_base_url_may_come_from_the_environment(monkeypatch):
    with FakeLLM(["hi"]) as llm:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", llm.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        provider = make_provider(RunConfig("llm-hp", "s", llm="anthropic", llm_model="claude-haiku-4-5"))
        assert provider.complete("p", "t").text == "hi"
    assert llm.requests[0].body["model"] == "claude-haiku-4-5"


def test_cost():
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_read_tokens=1_000_000, cache_write_tokens=1_000_000)
    assert cost("claude-sonnet-4-6", usage) == pytest.approx(3 + 15 + 0.3 + 3.75)
    assert cost("my-local-qwen", usage) is None


@pytest.mark.parametrize("failure", [Fail(429), Fail(500), Fail(529), Hang(120.0), Drop()], ids=str)
def test_transient_failures_are_retried(monkeypatch, failure):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    policy = HANG_POLICY if isinstance(failure, Hang) else FAST
    with FakeLLM([failure, failure, "finally"]) as llm:
        reply = AnthropicProvider("claude-sonnet-4-6", policy, llm.base_url).complete("p", "t")
    assert reply.text == "finally" and reply.usage.attempts == 3 and len(llm.requests) == 3


def test_retries_run_out(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    with FakeLLM([Fail(500, "overloaded")] * 3) as llm:
        with pytest.raises(ProviderError) as e:
            AnthropicProvider("claude-sonnet-4-6", FAST, llm.base_url).complete("p", "t")
    assert e.value.transient and "HTTP 500: overloaded after 3 attempts" in str(e.value)
    assert e.value.usage.attempts == 3 and e.value.usage.seconds > 0


@pytest.mark.parametrize("status", [400, 401, 404])
def test_permanent_errors_are_not_retried(monkeypatch, status):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    with FakeLLM([Fail(status, "nope"), "never"]) as llm:
        with pytest.raises(ProviderError) as e:
            AnthropicProvider("claude-sonnet-4-6", FAST, llm.base_url).complete("p", "t")
    assert not e.value.transient and f"HTTP {status}: nope" in str(e.value) and len(llm.requests) == 1


def test_openai_compatible_server():
    with FakeLLM(["answer one", Fail(503), "answer two"]) as llm:
        provider = OpenAIProvider(None, FAST, llm.base_url + "/v1")
        assert provider.model == MODEL  # the model the server lists
        first, second = provider.complete(PREFIX, "one"), provider.complete(PREFIX, "two")
    assert (first.text, second.text) == ("answer one", "answer two") and second.usage.attempts == 2
    assert llm.requests[0].path == "/v1/chat/completions" and llm.requests[0].system == PREFIX
    assert second.usage.cache_read_tokens > 0 and first.usage.cache_read_tokens == 0
    assert first.usage.cost_usd is None  # a local model has no price


def test_connection_refused():
    provider = OpenAIProvider("m", FAST, f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(ProviderError) as e:
        provider.complete("p", "t")
    assert e.value.transient and "after 3 attempts" in str(e.value)


def test_credentials_are_required_without_a_local_server():
    with pytest.raises(UserError, match="ANTHROPIC_API_KEY"):
        AnthropicProvider("claude-sonnet-4-6", FAST)
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        OpenAIProvider("gpt-4.1", FAST)
    with pytest.raises(UserError, match="needs an LLM"):
        make_provider(RunConfig("llm-hp", "s", llm="none"))


def test_retry_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("HYBRID_LLM_ATTEMPTS", "5")
    monkeypatch.setenv("HYBRID_LLM_BACKOFF_SECONDS", "0.5")
    policy = RetryPolicy.from_env()
    assert (policy.attempts, policy.backoff) == (5, 0.5)
    assert [policy.wait(n, None) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert policy.wait(1, 7.0) == 7.0 and policy.wait(1, 1e6) == policy.max_wait
    monkeypatch.setenv("HYBRID_LLM_ATTEMPTS", "many")
    with pytest.raises(UserError, match="HYBRID_LLM"):
        RetryPolicy.from_env()


def test_the_advisor_stops_after_failures_in_a_row():
    with FakeLLM([Fail(500)] * 3 + ["ok"] + [Fail(500)] * 9) as llm:
        advisor = Advisor(OpenAIProvider("m", RetryPolicy(attempts=3, backoff=0.0), llm.base_url + "/v1"), patience=3)
        with pytest.raises(ProviderError):
            advisor.ask("p", "t")
        assert advisor.ask("p", "t").text == "ok"  # a success resets the count
        for _ in range(2):
            with pytest.raises(ProviderError):
                advisor.ask("p", "t")
        with pytest.raises(LLMUnavailable, match="failed 3 times in a row"):
            advisor.ask("p", "t")


def test_the_advisor_stops_at_a_permanent_error():
    with FakeLLM([Fail(401, "invalid x-api-key")]) as llm:
        advisor = Advisor(OpenAIProvider("m", FAST, llm.base_url + "/v1"))
        with pytest.raises(LLMUnavailable, match="refused the request.*invalid x-api-key"):
            advisor.ask("p", "t")
