"""The offline catalog: every mutation applies to the real train.py, declares its knobs, passes the patch guard,
composes with the others, reproduces the baseline at its defaults, and trains for real on the test profile."""
from __future__ import annotations

import math
import random
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.knobs import find_knobs, inject_knobs
from harness.profiles import get_profile
from hybrid.evidence import Attempt, Evidence
from hybrid.study.generations import Generation
from hybrid.llm.catalog import BY_NAME, MUTATIONS, CatalogAgent, MutationError, carried, ranked
from hybrid.llm.guard import check_patch
from hybrid.paths import PROJECT_ROOT
from hybrid.space import Knob, check_against_code, load_space
from hybrid.structural import Context

BASELINE = (PROJECT_ROOT / "train.py").read_text()
SPACE = load_space(PROJECT_ROOT / "search_space.yaml", "test")
NAMES = [m.name for m in MUTATIONS]


def compose(order: list[str]) -> tuple[str, dict[str, Knob]]:
    code, knobs = BASELINE, {}
    for name in order:
        applied = BY_NAME[name].apply(code)
        code, knobs = applied.code, {**knobs, **applied.knobs}
    return code, knobs


def probe(knob: Knob) -> Any:
    """A value of the knob away from its default: another choice, or the middle of its range (in its scale)."""
    if knob.type == "categorical":
        return next(c for c in reversed(knob.choices) if c != knob.default)
    low, high = float(knob.low), float(knob.high)
    middle = math.sqrt(low * high) if knob.log else (low + high) / 2
    return knob.clamp(middle if not math.isclose(middle, knob.default) else high)


def test_the_catalog_has_at_least_eight_mutations_with_knobs_of_their_own() -> None:
    assert len(MUTATIONS) >= 8
    knobs = [name for m in MUTATIONS for name in m.apply(BASELINE).knobs]
    assert len(knobs) == len(set(knobs))
    assert not set(knobs) & set(SPACE.knobs)


@pytest.mark.parametrize("name", NAMES)
def test_each_mutation_applies_declares_its_knobs_and_passes_the_guard(name: str) -> None:
    code, knobs = compose([name])
    assert knobs and code != BASELINE
    check_against_code(SPACE.with_changes(knobs), code)
    found = find_knobs(code)
    for knob in knobs.values():
        assert found[knob.name].value == knob.default  # the declaration is the code's own value
        knob.check(probe(knob))
    check_patch(BASELINE, code)


@pytest.mark.parametrize("seed", range(3))
def test_mutations_compose_in_any_order(seed: int) -> None:
    order = NAMES[:]
    random.Random(seed).shuffle(order)
    code, knobs = compose(order)
    check_against_code(SPACE.with_changes(knobs), code)
    check_patch(BASELINE, code)
    assert compose(NAMES)[1] == knobs


def test_a_missing_anchor_is_a_clear_error() -> None:
    once, _ = compose(["swiglu"])
    with pytest.raises(MutationError, match=r"mutation swiglu: expected the anchor .* once in train\.py, found it 0 times"):
        compose(["swiglu", "swiglu"])
    with pytest.raises(MutationError, match="mutation rope_base: expected a top-level assignment ROPE_BASE"):
        BY_NAME["rope_base"].apply(once.replace("ROPE_BASE = ", "ROPE_BASE_GONE = "))


def _exec_train_py(code: str, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """train.py's definitions as a module (its main() is not called)."""
    module = types.ModuleType("train_under_test")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(inject_knobs(code, config), "train.py", "exec"), module.__dict__)
    return module.__dict__


def _one_step(code: str, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The parameters after one optimizer step of the model that the knobs describe, from a fixed seed."""
    ns = _exec_train_py(code, config, monkeypatch)
    torch.manual_seed(0)
    model = ns["build_model"](vocab_size=64, seq_len=16)
    optimizers = ns["build_optimizers"](model)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(idx[:, :-1], idx[:, 1:]).backward()
    ns["set_schedule"](optimizers, 0.3, 1)
    for opt in optimizers:
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_at_their_defaults_the_mutations_reproduce_the_baseline_model_and_step(monkeypatch: pytest.MonkeyPatch) -> None:
    config = SPACE.defaults()
    before = _one_step(BASELINE, config, monkeypatch)
    code, knobs = compose(NAMES)
    after = _one_step(code, {**config, **{k.name: k.default for k in knobs.values()}}, monkeypatch)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)


def _generation(number: int, parent: int | None, code: str, status: str, mutation: str | None) -> Generation:
    return Generation(number, parent, mutation or "base", code, SPACE.to_dict(), status=status, mutation=mutation)


def test_the_agent_skips_what_it_tried_and_says_so() -> None:
    agent = CatalogAgent()
    promoted_code = compose([NAMES[0]])[0]
    lineage = {0: _generation(0, None, BASELINE, "base", None),
               1: _generation(1, 0, promoted_code, "promoted", NAMES[0]),
               2: _generation(2, 1, compose([NAMES[0], NAMES[1]])[0], "rejected", NAMES[1])}
    proposal = agent.propose(Context(lineage[1], lineage, SPACE.defaults(), None))
    assert proposal.name == NAMES[2]
    assert proposal.attrs["tried_before"] == [f"{NAMES[0]}: promoted", f"{NAMES[1]}: rejected"]
    everything = compose(NAMES)[0]
    lineage[3] = _generation(3, 1, everything, "promoted", None)
    assert agent.propose(Context(lineage[3], lineage, SPACE.defaults(), None)) is None  # all in its code already


# -- choosing from evidence: ranked(evidence, parent) -----------------------------------------------------------

def _attempt(mutation: str, parent: int, status: str, delta: float | None = None) -> Attempt:
    return Attempt(mutation, 99, parent, status, delta, 0.0 if delta is not None else None)


@pytest.mark.parametrize("evidence, parent, first, absent", [
    (Evidence(), 0, "muon_momentum", ()),                                                # nothing known: catalog order
    (Evidence(importances={"DEPTH": 0.9}), 0, "swiglu", ()),                             # untried kinds: by importance
    (Evidence((_attempt("muon_momentum", 0, "rejected", -0.001),), noise=0.001), 0,      # a kind that lost: others
     "short_window", ("muon_momentum",)),                                                # first, never retried here
    (Evidence((_attempt("muon_momentum", 0, "promoted", 0.004), _attempt("short_window", 1, "rejected", -0.001),
               _attempt("swiglu", 1, "rejected", -0.001), _attempt("softcap", 1, "rejected", -0.001)), noise=0.001),
     1, "adam_betas", ("short_window", "swiglu", "softcap")),                            # the kind that paid off
    (Evidence((_attempt("muon_momentum", 0, "rejected", -0.001),), noise=0.001), 2,      # its parent changed: it may
     "short_window", ()),                                                                # run again, after the untried
], ids=["catalog-order", "importance", "lost-kind", "winning-kind", "parent-changed"])
def test_the_catalog_chooses_from_evidence(evidence: Evidence, parent: int, first: str, absent: tuple[str, ...]) -> None:
    order = [m.name for m in ranked(evidence, parent)]
    assert order[0] == first, order
    assert not set(absent) & set(order)
    tried = {a.mutation for a in evidence.attempts}
    retried = [i for i, name in enumerate(order) if name in tried]
    assert all(i >= len(order) - len(retried) for i in retried)  # a retry only after every untried mutation


def test_a_train_py_says_which_mutations_it_carries() -> None:
    assert carried(BASELINE) == set()
    assert carried(compose([NAMES[0], NAMES[3]])[0]) == {NAMES[0], NAMES[3]}


@pytest.mark.slow
def test_each_mutation_trains_for_real_on_the_test_profile(prepared_test, tmp_path: Path) -> None:
    """One real trial per mutation (its knobs away from their defaults), and one of all of them together."""
    from harness.runner import run_trial

    cases = {name: compose([name]) for name in NAMES}
    cases["all"] = compose(NAMES)

    def trial(name: str) -> tuple[str, Any]:
        code, knobs = cases[name]
        config = {**SPACE.defaults(), **{k.name: probe(k) for k in knobs.values()}}
        return name, run_trial(code, config, get_profile("test"), tmp_path / name)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(trial, cases))
    for name, result in results.items():
        assert result.status == "ok", f"{name}: {result.error} (log {result.log_path})"
        assert math.isfinite(result.val_bpb)
