"""The hybrid method: structural mutations open new knobs, a classical sampler tunes each generation seeing only
that generation's trials (plus its warm start), noise-aware verdicts, the structural lease, a resume after
SIGKILL in the middle of a generation, LLM mutations and a hostile one, and a real run on the test profile."""
from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import git
import optuna
import pytest
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

import hybrid.config
import hybrid.evolution
import hybrid.loop
from harness.result import TrialResult
from hybrid.study import generations, optuna_compat, records, store
from hybrid.classical.warmstart import best_configs
from hybrid.cli import main
from hybrid.evolution import Snapshot, lineage_table
from hybrid.study.generations import Generation
from hybrid.study.lease import StructuralLease
from hybrid.llm.catalog import MUTATIONS
from hybrid.llm.guard import PatchRejected
from hybrid.llm.structural_agent import read_knobs, structural_task
from hybrid.promotion import control_config
from hybrid.paths import PROJECT_ROOT
from hybrid.probes import joint_probe, probe_configs
from hybrid.promotion import REPEATS
from hybrid.space import SearchSpace, load_space
from hybrid.structural import Context

TESTS = Path(__file__).resolve().parent
BASE = load_space(PROJECT_ROOT / "search_space.yaml", "test")
STORAGE = "sqlite:///runs/hybrid.db"


def _unit(space: SearchSpace, name: str, value: Any) -> float:
    knob = space.knobs[name]
    if knob.type == "categorical":
        return knob.choices.index(value) / max(1, len(knob.choices) - 1)
    low, high, x = float(knob.low), float(knob.high), float(value)
    if knob.log:
        low, high, x = math.log(low), math.log(high), math.log(x)
    return (x - low) / (high - low)


class NewKnobObjective:
    """Instant trials on a bowl over the knobs; a knob the base space lacks scores 0 at its default and up to
    0.02 better elsewhere, so mutations can pay off. Gaussian noise (0.002) seeded by the trial number."""
    name = "fake"

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause

    def evaluate(self, code: str, config: dict, *, seed: int, trial_number: int, trial_dir: Path) -> TrialResult:
        time.sleep(self.pause)
        value = 1.0
        for name, v in config.items():
            target = random.Random(name).random()
            if name in BASE.knobs:
                value += 0.02 * (_unit(BASE, name, v) - target) ** 2
            else:
                knob = _catalog_knobs()[name]
                value -= 0.02 * ((knob_unit(knob, knob.default) - target) ** 2 - (knob_unit(knob, v) - target) ** 2)
        value += random.Random(trial_number).gauss(0.0, 0.002)
        return TrialResult(val_bpb=value, training_seconds=1.0, total_seconds=1.0, config=dict(config))


def knob_unit(knob, value: Any) -> float:  # noqa: ANN001
    return _unit(SearchSpace({knob.name: knob}), knob.name, value)


@functools.cache
def _catalog_knobs() -> dict:
    code = (PROJECT_ROOT / "train.py").read_text()
    return {name: knob for m in MUTATIONS for name, knob in m.apply(code).knobs.items()}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: NewKnobObjective())


def run(capsys: pytest.CaptureFixture, *argv: str) -> str:
    code = main(["run", "--method", "hybrid", "--study", "s", "--profile", "test", *argv])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def load(name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=store.open_storage(STORAGE))


def check_invariants(study: optuna.Study) -> None:
    """What every hybrid study must satisfy, whatever happened to the run."""
    gens = generations.load_all(study)
    trials = store.finished_trials(study)
    assert sorted(gens) == list(range(len(gens)))
    assert sum(g.status == "candidate" for g in gens.values()) <= 1
    mutations = [(g.parent, g.mutation) for g in gens.values() if g.agent == "catalog"]
    assert len(mutations) == len(set(mutations)), mutations  # a move is retried only from another parent
    for t in trials:
        gen = gens[t.user_attrs["generation"]]
        if t.user_attrs["status"] != "rejected":
            assert set(t.params) == set(gen.space), t.number
            assert t.user_attrs["code_sha"] == store.code_sha(gen.code)
    for gen in gens.values():
        mine = sorted((t for t in trials if t.user_attrs["generation"] == gen.number
                       and t.user_attrs["status"] != "rejected"), key=lambda t: t.number)
        if gen.parent is None or not mine:
            continue
        cut, warm = gen.created_after_trial, set(gen.warm_start_trials)
        parent_trials = [t for t in trials if t.number in warm]  # finished when the generation was created
        assert len(parent_trials) == len(warm)
        assert all(t.user_attrs["generation"] == gen.parent and t.number <= cut for t in parent_trials)
        first = mine[0]
        assert first.user_attrs["source"] in ("catalog", "llm-code") and first.user_attrs["mutation"] == gen.mutation
        assert first.params == best_configs(parent_trials, gen.search_space(), 1)[0]  # the parent's incumbent
    for t in trials:
        if t.user_attrs["source"] == "repeat":
            gen = gens[t.user_attrs["generation"]]
            switched_off = {o.number for o in trials if "control_of" in t.user_attrs
                            and control_config(o.params, gen.new_knobs) == t.params}
            same = [o for o in trials if o.user_attrs["generation"] == t.user_attrs["generation"]
                    and (o.params == t.params or o.number in switched_off) and o.number < t.number]
            assert same and t.user_attrs["repeat_of"] in {o.number for o in same}
            assert t.user_attrs["seed"] not in {o.user_attrs["seed"] for o in same}  # a seed of its own


def test_generations_open_new_knobs_with_warm_starts_and_recorded_verdicts(fake: None, capsys) -> None:  # noqa: ANN001
    err = run(capsys, "--trials", "45", "--mutate-every", "6", "--stagnation", "3")
    study = load()
    check_invariants(study)
    gens = generations.load_all(study)
    trials = store.finished_trials(study)
    assert len(gens) >= 3 and gens[0].status == "base"
    base_knobs = set(gens[0].space)
    later = [t for t in trials if set(t.params) - base_knobs]
    assert later, "no trial tuned a knob that generation 0 lacks"
    new_knobs = {k for t in later for k in t.params} - base_knobs
    assert any(len({t.params[k] for t in later if k in t.params}) > 1 for k in new_knobs)  # explored, not pinned

    decided = [g for g in gens.values() if g.status in ("promoted", "rejected")]
    assert decided
    for g in decided:
        assert g.verdict.margin >= 0 and g.verdict.noise > 0 and g.why == g.verdict.reason
        assert (g.verdict.delta > g.verdict.margin) == (g.status == "promoted") == g.verdict.promoted
        assert g.agent == "catalog" and g.diff.startswith("--- a/train.py") and g.new_knobs
    repeats = [t for t in trials if t.user_attrs["source"] == "repeat"]
    assert len(repeats) >= REPEATS * len(decided)
    warm = [t for t in trials if t.user_attrs["source"] == "warmstart"]
    assert warm and all(t.user_attrs["generation"] > 0 for t in warm)
    joint = [t for t in trials if t.user_attrs.get("joint_probe")]
    assert joint, "no candidate measured its improving knobs together"
    for t in joint:  # after its generation's probes, each knob at its best probe where that beat the first trial
        gen, before = gens[t.user_attrs["generation"]], [u for u in trials if u.number < t.number]
        mine = [u for u in before if u.user_attrs["generation"] == gen.number]
        first = dict(mine[0].params)
        knobs = [gen.search_space().knobs[k] for k in gen.new_knobs]
        assert all(any(u.params == c for u in mine) for c in probe_configs(first, knobs))
        assert dict(t.params) == joint_probe(first, knobs, [(dict(u.params), records.ok_value(u)) for u in mine
                                                              if records.ok_value(u) is not None])

    repo = git.Repo(Path("runs") / "s" / "lineage")
    tags = {t.name: t.commit for t in repo.tags}
    for g in gens.values():
        if g.status != "rejected" or g.commit is not None:
            assert tags[f"gen-{g.number}"].hexsha == g.commit
            assert (tags[f"gen-{g.number}"].tree / "train.py").data_stream.read().decode() == g.code
    for g in gens.values():
        if g.parent is not None and f"gen-{g.number}" in tags:
            assert tags[f"gen-{g.number}"].parents[0] == tags[f"gen-{g.parent}"]

    rows = lineage_table(study)
    assert [r["generation"] for r in rows] == sorted(gens)
    assert rows[0]["mutation"] == "baseline" and all(r["best_val_bpb"] for r in rows if r["trials"])
    assert "lineage:" in err and gens[1].mutation in err


class Recording(BaseSampler):
    """A sampler that records which trials it was shown and which it sampled."""
    log: list[Recording] = []

    def __init__(self, base: BaseSampler) -> None:
        self.base = base
        self.seen: set[int] = set()      # generations of the trials it was shown
        self.sampled: set[int] = set()   # numbers of the trials it sampled
        Recording.log.append(self)

    def _look(self, study, trial: FrozenTrial) -> None:  # noqa: ANN001
        self.seen |= {t.user_attrs.get("generation") for t in study.get_trials(deepcopy=False)}
        self.seen |= {t.user_attrs.get("generation") for t in optuna_compat.study_trials(study, deepcopy=False, use_cache=True)}
        self.sampled.add(trial.number)

    def infer_relative_search_space(self, study, trial):  # noqa: ANN001, ANN201
        self._look(study, trial)
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):  # noqa: ANN001, ANN201
        self._look(study, trial)
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, name, distribution):  # noqa: ANN001, ANN201
        self._look(study, trial)
        return self.base.sample_independent(study, trial, name, distribution)

    def before_trial(self, study, trial) -> None:  # noqa: ANN001
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001
        self.base.after_trial(study, trial, state, values)


@pytest.mark.parametrize("sampler, trials", [("tpe", 36), ("cmaes", 36), ("gp", 28)])  # GP fits cost seconds
def test_a_generations_sampler_sees_only_that_generations_trials(sampler: str, trials: int, fake: None, capsys,  # noqa: ANN001
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sources: dict[int, list[FrozenTrial]] = {}
    real = hybrid.evolution.make_sampler

    def recording(name: str, seed: int, **kwargs: Any) -> BaseSampler:
        if kwargs.get("source_trials") is not None:
            sources[len(Recording.log)] = kwargs["source_trials"]
        return Recording(real(name, seed, **kwargs))

    monkeypatch.setattr(Recording, "log", [])
    monkeypatch.setattr(hybrid.evolution, "make_sampler", recording)
    run(capsys, "--sampler", sampler, "--trials", str(trials), "--mutate-every", "4", "--stagnation", "2")
    study = load()
    check_invariants(study)
    generation_of = {t.number: t.user_attrs.get("generation") for t in study.get_trials()}
    assert len(Recording.log) >= 3
    for recorder in Recording.log:
        sampled = {generation_of[n] for n in recorder.sampled}
        assert len(sampled) <= 1 and recorder.seen <= sampled, (recorder.seen, sampled)
    assert len({generation_of[n] for r in Recording.log for n in r.sampled}) >= 2

    if sampler == "cmaes":  # its warm start: the parent's trials, projected into the child's space
        gens = generations.load_all(study)
        checked = 0
        for index, trials in sources.items():
            if not Recording.log[index].sampled:
                continue
            child = gens[generation_of[min(Recording.log[index].sampled)]]
            parent_values = {t.value for t in study.get_trials() if t.user_attrs.get("generation") == child.parent}
            assert {t.value for t in trials} <= parent_values
            numeric = {k for k, v in child.space.items() if v["type"] != "categorical"}
            assert all(set(t.params) == numeric for t in trials)
            checked += 1
        assert checked


def test_the_lease_is_exclusive_expires_and_survives_races(tmp_path: Path) -> None:
    storage = store.open_storage(f"sqlite:///{tmp_path / 'lease.db'}")
    study = optuna.create_study(storage=storage, study_name="l")
    a, b = StructuralLease(study, seconds=60), StructuralLease(study, seconds=1.0)
    assert a.try_acquire() and a.try_acquire()  # re-entrant for its holder
    assert not b.try_acquire()
    a.release()
    assert a.current() is None
    assert b.try_acquire() and b.renew()  # and b dies holding it
    assert not a.try_acquire() and not a.renew()
    time.sleep(1.1)
    assert a.try_acquire()
    assert not b.renew()  # b, back from a long LLM call, learns it lost the lease before writing anything
    b.release()  # a late release of an expired lease leaves the new holder alone
    assert a.current()["holder"] == a.holder
    a.release()
    _race(study)


def _race(study: optuna.Study, rounds: int = 10, workers: int = 6) -> None:
    """Workers grab the free lease at once, round after round: exactly one wins each time."""
    leases = [StructuralLease(study) for _ in range(workers)]
    for _ in range(rounds):
        start, wins = threading.Barrier(workers), []

        def grab(lease: StructuralLease) -> None:
            start.wait()
            if lease.try_acquire():
                wins.append(lease)

        threads = [threading.Thread(target=grab, args=(lease,)) for lease in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        wins[0].release()


@pytest.mark.postgres
def test_the_lease_on_postgresql() -> None:
    import pg

    try:
        with pg.postgres_server() as url:
            _race(optuna.create_study(storage=store.open_storage(url), study_name="l"))
    except pg.Unavailable as e:
        pytest.skip(str(e))


def _study_created(db: Path) -> bool:
    """The run's study is complete (its run config is written last), read without creating anything."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return bool(conn.execute("SELECT 1 FROM study_user_attributes WHERE key = ?", (store.RUN_KEY,)).fetchall())
    except sqlite3.Error:
        return False


DRIVER = """
import sys, hybrid.loop
sys.path.insert(0, {tests!r})
from test_evolution import NewKnobObjective
hybrid.loop.objective_for = lambda *a, **k: NewKnobObjective(pause=0.3)
from hybrid.cli import main
sys.exit(main({argv!r}))
"""


def test_a_run_killed_in_the_middle_of_a_generation_resumes_it(fake: None, capsys, tmp_path: Path,  # noqa: ANN001
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["run", "--method", "hybrid", "--study", "s", "--profile", "test", "--trials", "30",
            "--mutate-every", "5", "--stagnation", "3"]
    env = {**os.environ, "HYBRID_HEARTBEAT_SECONDS": "0.5"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER.format(tests=str(TESTS), argv=argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    moment = None
    deadline = time.monotonic() + 120
    while moment is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        if not _study_created(Path("runs/hybrid.db")):
            continue  # opening the storage now would race the run's creation of the schema
        snap = Snapshot.load(load())
        gen = snap.current
        running = [t for t in snap.attempted[gen.number] if t.state == TrialState.RUNNING and t.params]
        if gen.status == "candidate" and snap.finished[gen.number] and running:
            moment = (gen.number, running[0].number, len(store.finished_trials(load())))
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert moment is not None, proc.stderr.read().decode()[-2000:]
    candidate, interrupted, done_before = moment

    monkeypatch.setattr(store, "GRACE_SECONDS", 0.5)
    assert main(["resume", "--study", "s", "--storage", STORAGE]) == 0
    study = load()
    check_invariants(study)
    trials = store.finished_trials(study)
    assert len(trials) == 30 > done_before
    dead = study.get_trials()[interrupted]  # settled by the resume: failed and never counted, or, if the kill
    assert dead.state != TrialState.RUNNING  # came after its outcome was written, told that outcome
    assert records.is_finished(dead) == ("status" in dead.user_attrs)
    gens = generations.load_all(study)
    resumed = [t for t in trials if t.user_attrs["generation"] == candidate and t.number > interrupted]
    assert resumed, "the resumed run did not go on with the generation on probation"
    assert gens[candidate].status in ("candidate", "promoted", "rejected")
    assert len(gens) >= candidate + 1


def run_forked_workers(study: optuna.Study, n: int, *, trials: int) -> list[int | None]:
    """n workers on the study's run, to `trials` in all, as `--workers n` runs them (forked here, so that they keep
    the test's objective); their exit codes."""
    config = hybrid.config.RunConfig.from_dict({**store.run_info(study), "trials": trials})
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=hybrid.loop.run_worker, args=("s", config, i, hybrid.loop.objective_for),
                           kwargs={"show": False})
               for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    return [w.exitcode for w in workers]


def test_workers_share_one_lineage(fake: None, capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Three worker processes on one study: one structural move at a time, the others tune meanwhile."""
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: NewKnobObjective(pause=0.05))
    run(capsys, "--trials", "1", "--mutate-every", "4", "--stagnation", "3")  # creates the study
    study = load()
    # 60 trials: a second move comes however the workers interleave (at 40, one run decided its first move only
    # after trial 31 and had not yet made the next)
    assert run_forked_workers(study, 3, trials=60) == [0, 0, 0]
    study = load()
    check_invariants(study)
    trials = store.finished_trials(study)
    assert len(trials) == 60 and len(generations.load_all(study)) >= 3
    assert StructuralLease(study).current() is None  # released by whoever held it last


class LateTrial(NewKnobObjective):
    """Trial 2 finishes, with the best value of the run, only once another worker has created a child generation."""

    def evaluate(self, code: str, config: dict, *, seed: int, trial_number: int, trial_dir: Path) -> TrialResult:
        result = super().evaluate(code, config, seed=seed, trial_number=trial_number, trial_dir=trial_dir)
        deadline, study = time.monotonic() + 120, load()
        while trial_number == 2 and len(generations.load_all(study)) < 2:
            if time.monotonic() > deadline:
                return TrialResult(status="crash", error="no child generation within 120 s")
            time.sleep(0.05)
        return dataclasses.replace(result, val_bpb=0.5) if trial_number == 2 else result


def test_a_parent_trial_that_finishes_after_the_mutation_is_not_a_warm_start(fake: None, capsys,  # noqa: ANN001
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The child starts from the parent's incumbent as it stood when the child was created: an older trial of
    the parent still in flight then (another worker's) does not change it afterwards."""
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: LateTrial(pause=0.02))
    run(capsys, "--trials", "1", "--mutate-every", "4", "--stagnation", "3")
    assert run_forked_workers(load(), 2, trials=16) == [0, 0]
    study = load()
    check_invariants(study)
    late, child = study.trials[2], generations.load_all(study)[1]
    assert late.value == 0.5 and late.user_attrs["generation"] == 0 and late.number <= child.created_after_trial
    assert late.number not in child.warm_start_trials
    first = min((t for t in store.finished_trials(study) if t.user_attrs["generation"] == 1), key=lambda t: t.number)
    assert first.params != late.params


def test_a_baseline_enqueued_again_after_a_mutation_runs_the_base_code_at_its_defaults(fake: None, capsys) -> None:  # noqa: ANN001
    """A baseline whose worker died is enqueued again (store.settle); if another worker takes it once generation 1
    is the current one, it still runs generation 0's code at the defaults, recorded as generation 0's baseline."""
    run(capsys, "--trials", "8", "--mutate-every", "3", "--stagnation", "2")
    study = load()
    gens = generations.load_all(study)
    assert max(gens) >= 1 and gens[max(gens)].status == "candidate"  # the current generation is not the base
    orphan = study.ask()  # as a worker that died holding it would have left it
    assert orphan.user_attrs == {}
    study.enqueue_trial(BASE.defaults(), user_attrs={"source": "baseline"})
    died = study.ask()
    assert died.user_attrs["source"] == "baseline"
    store.settle(study, optuna_compat.trial_id(died))  # failed, and the baseline enqueued again
    study.tell(orphan, state=optuna.trial.TrialState.FAIL)
    config = hybrid.config.RunConfig.from_dict({**store.run_info(study), "trials": 9})  # one trial more
    assert hybrid.loop.run_worker("s", config, 0, hybrid.loop.objective_for, show=False) == 0
    study = load()
    check_invariants(study)
    again = [t for t in store.finished_trials(study) if t.user_attrs["source"] == "baseline"]
    assert len(again) == 2
    assert again[1].user_attrs["generation"] == 0 and again[1].params == BASE.defaults()
    assert again[1].user_attrs["code_sha"] == store.code_sha(gens[0].code)


def test_a_candidates_trials_are_screened_against_its_parent_but_not_its_repeats(fake: None, capsys) -> None:  # noqa: ANN001
    run(capsys, "--trials", "12", "--mutate-every", "3", "--stagnation", "2")
    study = load()
    gens = generations.load_all(study)
    candidate = [t for t in store.finished_trials(study) if t.user_attrs["generation"] > 0]
    assert candidate, "no trial of a new generation"
    for t in candidate:
        gen = gens[t.user_attrs["generation"]]
        judged = gen.decided_after_trial is not None and t.number > gen.decided_after_trial  # no candidate any more
        expected = None if t.user_attrs["source"] == "repeat" or judged else [gen.parent]
        assert t.user_attrs.get(records.PRUNE_WITH) == expected, (t.number, t.user_attrs["source"])
    assert all(records.PRUNE_WITH not in t.user_attrs for t in store.finished_trials(study)
               if t.user_attrs["generation"] == 0)


def _hostile(current: str) -> str:
    return ("Change: read the validation data directly\n\n```diff\n--- a/train.py\n+++ b/train.py\n@@ -6,3 +6,4 @@\n"
            " import gc\n+import os\n import math\n import time\n```\n\n```json\n{}\n```\n")


def _good(current: str) -> str:
    swiglu = next(m for m in MUTATIONS if m.name == "swiglu").apply(current)
    body = swiglu.code.replace("# swiglu: ", "# ")
    return ("Change: SwiGLU MLP with a tunable width\n\nGated MLPs train better per parameter.\n\n"
            f"```python\n{body}```\n\n```json\n"
            '{"MLP_ACTIVATION": {"type": "categorical", "choices": ["relu2", "swiglu"], "default": "relu2"},\n'
            ' "MLP_RATIO": {"type": "float", "low": 1.0, "high": 6.0, "default": 4.0}}\n```\n')


def test_llm_mutations_run_and_a_hostile_one_is_rejected_without_harm(fake: None, capsys,  # noqa: ANN001
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_server import FakeLLM

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("HYBRID_LLM_ATTEMPTS", "1")
    current = (PROJECT_ROOT / "train.py").read_text()
    with FakeLLM([_hostile(current)], responder=lambda system, prompt: _good(current)) as llm:
        run(capsys, "--llm", "openai", "--llm-base-url", llm.base_url + "/v1", "--trials", "24",
            "--mutate-every", "6", "--stagnation", "4")
        prompts = [r.prompt for r in llm.requests]
    study = load()
    check_invariants(study)
    gens = generations.load_all(study)
    hostile, good = gens[1], gens[2]
    assert hostile.status == "rejected" and hostile.reason.startswith("patch guard: line")
    refused = [t for t in store.finished_trials(study) if t.user_attrs["generation"] == 1]
    assert [t.user_attrs["status"] for t in refused] == ["rejected"] and refused[0].user_attrs["total_seconds"] == 0
    assert "generation 1 (from 0), rejected" in prompts[1] and "patch guard" in prompts[1]
    assert good.agent == "llm-code" and set(good.new_knobs) == {"MLP_ACTIVATION", "MLP_RATIO"}
    tuned = [t.params for t in store.finished_trials(study) if t.user_attrs["generation"] == 2]
    assert len(tuned) >= 4 and len({p["MLP_RATIO"] for p in tuned}) > 1  # its warm starts, then the sampler
    assert {t.user_attrs["status"] for t in store.finished_trials(study)} <= {"ok", "rejected"}


@pytest.mark.slow
def test_a_few_real_generations_on_the_test_profile(prepared_test, tmp_path: Path, capsys,  # noqa: ANN001
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # 8 trials reach a second generation whatever the noise (the baseline, a sampled trial and the one repeat of its
    # incumbent, then the mutation) and run its first trials: its parent's incumbent, then its probes.
    run(capsys, "--llm", "none", "--trials", "8", "--mutate-every", "1", "--stagnation", "1", "--repeats", "1")
    study = load()
    check_invariants(study)
    gens = generations.load_all(study)
    assert len(gens) >= 2 and any(t.user_attrs["generation"] == 1 for t in store.finished_trials(study))
    firsts = [min((t for t in store.finished_trials(study) if t.user_attrs["generation"] == n), key=lambda t: t.number)
              for n in gens if any(t.user_attrs["generation"] == n for t in store.finished_trials(study))]
    for t in firsts:
        assert t.user_attrs["status"] == "ok" and math.isfinite(t.user_attrs["val_bpb"])


def test_the_llm_agent_reads_knob_declarations_and_is_told_the_lineage() -> None:
    knobs = read_knobs('x\n```json\n{"MLP_RATIO": {"type": "float", "low": 1, "high": 6, "default": 4.0}}\n```\n')
    assert knobs["MLP_RATIO"].high == 6 and read_knobs("no block") == {}
    for bad, why in (('{"A": {"type": "float", "low": 2, "high": 1, "default": 1}}', "low .* must be below"),
                     ("[1, 2]", "one object"), ("{nope", "does not parse")):
        with pytest.raises(PatchRejected, match=why):
            read_knobs(f"```json\n{bad}\n```")
    base = Generation(0, None, "base", "x = 1\n", BASE.to_dict(), status="base")
    tried = Generation(1, 0, "logit soft cap as a knob", "x = 2\n", BASE.to_dict(), diff="--- a/train.py\n+x = 2\n",
                       status="rejected", new_knobs={"LOGIT_SOFTCAP": {}},
                       reason="improves by 0.001, not more than the margin 0.004")
    task = structural_task(Context(base, {0: base, 1: tried}, {"DEPTH": 2}, 1.2345))
    assert "val_bpb 1.2345 with DEPTH=2" in task and "generation 1 (from 0), rejected: logit soft cap" in task
    assert "New knobs: LOGIT_SOFTCAP. improves by 0.001" in task and "+x = 2" in task
