"""The adversarial corpus (tests/hostile/cases.py) run for real, in the sandbox, on the test profile.

Each case is a hostile or careless edit of train.py. It runs through harness.runner.run_trial with
sandbox="required" while this process (the trusted side) holds planted secrets in its environment, a fake
$HOME with a .netrc, a trial database with a .pgpass next to it, a sentinel process and a loopback HTTP server.
A case passes when the trial fails as its `expect` says or scores honestly (no forged or read-ahead val_bpb),
no secret comes back (result, error, log, any file of the trial), nothing changed outside the trial's folder,
no process of it is left, and the trusted side is alive and unreached. See tests/hostile/arena.py.

The patch guard's verdict on each case is recorded too: informational (the guard is a first filter, not the
boundary), except that it must refuse the obvious ones (forbidden imports, file and process APIs).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from harness.profiles import get_profile
from harness.runner import run_trial
from hostile.arena import (Baseline, Outcome, Scene, TrustedSide, guard_verdict, outcome_table, run_case, run_code,
                           trial_config)
from hostile.cases import CASES, KINDS, TRAIN_PY, Case

OUTCOMES: list[Outcome] = []
# The cases run by default: each defence at least once (the in-process forgeries, the causality check, the clock,
# /proc and files, the database, the process tree, the rlimits). HYBRID_FULL_CORPUS=1 runs all of them, as does
# benchmarks/sandbox_corpus.py, whose last outcome is in benchmarks/results/sandbox_corpus.md. Left out of the
# sample for time: readahead_test_time_training (the slowest case; the same within-call check as bidirectional).
SAMPLE = {"forge_cross_entropy", "forge_torch_function", "forge_result_files_parents", "forge_clock_rewind",
          "readahead_bidirectional", "readahead_batch_size", "readahead_row_cache",
          "clock_train_in_warmup", "clock_train_past_done", "clock_train_during_eval",
          "secrets_proc_ancestors", "secrets_db_files", "secrets_loopback_http", "secrets_exception_environ",
          "files_venv_pth", "files_tokenizer_pickle", "files_db_write",
          "damage_kill_ancestors", "damage_daemon", "damage_fork_bomb", "damage_memory"}
FULL = os.environ.get("HYBRID_FULL_CORPUS") == "1"
# A trial's memory cap here (harness.sandbox.default_memory_bytes): a hog meets it at a few GiB on any machine,
# where 80 % of a large one's memory would let damage_memory's 8 GiB through without reaching the cap.
TRIAL_MEMORY_GB = 4
RUN = [c if FULL or c.name in SAMPLE else pytest.param(c, marks=pytest.mark.skip("not in the default sample: "
                                                                               "HYBRID_FULL_CORPUS=1 runs it"))
       for c in CASES]


def in_process(code: str, trial_dir: Path):  # noqa: ANN201
    return run_trial(code, trial_config(), get_profile("test"), trial_dir, seed=0, sandbox="required")


@pytest.fixture(scope="module")
def trusted(data_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    """The trusted side's secrets in this process's environment, its sentinel and loopback server; at the end,
    the outcome table in the session's temporary folder."""
    side = TrustedSide()
    mp = pytest.MonkeyPatch()
    for name, value in side.env.items():
        mp.setenv(name, value)
    mp.setenv("HYBRID_TRIAL_MEMORY_GB", str(TRIAL_MEMORY_GB))
    yield side
    mp.undo()
    side.close()
    if OUTCOMES:
        path = tmp_path_factory.getbasetemp() / "hostile_outcomes.md"
        path.write_text(outcome_table(OUTCOMES))
        print(f"\noutcome table of {len(OUTCOMES)} hostile runs: {path}")


@pytest.fixture(scope="module")
def baseline(trusted, data_dir, tmp_path_factory) -> Baseline:  # noqa: ANN001
    """The unmodified train.py, run the same way; it must pass every check itself. Measured again before a
    case's ok result is called forged (see arena.Baseline)."""

    def measure() -> Outcome:
        scene = Scene(tmp_path_factory.mktemp("baseline"), trusted, "baseline")
        mp = pytest.MonkeyPatch()
        mp.setenv("HOME", str(scene.home))
        try:
            outcome = run_code(TRAIN_PY.read_text(), Case("baseline", "forge", "honest", []), scene, in_process,
                               None, data_dir)
        finally:
            mp.undo()
        OUTCOMES.append(outcome)
        assert outcome.status == "ok", f"the baseline failed: {outcome.error}"
        assert not outcome.problems, outcome.problems
        return outcome

    reference = Baseline(measure)
    assert reference.value is not None
    return reference


def test_the_corpus_covers_every_kind():
    kinds = Counter(c.kind for c in CASES)
    assert len(CASES) >= 45
    assert set(kinds) == set(KINDS), kinds
    assert all(n >= 5 for n in kinds.values()), kinds


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_edit_applies_to_train_py(case: Case):
    text = TRAIN_PY.read_text()
    edited = case.code(marker="hostile0test")  # raises unless every anchor is found once and the text changed
    assert edited != text
    assert "HOSTILE_MARKER" not in edited


def test_the_sample_names_cases_of_the_corpus():
    assert SAMPLE <= {c.name for c in CASES}
    assert {c.kind for c in CASES if c.name in SAMPLE} == set(KINDS)


@pytest.mark.parametrize("case", RUN, ids=lambda c: c.name)
def test_hostile_case(case: Case, trusted: TrustedSide, baseline: Baseline, data_dir: Path, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch):
    scene = Scene(tmp_path, trusted, case.name)
    monkeypatch.setenv("HOME", str(scene.home))
    outcome = run_case(case, scene, in_process, baseline, data_dir)
    OUTCOMES.append(outcome)
    os.kill(os.getpid(), 0)  # the optimizer (this process) is alive
    assert not outcome.problems, (f"{case.name} ({case.doc}): status {outcome.status}, val_bpb {outcome.val_bpb}, "
                                  f"error {outcome.error!r}: " + " | ".join(outcome.problems))
    if case.name == "damage_memory":  # the cap stopped the hog before its 16th 512 MiB block
        assert len(outcome.reached) < 16, outcome.reached


# ------------------------------------------------------------------------------------------ the patch guard


@pytest.mark.parametrize("case", [c for c in CASES if c.guard_refuses], ids=lambda c: c.name)
def test_the_guard_refuses_the_obvious_ones(case: Case):
    verdict = guard_verdict(case.code())
    assert verdict.startswith("refused: "), f"{case.name}: the guard let it through ({case.doc})"


def test_the_guard_verdict_of_every_case_is_recorded(tmp_path_factory):
    """Informational: which cases the guard alone would stop (written next to the outcome table)."""
    verdicts = {c.name: guard_verdict(c.code()) for c in CASES}
    lines = ["| case | kind | guard |", "|---|---|---|"]
    lines += [f"| {c.name} | {c.kind} | {verdicts[c.name][:120]} |" for c in CASES]
    (tmp_path_factory.getbasetemp() / "hostile_guard.md").write_text("\n".join(lines) + "\n")
    refused = sum(v.startswith("refused") for v in verdicts.values())
    assert refused >= sum(c.guard_refuses for c in CASES)
