"""Method `llm-hp`: an LLM reads the search space and the trial history and answers the next config in JSON."""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from harness.knobs import inject_knobs
from hybrid.study import store
from hybrid.classical.move_sampler import MoveSampler
from hybrid.llm import prompts
from hybrid.llm.agent import failure_attrs, read_program, reply_attrs
from hybrid.llm.client import Advisor, ProviderError, make_provider
from hybrid.llm.edits import fenced_blocks
from hybrid.move import Move
from hybrid.space import SearchSpace, SpaceError

if TYPE_CHECKING:
    from hybrid.config import RunConfig

TRAILING_COMMA = re.compile(r",(\s*[}\]])")


class ConfigRejected(Exception):
    """An answer whose config cannot be read; `reason` is one line, shown to the agent next time."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _without_comments(text: str) -> str:
    """Each line cut at its first `//` outside a string."""
    lines = []
    for line in text.splitlines():
        i = line.find("//")
        while i != -1 and line[:i].count('"') % 2:
            i = line.find("//", i + 2)
        lines.append(line if i == -1 else line[:i])
    return "\n".join(lines)


def _loads(text: str) -> Any:
    """JSON, forgiving the two slips models make most (trailing commas, // comments); ConfigRejected otherwise."""
    cleaned = TRAILING_COMMA.sub(r"\1", _without_comments(text))
    try:
        return json.loads(cleaned)
    except json.JSONDecodeError as e:
        raise ConfigRejected(f"the config is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _bare_objects(text: str) -> list[Any]:
    """JSON objects written in the prose, outside any fence, in order."""
    decoder, found, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        found.append(value)
        i = text.find("{", end)
    return found


def _answer_object(answer: str) -> Any:
    """The config object of an answer: its last ```json block, else a fenced or bare object in the text."""
    blocks = fenced_blocks(answer)
    tagged = [b for b in blocks if b.language in ("json", "jsonc", "json5")]
    untagged = [b for b in blocks if b.language == "" and b.text.lstrip().startswith("{")]
    for block in (tagged or untagged)[-1:]:
        if not block.closed:
            raise ConfigRejected("the answer was cut off inside the JSON block")
        return _loads(block.text)
    objects = [o for o in _bare_objects(answer) if isinstance(o, dict)]
    if objects:
        return objects[-1]
    raise ConfigRejected("the answer has no JSON object: end it with one ```json block holding the config")


def read_config(answer: str, space: SearchSpace) -> tuple[dict[str, Any], str]:
    """The answer's config clamped into the space, and a note of what was changed (empty if nothing)."""
    obj = _answer_object(answer)
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        obj = obj["config"]
    if not isinstance(obj, dict):
        raise ConfigRejected(f"the JSON is a {type(obj).__name__}, not an object of knob values")
    known = {k: v for k, v in obj.items() if k in space.knobs}
    if not known:
        raise ConfigRejected(f"the JSON names none of the knobs ({', '.join(space.names)})")
    for name, value in known.items():
        if isinstance(value, bool) and space.knobs[name].type != "categorical":
            raise ConfigRejected(f"{name} is {space.knobs[name].type}, got {value!r}")
    try:
        config = space.clamp(known)
    except SpaceError as e:
        raise ConfigRejected(str(e)) from None
    notes = [f"{k} {prompts.value_text(v)} -> {prompts.value_text(config[k])}" for k, v in known.items()
             if space.knobs[k].type != "categorical" and float(v) != float(config[k])]
    unknown = sorted(set(obj) - set(space.knobs))
    missing = [k for k in space.names if k not in known]
    parts = ([f"clamped {', '.join(notes)}"] if notes else []) + \
            ([f"ignored unknown {', '.join(map(str, unknown))}"] if unknown else []) + \
            ([f"defaults for {', '.join(missing)}"] if missing else [])
    return config, "; ".join(parts)


class LLMHPMethod:
    """Every trial's config comes from the LLM (the baseline aside); unreadable answers are recorded rejections."""

    def __init__(self, config: RunConfig, study: optuna.Study, space: SearchSpace, code: str, seed: int) -> None:
        self.space, self.code = space, code
        self.sampler = MoveSampler.random(seed)
        self.advisor = Advisor(make_provider(config))
        self.prefix = prompts.prefix(read_program(config.repo), inject_knobs(code, space.defaults()), space)

    def next_move(self, study: optuna.Study) -> Move:
        task = prompts.hp_task(store.finished_trials(study), self.space)
        try:
            reply = self.advisor.ask(self.prefix, task)
        except ProviderError as e:
            return self._refused(f"LLM provider error: {e}", failure_attrs(e))
        attrs = reply_attrs(reply)
        try:
            config, note = read_config(reply.text, self.space)
        except ConfigRejected as e:
            return self._refused(e.reason, attrs)
        return Move("llm-hp", 0, self.code, self.space, config=config, attrs={**attrs, **({"llm_note": note} if note else {})})

    def _refused(self, reason: str, attrs: dict[str, Any]) -> Move:
        """A recorded rejection (zero time); the defaults are pinned so that no sampler runs for it."""
        return Move("llm-hp", 0, self.code, self.space, config=self.space.defaults(), rejected=reason, attrs=attrs)

    def observe(self, study: optuna.Study, trial: FrozenTrial, move: Move) -> None:
        pass  # the history is read from the study on every move
