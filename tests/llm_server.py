"""A fake LLM provider for the tests: Anthropic's Messages API and OpenAI's chat completions on 127.0.0.1.

    with FakeLLM(["answer 1", Fail(429), "answer 2"]) as llm:
        ... ANTHROPIC_BASE_URL=llm.base_url or --llm openai --llm-base-url llm.base_url + "/v1" ...

Each request takes the next step of the script: a text (the answer), Fail(status) (an error response),
Hang(seconds) (no reply for that long, or until the server closes: longer than the client's timeout) or Drop()
(the connection closed without a reply).
When the script is spent, `responder(system, prompt)` answers if given, else the server fails with 500.
Usage is counted like the real APIs: 4 characters a token, and a system prefix seen before (with
cache_control on Anthropic's side) counts as cache reads. At the end: answers in the style of real models
(prose around fenced blocks) and readers of what the prompts show.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "fake-qwen-coder"


@dataclass(frozen=True)
class Fail:
    status: int
    message: str = "scripted failure"


@dataclass(frozen=True)
class Hang:
    seconds: float


@dataclass(frozen=True)
class Drop:
    pass


Step = str | Fail | Hang | Drop


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def system(self) -> str:
        if self.path.endswith("/messages"):
            system = self.body.get("system") or ""
            return system if isinstance(system, str) else "".join(b.get("text", "") for b in system)
        return "".join(m["content"] for m in self.body.get("messages", []) if m["role"] == "system")

    @property
    def prompt(self) -> str:
        messages = [m for m in self.body.get("messages", []) if m["role"] == "user"]
        content = messages[-1]["content"] if messages else ""
        return content if isinstance(content, str) else "".join(b.get("text", "") for b in content)


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


class FakeLLM:
    def __init__(self, script: list[Step] | None = None,
                 responder: Callable[[str, str], Step] | None = None) -> None:
        self.script: deque[Step] = deque(script or [])
        self.responder = responder
        self.requests: list[Request] = []
        self._cached: set[str] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()  # releases the requests that hang
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def push(self, *steps: Step) -> None:
        with self._lock:
            self.script.extend(steps)

    def __enter__(self) -> FakeLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    # -- answering ------------------------------------------------------------------------------------

    def _next(self, request: Request) -> Step:
        with self._lock:
            self.requests.append(request)
            if self.script:
                return self.script.popleft()
        if self.responder is not None:
            return self.responder(request.system, request.prompt)
        return Fail(500, "the fake server's script is spent")

    def _usage(self, request: Request, cacheable: bool) -> tuple[int, int, int]:
        """(uncached input tokens, cache writes, cache reads) of a request."""
        system, prompt = request.system, request.prompt
        with self._lock:
            seen = system in self._cached
            if cacheable:
                self._cached.add(system)
        if not cacheable:
            return _tokens(system) + _tokens(prompt), 0, 0
        return _tokens(prompt), (0 if seen else _tokens(system)), (_tokens(system) if seen else 0)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                                 "owned_by": "fake"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                anthropic = self.path.endswith("/v1/messages")
                if not anthropic and not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                step = fake._next(request)
                if isinstance(step, Hang):
                    fake._closing.wait(step.seconds)
                    step = "too late"
                if isinstance(step, Drop):
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if isinstance(step, Fail):
                    kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(step.status, "api_error")
                    error = ({"type": "error", "error": {"type": kind, "message": step.message}} if anthropic
                             else {"error": {"message": step.message, "type": kind, "code": step.status}})
                    self._send(step.status, error)
                    return
                if anthropic:
                    self._send(200, fake._anthropic(request, step))
                else:
                    self._send(200, fake._openai(request, step))

        return Handler

    def _anthropic(self, request: Request, text: str) -> dict[str, Any]:
        system = request.body.get("system")
        cacheable = isinstance(system, list) and any("cache_control" in b for b in system)
        fresh, written, read = self._usage(request, cacheable)
        return {"id": f"msg_fake{len(self.requests)}", "type": "message", "role": "assistant",
                "model": request.body.get("model", MODEL), "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": fresh, "output_tokens": _tokens(text),
                          "cache_creation_input_tokens": written, "cache_read_input_tokens": read}}

    def _openai(self, request: Request, text: str) -> dict[str, Any]:
        fresh, written, read = self._usage(request, cacheable=True)  # vLLM-style automatic prefix caching
        prompt = fresh + written + read
        return {"id": f"chatcmpl-fake{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": request.body.get("model", MODEL),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": _tokens(text), "total_tokens": prompt + _tokens(text),
                          "prompt_tokens_details": {"cached_tokens": read}}}


# -- what the fake model says ---------------------------------------------------------------------------------

def config_answer(config: dict[str, Any], why: str = "The best trials cluster here, so I stay close and move one knob.") -> str:
    """A config the way Claude or Qwen answer one: some reasoning, then a fenced JSON block."""
    return f"## Analysis\n\n{why}\n\n## Proposal\n\n```json\n{json.dumps(config, indent=2)}\n```\n"


def file_answer(code: str, change: str) -> str:
    """A whole new train.py, with the one-line change first and prose around the code."""
    return (f"Change: {change}\n\nThis is a small, self-contained edit; everything else stays as it is. "
            f"Here is the complete updated `train.py`:\n\n```python\n{code.rstrip()}\n```\n\nLet me know how it goes.")


def shown_train_py(system: str) -> str:
    """The train.py a prompt's fixed prefix shows the agent."""
    return system.split("# train.py (the current version)\n\n```python\n", 1)[1].rsplit("\n```", 1)[0] + "\n"


def shown_proposal(prompt: str) -> dict[str, Any]:
    """CMA-ES's proposal, as the Centaur prompt shows it."""
    line = next(s for s in prompt.splitlines() if s.startswith("CMA-ES's own proposal for this trial: "))
    return json.loads(line.split(": ", 1)[1])
