"""The offline catalog: code mutations of train.py known to matter for this GPT, each opening knobs of its own.

It is the structural agent when there is no LLM (`--llm none`). Every mutation is a set of anchored edits of
the real train.py (exact text that must occur once, or a top-level constant found through the AST), fails
with MutationError naming the missing anchor, and declares its knobs with defaults that reproduce the code it
replaced, so a new generation's first trial (the parent's incumbent) measures the same model. The mutations
touch disjoint code, so they apply in any order on top of each other.

The catalog agent chooses from evidence (hybrid.evidence), not in a fixed order: a UCB bandit over the kinds of
mutation, rewarded by each verdict's improvement beyond its margin in noise units, then the importance of the knobs a
mutation interacts with in the generation being mutated. A mutation tried from the current parent is not retried;
one rejected from an earlier parent is, after every untried one.
"""
from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.knobs import parse_python
from hybrid.evidence import Evidence, attempts
from hybrid.space import Knob
from hybrid.structural import Context, Proposal

KNOB_ANCHOR = "\n# Fixed constants\n"  # new knobs are declared just above this line of train.py
DECLARATION = re.compile(r"^[A-Z][A-Z0-9_]* = .*  # ([a-z0-9_]+): ", re.MULTILINE)  # a knob line _declare writes
UCB_C = 2.0  # exploration weight of the bandit over kinds, in noise units of reward


class MutationError(ValueError):
    """train.py lacks the code a mutation edits: it changed, or this mutation was applied already."""


@dataclass(frozen=True)
class NewKnob:
    knob: Knob
    comment: str


@dataclass(frozen=True)
class Applied:
    code: str
    knobs: dict[str, Knob]


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    edit: Callable[[str], tuple[str, list[NewKnob]]]  # the edited code, and the knobs it reads
    kind: str                                          # what the bandit learns about: optimizer, attention, ...
    related: tuple[str, ...] = ()                      # knobs of the base space it interacts with

    def apply(self, code: str) -> Applied:
        """The mutated train.py with its new knobs declared; MutationError if an anchor is missing."""
        try:
            edited, knobs = self.edit(code)
        except MutationError as e:
            raise MutationError(f"mutation {self.name}: {e}") from None
        taken = set(_top_level_names(edited)) & {k.knob.name for k in knobs}
        if taken:
            raise MutationError(f"mutation {self.name}: train.py already defines {', '.join(sorted(taken))}")
        return Applied(_declare(edited, knobs, self.name), {k.knob.name: k.knob for k in knobs})


# -- anchored edits ---------------------------------------------------------------------------------------

def _replace(code: str, old: str, new: str) -> str:
    count = code.count(old)
    if count != 1:
        first = old.strip().splitlines()[0]
        raise MutationError(f"expected the anchor {first!r} once in train.py, found it {count} times")
    return code.replace(old, new, 1)


def _top_level_names(code: str) -> dict[str, ast.Assign]:
    try:
        tree = parse_python(code)
    except SyntaxError as e:
        raise MutationError(f"train.py does not parse: line {e.lineno}: {e.msg}") from None
    return {node.targets[0].id: node for node in tree.body
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)}


def _constant(code: str, name: str) -> tuple[ast.Assign, Any]:
    """The top-level `NAME = <literal>` statement and its value."""
    node = _top_level_names(code).get(name)
    if node is None:
        raise MutationError(f"expected a top-level assignment {name} = ... in train.py")
    try:
        return node, ast.literal_eval(node.value)
    except ValueError:
        raise MutationError(f"{name} in train.py is not a literal: {ast.unparse(node.value)}") from None


def _line_offsets(data: bytes) -> list[int]:
    offsets = [0]
    for line in data.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets


def _set_value(code: str, name: str, expression: str) -> str:
    """`NAME = <literal>` becomes `NAME = <expression>`; its comment and layout are kept."""
    node, _ = _constant(code, name)
    data = code.encode("utf-8")
    offsets = _line_offsets(data)
    start = offsets[node.value.lineno - 1] + node.value.col_offset
    end = offsets[node.value.end_lineno - 1] + node.value.end_col_offset
    return (data[:start] + expression.encode("utf-8") + data[end:]).decode("utf-8")


def _remove(code: str, name: str) -> str:
    """Delete the whole lines of the top-level assignment to NAME."""
    node, _ = _constant(code, name)
    lines = code.splitlines(keepends=True)
    return "".join(lines[:node.lineno - 1] + lines[node.end_lineno:])


def _declare(code: str, knobs: list[NewKnob], mutation: str) -> str:
    lines = "".join(f"{k.knob.name} = {_literal(k.knob.default)}  # {mutation}: {k.comment}\n" for k in knobs)
    return _replace(code, KNOB_ANCHOR, "\n" + lines + KNOB_ANCHOR.lstrip("\n"))


def _literal(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)  # strings in double quotes, as train.py


def _in_range(knob: Knob) -> Knob:
    """The knob with its default (read from train.py) clamped into its declared range."""
    return Knob(knob.name, knob.type, knob.clamp(knob.default), knob.low, knob.high, knob.log, knob.choices)


def _promote(code: str, name: str, kind: str, low: float, high: float, log: bool, comment: str) -> tuple[str, NewKnob]:
    """A fixed constant becomes a knob: its line leaves the constants and is declared among the knobs."""
    node, value = _constant(code, name)
    if KNOB_ANCHOR not in code or node.lineno <= code[:code.index(KNOB_ANCHOR)].count("\n") + 1:
        raise MutationError(f"expected {name} among the fixed constants (below {KNOB_ANCHOR.strip()!r}) of train.py")
    return _remove(code, name), NewKnob(_in_range(Knob(name, kind, value, low=low, high=high, log=log)), comment)


# -- the mutations ----------------------------------------------------------------------------------------

def _muon_momentum(code: str) -> tuple[str, list[NewKnob]]:
    _, (start, end) = _constant(code, "MUON_MOMENTUM")
    code = _set_value(code, "MUON_MOMENTUM", "(MUON_MOMENTUM_START, MUON_MOMENTUM_END)")
    code, warmup = _promote(code, "MUON_MOMENTUM_WARMUP_STEPS", "int", 10, 1000, True,
                            "steps to warm the momentum from its start to its end value")
    return code, [NewKnob(_in_range(Knob("MUON_MOMENTUM_START", "float", float(start), low=0.5, high=0.95)),
                          "Muon momentum at step 0"),
                  NewKnob(_in_range(Knob("MUON_MOMENTUM_END", "float", float(end), low=0.8, high=0.99)),
                          "Muon momentum after the warmup"),
                  warmup]


def _adam_betas(code: str) -> tuple[str, list[NewKnob]]:
    _, (beta1, beta2) = _constant(code, "ADAM_BETAS")
    code = _set_value(code, "ADAM_BETAS", "(ADAM_BETA1, ADAM_BETA2)")
    return code, [NewKnob(_in_range(Knob("ADAM_BETA1", "float", float(beta1), low=0.5, high=0.98)),
                          "AdamW first-moment decay (embeddings, lm_head, scalars)"),
                  NewKnob(_in_range(Knob("ADAM_BETA2", "float", float(beta2), low=0.8, high=0.999)),
                          "AdamW second-moment decay")]


def _short_window(code: str) -> tuple[str, list[NewKnob]]:
    code = _replace(code, 'sizes = {"L": seq_len, "S": seq_len // 2}',
                    'sizes = {"L": seq_len, "S": max(1, int(seq_len * SHORT_WINDOW_FRAC))}')
    return code, [NewKnob(Knob("SHORT_WINDOW_FRAC", "float", 0.5, low=0.0625, high=1.0, log=True),
                          "short (S) attention window as a fraction of seq_len")]


def _swiglu(code: str) -> tuple[str, list[NewKnob]]:
    code = _replace(code, "        self.c_fc = nn.Linear(d, 4 * d, bias=False)\n"
                          "        self.c_proj = nn.Linear(4 * d, d, bias=False)\n",
                    "        hidden = max(1, round(MLP_RATIO * d))\n"
                    '        self.gated = MLP_ACTIVATION == "swiglu"\n'
                    "        self.c_fc = nn.Linear(d, (2 if self.gated else 1) * hidden, bias=False)\n"
                    "        self.c_proj = nn.Linear(hidden, d, bias=False)\n")
    code = _replace(code, "        return self.c_proj(F.relu(self.c_fc(x)).square())\n",
                    "        h = self.c_fc(x)\n"
                    "        if self.gated:  # SwiGLU: a SiLU gate times a linear branch\n"
                    "            gate, up = h.chunk(2, dim=-1)\n"
                    "            return self.c_proj(F.silu(gate) * up)\n"
                    "        return self.c_proj(F.relu(h).square())\n")
    return code, [NewKnob(Knob("MLP_ACTIVATION", "categorical", "relu2", choices=("relu2", "swiglu")),
                          "relu2 (squared ReLU) or swiglu"),
                  NewKnob(Knob("MLP_RATIO", "float", 4.0, low=1.0, high=6.0), "MLP hidden width / model_dim")]


def _x0_lambda(code: str) -> tuple[str, list[NewKnob]]:
    code = _replace(code, "self.x0_lambdas = nn.Parameter(torch.full((n_layer,), 0.1))",
                    "self.x0_lambdas = nn.Parameter(torch.full((n_layer,), X0_LAMBDA_INIT))")
    return code, [NewKnob(Knob("X0_LAMBDA_INIT", "float", 0.1, low=0.0, high=0.5),
                          "initial weight of the input embedding mixed back into every layer")]


def _softcap(code: str) -> tuple[str, list[NewKnob]]:
    code, knob = _promote(code, "LOGIT_SOFTCAP", "float", 5.0, 60.0, True, "tanh cap of the logits")
    return code, [knob]


def _rope_base(code: str) -> tuple[str, list[NewKnob]]:
    code, knob = _promote(code, "ROPE_BASE", "float", 1000.0, 1_000_000.0, True, "rotary embedding base frequency")
    return code, [knob]


def _value_embed_every(code: str) -> tuple[str, list[NewKnob]]:
    code = _replace(code, '    """Every other layer, the last one included."""\n'
                          "    return layer % 2 == (n_layer - 1) % 2\n",
                    '    """Every VE_EVERY-th layer counting back from the last one, the last one included."""\n'
                    "    return (n_layer - 1 - layer) % VE_EVERY == 0\n")
    return code, [NewKnob(Knob("VE_EVERY", "int", 2, low=1, high=6), "a value embedding every k-th layer")]


def _embedding_wd(code: str) -> tuple[str, list[NewKnob]]:
    code = _replace(code, "        dict(params=[model.wte.weight], lr=EMBEDDING_LR * scale),\n"
                          "        dict(params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * scale),\n",
                    "        dict(params=[model.wte.weight], lr=EMBEDDING_LR * scale, weight_decay=EMBEDDING_WD),\n"
                    "        dict(params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * scale,\n"
                    "             weight_decay=EMBEDDING_WD),\n")
    return code, [NewKnob(Knob("EMBEDDING_WD", "float", 0.0, low=0.0, high=0.05),
                          "AdamW weight decay of the token and value embeddings")]


def _muon_ns_steps(code: str) -> tuple[str, list[NewKnob]]:
    _, table = _constant(code, "POLAR_EXPRESS")
    code = _replace(code, "    for a, b, c in POLAR_EXPRESS:\n",
                    "    for a, b, c in (POLAR_EXPRESS + POLAR_EXPRESS[-1:] * MUON_NS_STEPS)[:MUON_NS_STEPS]:"
                    "  # past the table, its last step repeats\n")
    return code, [NewKnob(_in_range(Knob("MUON_NS_STEPS", "int", len(table), low=2, high=8)),
                          "orthogonalization (Newton-Schulz / Polar Express) steps of Muon")]


def _gqa(code: str) -> tuple[str, list[NewKnob]]:
    code = _replace(code, "\n\ndef has_value_embedding(",
                    "\n\ndef kv_heads(n_head: int) -> int:\n"
                    '    """Key/value heads: each serves the largest divisor of n_head up to GQA_GROUP query heads."""\n'
                    "    group = max(g for g in range(1, min(GQA_GROUP, n_head) + 1) if n_head % g == 0)\n"
                    "    return n_head // group\n"
                    "\n\ndef has_value_embedding(")
    code = _replace(code, "        self.c_k = nn.Linear(d, d, bias=False)\n"
                          "        self.c_v = nn.Linear(d, d, bias=False)\n",
                    "        self.n_kv_head = kv_heads(config.n_head)\n"
                    "        self.c_k = nn.Linear(d, self.n_kv_head * config.head_dim, bias=False)\n"
                    "        self.c_v = nn.Linear(d, self.n_kv_head * config.head_dim, bias=False)\n")
    code = _replace(code, "nn.Linear(self.gate_channels, config.n_head, bias=False)",
                    "nn.Linear(self.gate_channels, self.n_kv_head, bias=False)")
    code = _replace(code, "        q, k, v = self.c_q(x).view(shape), self.c_k(x).view(shape), self.c_v(x).view(shape)\n",
                    "        kv_shape = (B, T, self.n_kv_head, self.head_dim)\n"
                    "        q, k, v = self.c_q(x).view(shape), self.c_k(x).view(kv_shape), self.c_v(x).view(kv_shape)\n")
    code = _replace(code, "gate.unsqueeze(-1) * ve.view(shape)", "gate.unsqueeze(-1) * ve.view(kv_shape)")
    rotary = "        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))\n"
    code = _replace(code, rotary,
                    rotary + "        if self.n_kv_head != self.n_head:  # each key/value head serves a group of query heads\n"
                             "            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=2)\n"
                             "            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=2)\n")
    code = _replace(code, "nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, d)",
                    "nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_heads(config.n_head) * config.head_dim)")
    return code, [NewKnob(Knob("GQA_GROUP", "int", 1, low=1, high=8),
                          "query heads per key/value head (grouped-query attention; 1 = multi-head)")]


# In the order the catalog breaks ties: the ones most likely to matter at a small scale and short budget first.
MUTATIONS: tuple[Mutation, ...] = (
    Mutation("muon_momentum", "Muon momentum schedule as knobs: start, end and warmup steps", _muon_momentum,
             "optimizer", ("MATRIX_LR", "WARMUP_RATIO")),
    Mutation("adam_betas", "AdamW betas of the embeddings, lm_head and scalars as knobs", _adam_betas,
             "optimizer", ("EMBEDDING_LR", "UNEMBEDDING_LR", "SCALAR_LR")),
    Mutation("short_window", "the short attention window as a fraction of the sequence (was 1/2)", _short_window,
             "attention", ("WINDOW_PATTERN",)),
    Mutation("swiglu", "MLP: SwiGLU as an alternative to squared ReLU, and the MLP width ratio", _swiglu,
             "architecture", ("DEPTH", "ASPECT_RATIO")),
    Mutation("x0_lambda", "initial weight of the x0 (input embedding) skip into every layer", _x0_lambda,
             "architecture", ("SCALAR_LR", "DEPTH")),
    Mutation("softcap", "the logit soft cap as a knob", _softcap, "regularization", ("UNEMBEDDING_LR",)),
    Mutation("rope_base", "the rotary base frequency as a knob", _rope_base, "attention", ("HEAD_DIM", "WINDOW_PATTERN")),
    Mutation("value_embed_every", "value embeddings every k-th layer (was every other)", _value_embed_every,
             "architecture", ("EMBEDDING_LR", "DEPTH")),
    Mutation("embedding_wd", "AdamW weight decay on the token and value embeddings (was none)", _embedding_wd,
             "regularization", ("WEIGHT_DECAY", "EMBEDDING_LR")),
    Mutation("muon_ns_steps", "the number of Muon orthogonalization steps", _muon_ns_steps, "optimizer",
             ("MATRIX_LR",)),
    Mutation("gqa", "grouped-query attention: fewer key/value heads than query heads", _gqa, "attention",
             ("HEAD_DIM", "DEPTH")),
)
BY_NAME = {m.name: m for m in MUTATIONS}


def carried(code: str) -> set[str]:
    """The catalog mutations whose knob declarations this train.py holds."""
    return {name for name in DECLARATION.findall(code) if name in BY_NAME}


def kind_values(evidence: Evidence, mutations: tuple[Mutation, ...]) -> dict[str, float]:
    """UCB1 over the kinds of mutation: the mean reward of the decided moves of a kind plus an exploration bonus;
    infinite for a kind not tried yet."""
    kinds = {m.name: m.kind for m in mutations}
    rewards: dict[str, list[float]] = {m.kind: [] for m in mutations}
    for attempt in evidence.attempts:
        reward = attempt.reward(evidence.noise)
        if reward is not None and attempt.mutation in kinds:
            rewards[kinds[attempt.mutation]].append(reward)
    total = sum(len(r) for r in rewards.values())
    return {kind: (sum(r) / len(r) + UCB_C * math.sqrt(math.log(total + 1) / len(r))) if r else math.inf
            for kind, r in rewards.items()}


def ranked(evidence: Evidence, parent: int, mutations: tuple[Mutation, ...] = MUTATIONS) -> list[Mutation]:
    """The mutations worth trying from `parent`, best first: untried before retried, then by the value of their
    kind, then by the importance of the knobs they interact with, then in catalog order. Those tried from this
    parent already are left out."""
    blocked = evidence.blocked(parent)
    tried = {a.mutation for a in evidence.attempts}
    values = kind_values(evidence, mutations)

    def key(indexed: tuple[int, Mutation]) -> tuple[bool, float, float, int]:
        index, m = indexed
        importance = sum(evidence.importances.get(k, 0.0) for k in m.related)
        return m.name in tried, -values[m.kind], -importance, index

    return [m for _, m in sorted(enumerate(mutations), key=key) if m.name not in blocked]


class CatalogAgent:
    """Proposes the best-ranked catalog mutation (see `ranked`) that applies to the parent."""
    source = "catalog"

    def __init__(self, mutations: tuple[Mutation, ...] = MUTATIONS) -> None:
        self.mutations = mutations

    def propose(self, context: Context) -> Proposal | None:
        found = context.evidence or Evidence(attempts(context.lineage))
        values = kind_values(found, self.mutations)
        for mutation in ranked(found, context.parent.number, self.mutations):
            try:
                applied = mutation.apply(context.parent.code)
            except MutationError:
                continue  # in the parent's code already, or its anchor is gone
            return Proposal(mutation.name, mutation.description, applied.code, applied.knobs,
                            attrs={"kind": mutation.kind, "kind_value": _finite(values[mutation.kind]),
                                   "tried_before": [f"{a.mutation}: {a.status}" for a in found.attempts]})
        return None


def _finite(value: float) -> float | None:
    """JSON has no infinity: an untried kind's value is recorded as None."""
    return value if math.isfinite(value) else None
