"""llm-hp, llm-code and centaur driven through the real run loop, the real SDKs and the fake provider: first on an
objective that answers at once (many trials, every branch, in seconds), then on real training (the `test` profile)."""
from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import git
import numpy as np
import optuna
import pytest
import yaml
from llm_server import Fail, FakeLLM, Hang, config_answer, file_answer, shown_proposal, shown_train_py
from optuna.trial import TrialState

from harness import profiles
from harness.knobs import inject_knobs
from harness.result import TrialResult
from hybrid import cli, loop
from hybrid.study import generations, optuna_compat, records, store
from hybrid.config import RunConfig
from hybrid.llm import centaur
from hybrid.llm.centaur import CentaurMethod, UnitCube
from hybrid.llm.code_agent import generation_space
from hybrid.llm.edits import read_edit
from hybrid.llm.guard import PatchRejected, check_patch
from hybrid.llm.hp_agent import ConfigRejected, read_config
from hybrid.paths import PROJECT_ROOT
from hybrid.space import load_space
from util import closed_port

TRAIN_PY, SPACE_YAML = PROJECT_ROOT / "train.py", PROJECT_ROOT / "search_space.yaml"
SPACE = load_space(SPACE_YAML, "test")
CORPUS = Path(__file__).parent / "data" / "llm_answers"
KEY = "sk-test-SECRET123"


class QuickObjective:
    """val_bpb: a bowl in the unit cube of the knobs, lower for every `# faster` line in train.py, higher for `# slower`."""
    name = "quick"

    def evaluate(self, code, config, *, seed, trial_number, trial_dir) -> TrialResult:
        distance = float(np.sum((UnitCube(SPACE).encode(config) - 0.3) ** 2))
        value = 1.0 + distance - 0.05 * code.count("# faster") + 0.05 * code.count("# slower")
        return TrialResult(status="ok", val_bpb=value, training_seconds=1.0, total_seconds=1.0, config=dict(config))


@pytest.fixture
def llm_env(monkeypatch, tmp_path):
    """A key in the environment, short retries, no other provider settings."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("HYBRID_LLM_BACKOFF_SECONDS", "0.01")
    monkeypatch.setenv("HYBRID_LLM_TIMEOUT_SECONDS", "60")  # a request to the fake server needs 0.02-0.2 s
    monkeypatch.setenv("HYBRID_LLM_ATTEMPTS", "3")
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "anthropic-config"))
    for name in ("ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def quick_objective(config: RunConfig, study: optuna.Study, stop: threading.Event) -> QuickObjective:
    """loop.run's objective in these tests."""
    return QuickObjective()


@pytest.fixture
def quick(monkeypatch, llm_env):
    """An LLM environment, and the QuickObjective for runs the CLI starts."""
    monkeypatch.setattr(loop, "objective_for", quick_objective)


def run_config(tmp_path: Path, method: str, base_url: str, trials: int, **kw) -> RunConfig:
    return RunConfig(method=method, study=method, storage=f"sqlite:///{tmp_path}/hybrid.db", trials=trials,
                          profile="test", llm=kw.pop("llm", "anthropic"), llm_base_url=base_url, train_py=str(TRAIN_PY),
                          space=str(SPACE_YAML), **kw)


def load(config: RunConfig) -> optuna.Study:
    return optuna.load_study(study_name=config.study, storage=store.open_storage(config.storage))


def consistent(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Every trial finished with a status, or failed without one (asked when the run stopped: never counted);
    rejections took no time. Returns the finished trials."""
    trials = study.get_trials()
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials), trials
    assert all(records.is_finished(t) or t.state == TrialState.FAIL for t in trials)
    trials = [t for t in trials if records.is_finished(t)]
    for t in trials:
        if t.user_attrs["status"] == "rejected":
            assert t.state == TrialState.FAIL and not t.user_attrs.get("total_seconds") and t.user_attrs.get("error")
    return trials


def corpus(agent: str) -> list[dict]:
    return [e for e in yaml.safe_load((CORPUS / "index.yaml").read_text()) if e["agent"] == agent]


def answer(entry: dict, shown: str = "") -> str:
    """A corpus answer, its {{TRAIN_PY}} filled with the train.py the agent was shown (edited as the entry says)."""
    text = (CORPUS / entry["file"]).read_text()
    if "{{TRAIN_PY}}" in text:
        for old, new in entry.get("replace", []):
            assert shown.count(old) == 1, f"{entry['file']}: {old!r} is not in train.py once"
            shown = shown.replace(old, new)
        text = text.replace("{{TRAIN_PY}}", shown.rstrip("\n"))
    return text


# -- the corpus, read ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", corpus("hp") + corpus("code"), ids=lambda e: e["file"])
def test_llm_corpus_is_read_as_expected(entry, llm_env):
    """Each answer of the corpus as its reader takes it (the runs below take them through the loop)."""
    shown = inject_knobs(TRAIN_PY.read_text(), SPACE.defaults())
    try:
        if entry["agent"] == "hp":
            outcome, detail = "ok", read_config(answer(entry), SPACE)[1]
        else:
            edit = read_edit(answer(entry, shown), shown)
            check_patch(shown, edit.code)
            outcome, detail = "ok", edit.description
            generation_space(SPACE, edit.code)
    except (PatchRejected, ConfigRejected) as e:
        outcome, detail = "rejected", e.reason
    assert outcome == ("rejected" if entry["expect"] == "rejected" else "ok")
    assert entry["reason"] in detail or entry["expect"] in ("timeout", "crash|oom")


# -- llm-hp ---------------------------------------------------------------------------------------------------

def test_llm_hp_survives_the_corpus_and_shows_its_rejections(tmp_path, quick):
    entries = corpus("hp")
    with FakeLLM([answer(e) for e in entries]) as llm:
        config = run_config(tmp_path, "llm-hp", llm.base_url, len(entries) + 1)
        assert loop.run(config, quick_objective) == 0
    trials = consistent(load(config))
    assert [t.user_attrs["source"] for t in trials] == ["baseline"] + ["llm-hp"] * len(entries)
    for entry, trial, request, following in zip(entries, trials[1:], llm.requests, llm.requests[1:] + [None]):
        attrs = trial.user_attrs
        assert attrs["status"] == entry["expect"], entry["file"]
        shown = attrs.get("error") if entry["expect"] == "rejected" else attrs.get("llm_note", "")
        assert entry["reason"] in shown, entry["file"]
        assert attrs["llm_model"] == "claude-opus-4-6" and attrs["llm_output_tokens"] > 0 and attrs["llm_cost_usd"] > 0
        if following is not None and entry["expect"] == "rejected":
            assert attrs["error"] in following.prompt  # the reason is shown to the agent next time
    assert all(t.user_attrs["llm_cache_read_tokens"] > 0 for t in trials[2:])  # the prefix is cached after the first call
    clamped = next(t for t, e in zip(trials[1:], entries) if e["file"] == "hp-out-of-range.md")
    assert (clamped.params["DEPTH"], clamped.params["MATRIX_LR"]) == (4, 0.2)


def test_transient_provider_errors_are_retried_within_a_trial(tmp_path, quick, monkeypatch):
    monkeypatch.setenv("HYBRID_LLM_TIMEOUT_SECONDS", "2")  # the hung request's wait; still ten times a request's need
    with FakeLLM([Fail(429), Hang(120.0), config_answer(SPACE.defaults())]) as llm:
        config = run_config(tmp_path, "llm-hp", llm.base_url, 2)
        assert loop.run(config, quick_objective) == 0
    trial = consistent(load(config))[1]
    assert trial.user_attrs["status"] == "ok" and trial.user_attrs["llm_attempts"] == 3


def test_a_provider_that_stays_down_stops_the_run_cleanly_and_resume_goes_on(tmp_path, quick, capsys):
    config = run_config(tmp_path, "llm-hp", f"http://127.0.0.1:{closed_port()}/v1", 4, llm="openai", llm_model="qwen")
    args = ["run", "--method", "llm-hp", "--study", config.study, "--storage", config.storage, "--trials", "4",
            "--profile", "test", "--llm", "openai", "--llm-model", "qwen", "--llm-base-url", config.llm_base_url,
            "--train-py", str(TRAIN_PY), "--space", str(SPACE_YAML)]
    assert cli.main(args) == 2
    assert "failed 3 times in a row" in capsys.readouterr().err
    trials = consistent(load(config))
    assert [t.user_attrs["status"] for t in trials] == ["ok", "rejected", "rejected"]
    assert all("LLM provider error" in t.user_attrs["error"] and t.user_attrs["llm_attempts"] == 3 for t in trials[1:])
    with FakeLLM([config_answer(SPACE.defaults())]) as llm:  # the server is back: the run continues to its budget
        study = load(config)
        study.set_user_attr(store.RUN_KEY, {**study.user_attrs[store.RUN_KEY], "llm_base_url": llm.base_url + "/v1"})
        assert loop.resume(config.study, config.storage, objective=quick_objective) == 0
    assert [t.user_attrs["status"] for t in consistent(load(config))] == ["ok", "rejected", "rejected", "ok"]


def test_a_refused_key_stops_the_run_at_once(tmp_path, quick, capsys):
    with FakeLLM([Fail(401, "invalid x-api-key")]) as llm:
        args = ["run", "--method", "llm-hp", "--study", "s", "--storage", f"sqlite:///{tmp_path}/h.db", "--trials", "3",
                "--profile", "test", "--llm", "anthropic", "--llm-base-url", llm.base_url,
                "--train-py", str(TRAIN_PY), "--space", str(SPACE_YAML)]
        assert cli.main(args) == 2
    assert "refused the request (anthropic claude-opus-4-6: HTTP 401: invalid x-api-key)" in capsys.readouterr().err
    assert len(llm.requests) == 1


# -- llm-code -------------------------------------------------------------------------------------------------

class Editor:
    """A scripted code agent: each answer edits the train.py it is shown (or is a fixed answer)."""

    def __init__(self, steps: list) -> None:
        self.steps = list(steps)

    def __call__(self, system: str, prompt: str) -> str:
        step = self.steps.pop(0)
        return step if isinstance(step, str) else step(shown_train_py(system))


def add_line(marker: str):
    return lambda src: file_answer(src.replace("\nROPE_BASE", f"\n{marker}\nROPE_BASE", 1), f"add {marker}")


def set_knob(name: str, value: str):
    def edit(src: str) -> str:
        line = next(s for s in src.splitlines() if s.startswith(f"{name} = "))
        return file_answer(src.replace(line, f"{name} = {value}", 1), f"set {name} to {value}")
    return edit


def test_llm_code_keeps_better_edits_and_reverts_the_rest(tmp_path, quick):
    harness_edit = answer(next(e for e in corpus("code") if e["file"] == "code-harness-diff.md"))
    editor = Editor([add_line("# faster"), add_line("# slower"), harness_edit, add_line("# faster"),
                     set_knob("DEPTH", "3"), set_knob("DEPTH", "99")])
    with FakeLLM(responder=editor) as llm:
        config = run_config(tmp_path, "llm-code", llm.base_url, 7)
        assert loop.run(config, quick_objective) == 0
    study = load(config)
    trials = consistent(study)
    gens = generations.load_all(study)
    assert [t.user_attrs["status"] for t in trials] == ["ok", "ok", "ok", "rejected", "ok", "ok", "ok"]
    assert [g.status for g in gens.values()] == ["base", "kept", "reverted", "kept", "reverted", "reverted"]
    assert [t.user_attrs["generation"] for t in trials] == [0, 1, 2, 1, 3, 4, 5]
    assert gens[3].parent == 1 and gens[3].code.count("# faster") == 2 and "+# faster" in gens[3].diff
    # a knob the edit changed runs at its new value; one set outside the declared range leaves the space
    assert trials[5].params["DEPTH"] == 3 and "DEPTH" in gens[4].space
    assert "DEPTH" not in trials[6].params and "DEPTH" not in gens[5].space
    assert trials[1].user_attrs["diff_summary"] == "+1 -0 lines" and "+# faster" in trials[1].user_attrs["diff"]
    assert trials[1].user_attrs["description"] == "add # faster"
    # what the agent was shown: the incumbent, its history with outcomes, the reason of the refusal
    assert "# faster" in llm.requests[2].system and "# slower" not in llm.requests[2].system
    assert "generation 2, reverted" in llm.requests[3].prompt and "generation 1, kept" in llm.requests[3].prompt
    refusal = "refused before running: evaluate in float16 to speed up scoring\nOutcome: the diff edits harness/evaluate.py"
    assert refusal in llm.requests[4].prompt
    # kept generations are commits on the run's branch
    repo = git.Repo(Path(config.artifacts) / "lineage")
    log = [c.message.split(":")[0] for c in repo.iter_commits("hybrid/llm-code")]
    assert log == ["generation 3", "generation 1", "generation 0"]
    assert gens[3].commit == repo.tags["gen-3"].commit.hexsha


# -- centaur --------------------------------------------------------------------------------------------------

def advisor(system: str, prompt: str) -> str:
    """The Centaur advisor: CMA-ES's proposal with a lower matrix learning rate."""
    proposal = shown_proposal(prompt)
    proposal["MATRIX_LR"] = round(proposal["MATRIX_LR"] * 0.8, 5)
    return config_answer(proposal, "CMA-ES's mean drifts towards a high MATRIX_LR; the best trials used less.")


def test_centaur_consults_the_llm_on_a_seeded_fraction_of_trials(tmp_path, quick, monkeypatch):
    with FakeLLM(["I am not sure what to propose."], responder=advisor) as llm:
        config = run_config(tmp_path, "centaur", llm.base_url, 30, llm_fraction=0.5, seed=3)
        assert loop.run(config, quick_objective) == 0
    trials = consistent(load(config))
    method = CentaurMethod.__new__(CentaurMethod)
    method.fraction, method.run_seed = 0.5, 3
    turns = [n for n in range(1, 30) if method.llm_turn(n)]
    assert turns and min(turns) >= centaur.WARMUP_TRIALS and len(llm.requests) == len(turns)
    first, *others = turns
    sources = [t.user_attrs["source"] for t in trials]
    assert sources[0] == "baseline" and sources[first] == "cmaes"  # the unreadable first answer: CMA-ES ran instead
    assert "no JSON object" in trials[first].user_attrs["llm_rejected"]
    assert "no JSON object" in llm.requests[1].prompt  # ... and the advisor is told why
    assert [n for n, s in enumerate(sources) if s == "centaur-llm"] == others
    for n in others:
        attrs, params = trials[n].user_attrs, trials[n].params
        wanted = SPACE.knobs["MATRIX_LR"].clamp(round(attrs["cmaes_proposal"]["MATRIX_LR"] * 0.8, 5))
        assert params["MATRIX_LR"] == pytest.approx(wanted)
        assert attrs["llm_input_tokens"] > 0 and "llm_cost_usd" in attrs
    prompt = llm.requests[-1].prompt
    for part in ("step size sigma", "covariance sigma^2 * C", "WINDOW_PATTERN", "The 5 best trials", "The last 20 trials",
                 "mean (as knob values): DEPTH="):
        assert part in prompt
    assert prompt.count("- trial ") == 25  # 5 best and 20 last


@pytest.mark.parametrize("state, value, intermediate, told", [
    (TrialState.COMPLETE, 1.2, {}, 1.2),
    (TrialState.PRUNED, None, {25: 1.9, 50: 1.7}, 1.7),  # its last intermediate val_bpb, not the penalty
    (TrialState.PRUNED, None, {}, centaur.PENALTY),
    (TrialState.FAIL, None, {}, centaur.PENALTY),
])
def test_what_cma_es_is_told_of_a_finished_trial(state, value, intermediate, told) -> None:
    trial = optuna.trial.create_trial(state=state, value=value, intermediate_values=intermediate,
                                      params={"X": 0.5}, distributions={"X": optuna.distributions.FloatDistribution(0, 1)})
    assert centaur.told_value(trial) == told


def test_centaur_rebuilds_its_cma_state_from_the_study(tmp_path, quick, monkeypatch):
    live = []
    build = loop.build_method
    monkeypatch.setattr(loop, "build_method", lambda *a: live.append(build(*a)) or live[-1])
    with FakeLLM(responder=advisor) as llm:
        config = run_config(tmp_path, "centaur", llm.base_url, 26, llm_fraction=0.5)
        assert loop.run(config, quick_objective) == 0
        study = load(config)
        rebuilt = CentaurMethod(config.finalize(), study, SPACE, TRAIN_PY.read_text(), seed=12345)
    state, again = live[0].cma, rebuilt.cma
    assert state.cma.generation == again.cma.generation >= 2
    np.testing.assert_allclose(again.cma.mean, state.cma.mean)
    np.testing.assert_allclose(optuna_compat.cma_covariance(again.cma), optuna_compat.cma_covariance(state.cma))
    assert optuna_compat.cma_sigma(again.cma) == pytest.approx(optuna_compat.cma_sigma(state.cma))
    assert [x.tolist() for x, _ in again.pending] == [x.tolist() for x, _ in state.pending]


def test_the_unit_cube_round_trips():
    cube = UnitCube(SPACE)
    rng = random.Random(0)
    for _ in range(50):
        x = np.array([rng.random() for _ in SPACE.names])
        config = cube.decode(x)
        assert SPACE.check(config) == config
        assert cube.decode(cube.encode(config)) == config


def test_centaur_on_the_surrogate(tmp_path, llm_env):
    pytest.importorskip("hybrid.surrogate")
    with FakeLLM(responder=advisor) as llm:
        config = RunConfig(method="centaur", study="c", storage=f"sqlite:///{tmp_path}/h.db", trials=16,
                                objective="surrogate", llm="anthropic", llm_base_url=llm.base_url, llm_fraction=0.5)
        assert loop.run(config) == 0
    trials = consistent(load(config))
    assert {t.user_attrs["source"] for t in trials} == {"baseline", "cmaes", "centaur-llm"}
    assert len(llm.requests) == sum(t.user_attrs["source"] == "centaur-llm" for t in trials)


# -- real training (the `test` profile: a few seconds a trial) --------------------------------------------------

@pytest.mark.slow
def test_llm_hp_run_keeps_the_key_out_of_trials_logs_and_the_database(tmp_path, data_dir, llm_env):
    """`hybrid run` as a user runs it, with the key in its environment and a train.py that dumps its own."""
    train_py = tmp_path / "train.py"
    anchor = "    session = api.start()\n"
    train_py.write_text(TRAIN_PY.read_text().replace(
        anchor, anchor + '    import os\n    print("TRIAL-ENV", sorted(os.environ.items()), flush=True)\n'))
    entries = {e["file"]: e for e in corpus("hp")}
    script = [answer(entries["hp-garbled-json.md"]), answer(entries["hp-prose-around.md"])]
    (tmp_path / "runs").mkdir()  # an explicit --storage path's folder is never created
    with FakeLLM(script) as llm:
        env = {**os.environ, "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": llm.base_url}
        run = subprocess.run([sys.executable, "-m", "hybrid.cli", "run", "--method", "llm-hp", "--study", "hp",
                              "--storage", f"sqlite:///{tmp_path}/runs/hybrid.db", "--trials", "3", "--profile", "test",
                              "--llm", "anthropic", "--train-py", str(train_py), "--space", str(SPACE_YAML)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(KEY in r.headers.get("x-api-key", "") + r.headers.get("authorization", "") for r in llm.requests)
    study = optuna.load_study(study_name="hp", storage=store.open_storage(f"sqlite:///{tmp_path}/runs/hybrid.db"))
    assert [t.user_attrs["status"] for t in consistent(study)] == ["ok", "rejected", "ok"]
    logs = sorted((tmp_path / "runs" / "hp").glob("trial-*/log.txt"))
    # the trial's environment is an allow-list: not even the harness's own settings reach it
    assert len(logs) == 2 and all("TRIAL-ENV" in log.read_text() and "HYBRID_DATA_DIR" not in log.read_text()
                                  for log in logs)
    leaks = [str(f) for f in tmp_path.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
    assert leaks == []
    with sqlite3.connect(tmp_path / "runs" / "hybrid.db") as db:
        dump = "\n".join(db.iterdump())
    assert "llm_input_tokens" in dump and KEY not in dump and "ANTHROPIC_API_KEY" not in dump
    assert KEY not in run.stdout + run.stderr


@pytest.mark.slow
def test_llm_code_survives_the_corpus_on_real_training(tmp_path, data_dir, llm_env, monkeypatch):
    test = profiles.PROFILES["test"]
    # the end of the infinite loop: short, yet long enough for a normal trial on a loaded 2-core machine
    monkeypatch.setitem(profiles.PROFILES, "test", replace(test, timeout_seconds=45.0))
    entries = [e for e in corpus("code") if e["file"] not in ("code-good-file.md", "code-good-diff.md")]  # read in
    # test_llm_corpus_is_read_as_expected; keeping and reverting is tested above: two real trials less
    # the refusals first (they cost no time), those that may be kept last (a kept edit changes the code later diffs
    # are written against)
    entries.sort(key=lambda e: (e["expect"] != "rejected", e["expect"] == "ok"))
    pending = list(entries)
    with FakeLLM(responder=lambda system, prompt: answer(pending.pop(0), shown_train_py(system))) as llm:
        config = run_config(tmp_path, "llm-code", llm.base_url, len(entries) + 1)
        assert loop.run(config) == 0
    study = load(config)
    trials = consistent(study)
    gens = generations.load_all(study)
    ran = 0
    for entry, trial in zip(entries, trials[1:]):
        attrs = trial.user_attrs
        assert attrs["status"] in entry["expect"].split("|"), (entry["file"], attrs.get("error"))
        assert entry["reason"] in (attrs.get("error") or ""), entry["file"]
        if attrs["status"] == "rejected":
            assert attrs["generation"] == 0  # nothing was applied: the proposal never became a generation
        else:
            ran += 1
            assert gens[attrs["generation"]].status in ("kept", "reverted") and attrs["total_seconds"] > 0
    assert len(gens) == 1 + ran
    slipped = trials[1 + next(i for i, e in enumerate(entries) if e["file"] == "code-slipped-print.md")]
    # its print after finish() never runs (the harness ends the process when it has the model); its score is the scorer's
    assert "val_bpb: 0.100000" not in Path(slipped.user_attrs["log_path"]).read_text()
    assert slipped.user_attrs["status"] == "ok" and slipped.user_attrs["val_bpb"] > 1.0
    oom = trials[1 + next(i for i, e in enumerate(entries) if e["file"] == "code-oom.md")]
    print(f"a gigantic allocation on CPU ends as {oom.user_attrs['status']}: {oom.user_attrs['error']}")


@pytest.mark.slow
def test_centaur_on_the_train_objective(tmp_path, data_dir, llm_env, monkeypatch):
    monkeypatch.setattr(centaur, "WARMUP_TRIALS", 1)
    with FakeLLM(responder=advisor) as llm:
        config = run_config(tmp_path, "centaur", llm.base_url, 2, llm_fraction=1.0)
        assert loop.run(config) == 0
    trials = consistent(load(config))
    assert [t.user_attrs["source"] for t in trials] == ["baseline", "centaur-llm"]
    assert [t.user_attrs["status"] for t in trials] == ["ok", "ok"] and len(llm.requests) == 1
