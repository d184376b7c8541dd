"""The LLM as the hybrid method's structural agent: one code mutation of train.py, with the knobs it opens.

The model sees the research brief, the current generation's train.py and knob space, its best config, and
every earlier mutation of the run with its verdict, and the run's evidence compactly (hybrid.evidence: the noise,
the knob importances, each move's delta, margin and reward). It answers with an edit (a whole file or a unified diff,
read by hybrid.llm.edits) and a ```json block declaring its new knobs. Knobs the edit no longer assigns
leave the space. The patch guard is applied by the caller, before anything runs.
"""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from harness.knobs import KnobError, find_knobs
from hybrid.llm import prompts
from hybrid.llm.agent import failure_attrs, read_program, reply_attrs
from hybrid.llm.client import Advisor, ProviderError, make_provider
from hybrid.llm.spending import LLMBudgetSpent, announce
from hybrid.llm.edits import read_edit
from hybrid.llm.guard import PatchRejected
from hybrid.space import Knob, SpaceError, knob_from_dict
from hybrid.structural import Context, Proposal

if TYPE_CHECKING:
    from hybrid.config import RunConfig

JSON_BLOCK = re.compile(r"^ {0,3}```json[^\n]*\n(.*?)^ {0,3}```", re.MULTILINE | re.DOTALL)
DIFF_LINES = 60  # of each earlier mutation's diff shown
NAME_WORDS = 6

ANSWER = """Propose ONE structural change to train.py that opens a new sub-space: new code whose hyperparameters
become new knobs (top-level ALL_CAPS assignments of a literal), whose defaults reproduce the current behaviour
where possible. The classical optimizer then tunes the new knobs together with the old ones, starting from the
best config above; the change is kept only if it beats the current generation by more than the measured noise.
Do not repeat a change that was rejected from the current generation.

Answer in this form:

Change: <one line saying what you change>

A few sentences of reasoning, then EITHER the whole new train.py in one ```python block, OR a unified diff
against the train.py above in one ```diff block (--- a/train.py, +++ b/train.py, @@ hunks with exact context
lines). Then one ```json block declaring every knob you added, for example:

```json
{"MLP_RATIO": {"type": "float", "low": 1.0, "high": 6.0, "default": 4.0},
 "MLP_ACTIVATION": {"type": "categorical", "choices": ["relu2", "swiglu"], "default": "relu2"}}
```

(types: int, float, categorical; add "log": true for a log scale; {} if the change adds no knob)."""


def structural_task(context: Context) -> str:
    """The task: the best config so far, the mutations tried in this run with their verdicts, the answer format."""
    parts = ["# Your task: a structural change to train.py\n"]
    if context.best_value is not None:
        parts.append(f"The best run of the train.py above: val_bpb {context.best_value:.4f} with "
                     f"{prompts.config_text(context.best_config)}\n")
    if context.evidence is not None:
        parts.append(f"## What the run has measured\n\n{context.evidence.text()}\n")
    tried = [g for g in context.lineage.values() if g.parent is not None]
    if tried:
        parts.append(f"## Mutations tried in this run ({len(tried)})\n")
    for g in tried:
        knobs = ", ".join(sorted(g.new_knobs)) or "none"
        verdict = g.why or ("on probation" if g.status == "candidate" else "")
        parts.append(f"### generation {g.number} (from {g.parent}), {g.status}: {g.description}\n"
                     f"New knobs: {knobs}. {verdict}")
        lines = g.diff.splitlines()
        if lines:
            shown = lines[:DIFF_LINES] + ([f"... ({len(lines) - DIFF_LINES} more lines)"] if len(lines) > DIFF_LINES else [])
            parts.append("```diff\n" + "\n".join(shown) + "\n```")
    parts.append(ANSWER)
    return "\n".join(parts)


def read_knobs(answer: str) -> dict[str, Knob]:
    """The knobs declared in the answer's last ```json block ({} without one); PatchRejected if malformed."""
    blocks = JSON_BLOCK.findall(answer)
    if not blocks:
        return {}
    try:
        declared = json.loads(blocks[-1])
    except json.JSONDecodeError as e:
        raise PatchRejected(f"the ```json block of knobs does not parse: {e.msg} (line {e.lineno})") from None
    if not isinstance(declared, dict):
        raise PatchRejected("the ```json block must hold one object: knob name -> declaration")
    try:
        return {name: knob_from_dict(name, spec) for name, spec in declared.items()}
    except SpaceError as e:
        raise PatchRejected(f"a declared knob is malformed: {e}") from None


def mutation_name(description: str) -> str:
    words = re.findall(r"[a-z0-9]+", description.lower())[:NAME_WORDS]
    return "-".join(words) or "llm-edit"


class LLMStructuralAgent:
    """Asks the run's LLM for one mutation of the current generation."""
    source = "llm-code"

    def __init__(self, config: RunConfig) -> None:
        self.advisor = Advisor(make_provider(config))
        self.program = read_program(config.repo)
        self.study_name = config.study

    def propose(self, context: Context) -> Proposal | None:
        parent = context.parent
        prefix = prompts.prefix(self.program, parent.code, parent.search_space())
        try:
            reply = self.advisor.ask(prefix, structural_task(context))
        except ProviderError as e:
            return Proposal("llm-error", "the LLM provider failed", parent.code, attrs=failure_attrs(e),
                            rejected=f"LLM provider error: {e}")
        except LLMBudgetSpent as e:
            announce(e, self.study_name, "hybrid goes on tuning with its classical sampler")
            return None
        attrs = reply_attrs(reply)
        try:
            edit = read_edit(reply.text, parent.code)
            added = read_knobs(reply.text)
        except PatchRejected as e:
            return Proposal("unreadable", "an answer that could not be read", parent.code, attrs=attrs,
                            rejected=e.reason)
        try:
            kept = find_knobs(edit.code)
        except KnobError:
            kept = {}  # it does not parse: the patch guard says so
        removed = [name for name in parent.space if name not in kept and name not in added]
        return Proposal(mutation_name(edit.description), edit.description, edit.code, added, removed, attrs)

