"""The hybrid method's pure decision functions, table by table: the noise margin, the pooled noise, a generation's
score from fresh re-runs, the verdict on a candidate generation (hybrid.promotion.judge), when a generation is due
for a structural move (Schedule.due) and where a new generation's knobs are probed (hybrid.probes)."""
from __future__ import annotations

import json
import math
from datetime import datetime

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from harness.result import PENALTY
from hybrid.study.generations import Generation
from hybrid.probes import at_unit, joint_probe, probe_configs, probe_values, unit
from hybrid.promotion import NOISE_Z, Schedule, Score, control_config, is_sampled, judge, margin, pooled_noise, score
from hybrid.space import Knob

X = {"x": FloatDistribution(0.0, 1.0)}


def trial(number: int, value: float | None, *, source: str = "tpe", x: float = 0.5, status: str = "ok") -> FrozenTrial:
    """A finished trial: val_bpb `value` when it succeeded (status ok), else a failure told as the penalty."""
    attrs = {"status": status if value is not None else "crash", "source": source}
    if value is not None:
        attrs["val_bpb"] = value
    ok = attrs["status"] == "ok" and value is not None
    return FrozenTrial(number=number, state=TrialState.COMPLETE, value=value if ok else PENALTY,
                       datetime_start=datetime(2026, 1, 1), datetime_complete=datetime(2026, 1, 1), params={"x": x},
                       distributions=X, user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=number)


# -- margin(noise, n_a, n_b): NOISE_Z standard errors of a difference of means -------------------------------------

@pytest.mark.parametrize("noise, n_a, n_b, expected", [
    (None, 1, 1, 0.0),                                        # noise unknown: no margin
    (None, 3, 5, 0.0),
    (0.0, 2, 2, 0.0),                                         # no noise measured: no margin
    (0.01, 1, 1, NOISE_Z * 0.01 * math.sqrt(2)),              # one run against one run
    (0.01, 3, 3, NOISE_Z * 0.01 * math.sqrt(2 / 3)),          # the means of three runs: narrower
    (0.01, 1, 3, NOISE_Z * 0.01 * math.sqrt(4 / 3)),
    (0.01, 3, 1, NOISE_Z * 0.01 * math.sqrt(4 / 3)),          # symmetric
    (1 / NOISE_Z, 2, 2, 1.0),                                 # exact: used for the tie below
], ids=["unknown", "unknown-3-5", "zero", "1-1", "3-3", "1-3", "3-1", "exact"])
def test_margin(noise: float | None, n_a: int, n_b: int, expected: float) -> None:
    assert margin(noise, n_a, n_b) == pytest.approx(expected, rel=1e-12, abs=0.0)


# -- pooled_noise(trials by generation): the pooled standard deviation of configs run more than once ------------

@pytest.mark.parametrize("generations, expected", [
    ({}, None),                                                                    # no generation
    ({0: []}, None),                                                               # no trial
    ({0: [trial(0, 1.0, x=0.1), trial(1, 1.1, x=0.2)]}, None),                     # no config twice
    ({0: [trial(0, 1.0), trial(1, 1.02)]}, math.sqrt(2e-4)),                       # one pair
    ({0: [trial(0, 1.0), trial(1, 2.0), trial(2, 3.0)]}, 1.0),                     # a triple: two degrees of freedom
    ({0: [trial(0, 1.0), trial(1, 1.02)], 1: [trial(2, 2.0), trial(3, 2.04)]},    # pooled over generations
     math.sqrt((2e-4 + 8e-4) / 2)),
    ({0: [trial(0, 1.0)], 1: [trial(1, 1.5)]}, None),                              # same config, two generations
    ({0: [trial(0, 1.0), trial(1, None)]}, None),                                  # a failure is no measurement
    ({0: [trial(0, 1.0), trial(1, 1.3, status="oom")]}, None),                     # nor an OOM with a val_bpb
    ({0: [trial(0, 1.0), trial(1, math.inf)]}, None),                              # nor a non-finite val_bpb
    ({0: [trial(0, 1.0), trial(1, 1.0)]}, 0.0),                                    # a tie: noise measured as zero
], ids=["empty", "no-trials", "no-repeat", "pair", "triple", "two-generations", "across-generations", "failure",
        "oom", "infinite", "tie"])
def test_pooled_noise(generations: dict[int, list[FrozenTrial]], expected: float | None) -> None:
    noise = pooled_noise(generations)
    assert noise == (None if expected is None else pytest.approx(expected, rel=1e-9))


# -- judge(parent score, candidate score, noise): promote only beyond the margin --------------------------------

MARGIN_3_3 = NOISE_Z * 0.01 * math.sqrt(2 / 3)


@pytest.mark.parametrize("parent, candidate, noise, promoted, reason, margin_, delta", [
    (Score(1.0, 3, 0.99), None, 0.01, False, "no successful trial", 0.0, None),                 # candidate failed
    (None, None, 0.01, False, "no successful trial", 0.0, None),                               # both failed
    (None, Score(1.0, 3, 0.99), 0.01, True, "the parent has no successful trial", 0.0, None),  # parent failed
    (None, Score(1.0, 1, 1.0), None, True, "the parent has no successful trial", 0.0, None),   # ... noise unknown
    (Score(1.0, 3, 1.0), Score(0.98, 3, 0.98), 0.01, True, "beats the parent", MARGIN_3_3, 0.02),
    (Score(1.0, 3, 1.0), Score(0.99, 3, 0.99), 0.01, False, "not more than the margin", MARGIN_3_3, 0.01),
    (Score(1.0, 3, 1.0), Score(1.01, 3, 1.01), 0.01, False, "not more than the margin", MARGIN_3_3, -0.01),  # worse
    (Score(1.0, 1, 1.0), Score(0.999, 1, 0.999), None, True, "beats the parent", 0.0, 0.001),  # noise unknown
    (Score(1.0, 1, 1.0), Score(1.0, 1, 1.0), None, False, "not more than the margin", 0.0, 0.0),  # tie, no noise
    (Score(3.0, 2, 3.0), Score(2.0, 2, 2.0), 1 / NOISE_Z, False, "not more than the margin", 1.0, 1.0),  # tie: margin
], ids=["candidate-failed", "both-failed", "parent-failed", "parent-failed-noise-unknown", "beats", "within-noise",
        "worse", "noise-unknown", "tie", "tie-with-margin"])
def test_judge(parent: Score | None, candidate: Score | None, noise: float | None, promoted: bool, reason: str,
               margin_: float, delta: float | None) -> None:
    verdict = judge(parent, candidate, noise)
    assert verdict.promoted is promoted and reason in verdict.reason
    assert verdict.margin == pytest.approx(margin_, rel=1e-12, abs=0.0)
    assert verdict.delta == (None if delta is None else pytest.approx(delta, abs=1e-12))
    assert verdict.noise == noise
    assert verdict.score == (candidate.value if candidate else None)
    assert verdict.parent_score == (parent.value if parent else None)
    stored = Generation(1, 0, "a candidate", "X = 1\n", {}, status="promoted", verdict=verdict)
    assert Generation.from_record(json.loads(json.dumps(stored.to_record()))).verdict == verdict  # as the study keeps it


# -- score(trials): the incumbent selected among tuning trials, scored by its fresh re-runs only --------------------

@pytest.mark.parametrize("trials, expected", [
    ([], None),                                                                         # nothing ran
    ([trial(0, None)], None),                                                           # nothing succeeded
    ([trial(0, 1.0)], Score(None, 0, 1.0)),                                             # selected, not re-run yet
    ([trial(0, 1.0, x=0.1), trial(1, 0.99, x=0.2), trial(2, 1.01, source="repeat", x=0.2)],
     Score(1.01, 1, 0.99)),                                                             # the re-run, not the selection
    ([trial(0, 1.0, x=0.1), trial(1, 0.99, x=0.2), trial(2, 0.95, source="repeat", x=0.1),
      trial(3, 1.01, source="repeat", x=0.2), trial(4, 1.03, source="repeat", x=0.2)],
     Score(1.02, 2, 0.99)),                                                             # a low re-run selects nothing
    ([trial(0, 0.99), trial(1, None, source="repeat")], Score(None, 0, 0.99)),          # a failed re-run: no value
], ids=["empty", "failed", "not-re-run", "fresh", "re-runs-never-select", "failed-re-run"])
def test_score_is_the_fresh_mean_of_the_incumbent(trials: list[FrozenTrial], expected: Score | None) -> None:
    measured = score(trials)
    assert (measured is None) == (expected is None)
    if expected is not None:
        assert measured.runs == expected.runs and measured.selection == expected.selection
        assert measured.value == (None if expected.value is None else pytest.approx(expected.value, abs=1e-12))


def test_the_control_switches_the_move_off() -> None:
    new = {"NEW": {"type": "float", "low": 0.0, "high": 1.0, "default": 0.5}}
    assert control_config({"x": 0.2, "NEW": 0.9}, new) == {"x": 0.2, "NEW": 0.5}
    assert control_config({"x": 0.2}, {}) == {"x": 0.2}


# -- judge with fresh re-runs: selection values never decide; the control guards against tuning progress ----------

MARGIN_2_2 = NOISE_Z * 0.001 * math.sqrt(2 / 2)


@pytest.mark.parametrize("parent, candidate, control, promoted, reason, reference, delta", [
    # Selection bias alone: the candidate's lucky selection run (0.995) beats the parent's (0.999) by more than
    # one-run margins, but fresh re-runs show the same model.
    (Score(1.000, 2, 0.999), Score(1.000, 2, 0.995), None, False, "not more than the margin", "parent", 0.0),
    (Score(1.000, 2, 0.999), Score(0.996, 2, 0.995), None, True, "beats the parent", "parent", 0.004),
    (Score(1.000, 2, 0.999), Score(None, 0, 0.990), None, False, "no successful re-run", None, None),
    (Score(None, 0, 1.000), Score(0.990, 2, 0.985), None, True, "beats the parent", "parent", 0.010),
    # Tuning progress, not the move: the incumbent with the move switched off is as good.
    (Score(1.000, 2, 0.999), Score(0.995, 2, 0.994), Score(0.995, 2), False, "switched off", "control", 0.0),
    (Score(1.000, 2, 0.999), Score(0.995, 2, 0.994), Score(1.010, 2), True, "beats the parent", "parent", 0.005),
    (Score(1.000, 2, 0.999), Score(0.995, 2, 0.994), Score(None, 0), True, "beats the parent", "parent", 0.005),
], ids=["selection-bias-alone", "fresh-gain", "not-reproduced", "parent-not-re-run", "tuning-progress",
        "control-worse", "control-failed"])
def test_judge_compares_fresh_re_runs(parent: Score, candidate: Score, control: Score | None, promoted: bool,
                                      reason: str, reference: str | None, delta: float | None) -> None:
    verdict = judge(parent, candidate, 0.001, control)
    assert verdict.promoted is promoted and reason in verdict.reason, verdict.reason
    assert verdict.reference == reference
    assert verdict.delta == (None if delta is None else pytest.approx(delta, abs=1e-12))
    assert verdict.selection == candidate.selection and verdict.parent_selection == parent.selection
    assert verdict.score == candidate.value and verdict.parent_score == parent.value
    if verdict.reference == "parent" and parent.value is not None:
        assert verdict.margin == pytest.approx(MARGIN_2_2)
    selection_margin = margin(0.001, 1, 1)
    if reason == "not more than the margin" and reference == "parent":  # what comparing selections would have done
        assert parent.selection - candidate.selection > selection_margin


# -- Schedule.due(trials, epoch_after, noise): mutate every M sampled trials, or after W without improvement -----

def tpe(*values: float | None, start: int = 0) -> list[FrozenTrial]:
    """Sampled trials numbered from `start`, each at a config of its own."""
    return [trial(start + i, v, x=(start + i) / 100) for i, v in enumerate(values)]


@pytest.mark.parametrize("schedule, trials, epoch_after, noise, expected", [
    (Schedule(3, 2), [], -1, None, None),                                                    # nothing run yet
    (Schedule(3, 2), [trial(0, 1.0, source="baseline")], -1, None, None),                   # the baseline alone
    (Schedule(3, 2), tpe(1.0, 0.9, 0.8), -1, None, "3 sampled trials"),                     # M sampled trials
    (Schedule(3, 9), tpe(1.0, 0.9), -1, None, None),                                         # one short of M
    (Schedule(3, 9), [trial(0, 1.0, source="baseline"), trial(1, 0.9, source="catalog"),     # pinned trials do
                      trial(2, 0.8, source="warmstart"), trial(3, 1.0, source="repeat"),     # not count
                      *tpe(0.7, 0.6, start=4)], -1, None, None),
    (Schedule(3, 9), tpe(1.0, 0.9, 0.8, 0.7, 0.6), 2, None, None),                          # only the epoch counts
    (Schedule(3, 9), tpe(1.0, 0.9, 0.8, 0.7, 0.6, 0.5), 2, None, "3 sampled trials"),
    (Schedule(2, 2), tpe(1.0, 1.1), -1, None, "2 sampled trials"),                          # M before W
    (Schedule(9, 2), [trial(0, 1.0, source="baseline"), *tpe(1.1, 1.2, start=1)], -1, None,
     "stagnation: 2 sampled trials"),                                                       # W without improvement
    (Schedule(9, 2), [trial(0, 1.0, source="baseline"), *tpe(1.1, start=1)], -1, None, None),  # one short of W
    (Schedule(9, 2), [trial(0, 1.0, source="baseline"), *tpe(0.99, 0.98, start=1)], -1, None,
     None),                                                                                 # noise unknown: any gain
    (Schedule(9, 2), [trial(0, 1.0, source="baseline"), *tpe(0.99, 0.98, start=1)], -1, 0.01,
     "stagnation: 2 sampled trials"),                                                       # gains within the noise
    (Schedule(9, 2), [trial(0, 1.0, source="baseline"), *tpe(0.9, 0.8, start=1)], -1, 0.01,
     None),                                                                                 # gains beyond it
    (Schedule(9, 2), [trial(0, 1.0, source="baseline"), *tpe(1.0, 1.0, start=1)], -1, None,
     "stagnation: 2 sampled trials"),                                                       # ties are no gain
    (Schedule(9, 2), [trial(0, None, source="baseline"), *tpe(None, None, start=1)], -1, None,
     "stagnation: 2 sampled trials"),                                                       # no success at all
    (Schedule(9, 2), [trial(0, None, source="baseline"), *tpe(None, 1.2, start=1)], -1, None,
     None),                                                                                 # a first success is a gain
    (Schedule(9, 2), [trial(0, 1.0, source="baseline"), *tpe(1.1, start=1),
                      trial(2, 0.5, source="repeat"), *tpe(1.2, start=3)], -1, None,
     "stagnation: 2 sampled trials"),                                                       # a repeat is no gain
    (Schedule(9, 2), tpe(1.1, 1.2, 1.3, 1.4), 2, None, None),                               # W, but not in the epoch
    (Schedule(9, 2), tpe(1.1, 1.2, 1.3, 1.4, 1.5), 2, None, "stagnation: 4 sampled trials"),
    (Schedule(9, 2), list(reversed(tpe(0.9, 1.0, 1.1))), -1, None, "stagnation: 2 sampled trials"),  # by number
], ids=["empty", "baseline", "mutate-every", "one-short", "pinned-not-counted", "epoch-only", "epoch-reaches-M",
        "M-first", "stagnation", "stagnation-one-short", "noise-unknown-any-gain", "gain-within-noise",
        "gain-beyond-noise", "ties", "no-success", "first-success", "repeat-is-no-gain", "stagnation-needs-epoch",
        "stagnation-in-epoch", "trial-order"])
def test_schedule_due(schedule: Schedule, trials: list[FrozenTrial], epoch_after: int, noise: float | None,
                      expected: str | None) -> None:
    reason = schedule.due(trials, epoch_after, noise)
    assert (reason is None) == (expected is None), reason
    if expected is not None:
        assert reason.startswith(expected), reason


# -- probes: the parent's incumbent with one new knob moved at a time ----------------------------------------------

@pytest.mark.parametrize("knob, expected", [
    (Knob("B", "float", 0.9, low=0.5, high=0.98), [0.572, 0.74]),              # 0.908 is within the gap: skipped
    (Knob("L", "float", 0.1, low=0.0, high=0.5), [0.25, 0.425]),                # 0.075 is within the gap: skipped
    (Knob("W", "float", 0.6, low=0.0625, high=1.0, log=True), [0.0947, 0.25]),  # log range; 0.66 within the gap
    (Knob("G", "int", 1, low=1, high=8), [2, 4, 7]),                            # rounded
    (Knob("V", "int", 2, low=1, high=3), [1, 3]),                               # distinct values only
    (Knob("A", "categorical", "relu2", choices=("relu2", "swiglu", "gelu")), ["swiglu", "gelu"]),
    (Knob("F", "float", 1.0, low=1.0, high=1.0), []),                           # a range of one value
], ids=["float", "near-default", "log", "int", "int-distinct", "categorical", "degenerate"])
def test_probe_values(knob: Knob, expected: list) -> None:
    assert probe_values(knob) == (pytest.approx(expected, abs=5e-4) if knob.type == "float" else expected)


@pytest.mark.parametrize("knobs, expected", [
    ([], []),
    ([Knob("A", "categorical", "a", choices=("a", "b"))], [{"X": 1, "A": "b", "G": 1}]),
    ([Knob("A", "categorical", "a", choices=("a", "b")), Knob("G", "int", 1, low=1, high=3)],
     [{"X": 1, "A": "b", "G": 1}, {"X": 1, "A": "a", "G": 2}, {"X": 1, "A": "a", "G": 3}]),
], ids=["no-new-knobs", "one-knob", "one-knob-at-a-time"])
def test_probe_configs_move_one_new_knob_at_a_time(knobs: list[Knob], expected: list[dict]) -> None:
    assert probe_configs({"X": 1, "A": "a", "G": 1}, knobs) == expected


JOINT_KNOBS = [Knob("A", "categorical", "a", choices=("a", "b")), Knob("G", "int", 1, low=1, high=3)]
FIRST = {"X": 1, "A": "a", "G": 1}


@pytest.mark.parametrize("measured, expected", [
    ([(FIRST, 1.0), ({**FIRST, "A": "b"}, 0.9), ({**FIRST, "G": 2}, 0.95), ({**FIRST, "G": 3}, 0.8)],
     {"X": 1, "A": "b", "G": 3}),                                     # each knob at its best probe
    ([(FIRST, 1.0), ({**FIRST, "A": "b"}, 0.9), ({**FIRST, "G": 2}, 1.1), ({**FIRST, "G": 3}, 1.2)],
     None),                                                           # one knob improved: already measured
    ([({**FIRST, "A": "b"}, 0.9), ({**FIRST, "G": 3}, 0.8)], None),   # the incumbent itself has no value
    ([(FIRST, 1.0), ({**FIRST, "A": "b"}, 0.9), ({"X": 2, "A": "a", "G": 3}, 0.5)], None),  # not a probe: X moved too
    ([(FIRST, 1.0), (FIRST, 0.7), ({**FIRST, "A": "b"}, 0.9), ({**FIRST, "G": 3}, 0.8)], None),  # neither beats 0.7
], ids=["two-improve", "one-improves", "no-incumbent-value", "not-a-probe", "best-incumbent-run"])
def test_the_joint_probe_combines_the_knobs_that_improved(measured: list, expected: dict | None) -> None:
    assert joint_probe(FIRST, JOINT_KNOBS, measured) == expected


@pytest.mark.parametrize("knob, value", [
    (Knob("F", "float", 0.3, low=0.0, high=2.0), 0.3), (Knob("L", "float", 0.01, low=1e-4, high=1.0, log=True), 0.01),
    (Knob("I", "int", 5, low=1, high=9), 5), (Knob("C", "categorical", "b", choices=("a", "b", "c")), "b"),
], ids=["float", "log", "int", "categorical"])
def test_at_unit_inverts_unit(knob: Knob, value: object) -> None:
    assert at_unit(knob, unit(knob, value)) == (value if knob.type == "categorical" else pytest.approx(value))


@pytest.mark.parametrize("source, sampled", [("probe", False), ("warmstart", False), ("repeat", False),
                                             ("catalog", False), ("tpe", True), ("cmaes", True)])
def test_probes_are_pinned_not_sampled(source: str, sampled: bool) -> None:
    assert is_sampled(trial(0, 1.0, source=source)) == sampled
