"""The trusted side of training (harness.training.supervise) against a small fake training process that speaks the
channel: what it is fed before and after the clock starts, what is counted, and how each misbehaviour ends."""
from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

import harness.training
from harness import api
from harness.agent_process import AgentProcess, TrialLog
from harness.channel import Channel, ChannelError
from harness.loader import load_split, token_rows
from harness.profiles import get_profile
from harness.sandbox import Jail
from harness.tokenizer import Tokenizer
from harness.scorer import Score
from harness.training import PAUSE_SLACK, REPORTED, Checkpoints, Feed, supervise

TEST = get_profile("test")
ROWS = 4  # rows per batch request

# The fake training process: `python -m fake_trainer PLAN OUT IN_FD OUT_FD` runs the steps of PLAN (JSON) and
# records each batch it gets (OUT/batch-N.npy) and each answer (OUT/answers.jsonl).
FAKE_TRAINER = r'''
import json, os, sys, time
import numpy as np
from harness.channel import Channel

plan, out = json.loads(sys.argv[1]), sys.argv[2]
channel = Channel.from_fds(int(sys.argv[3]), int(sys.argv[4]))
answers = open(os.path.join(out, "answers.jsonl"), "a", buffering=1)
batches = 0


def ask(header, max_payload=0):
    channel.send(header)
    answer, payload = channel.receive(max_payload)
    answers.write(json.dumps(answer) + "\n")
    return answer, payload


def batch(rows):
    global batches
    answer, payload = ask({"op": "batch", "rows": rows}, max_payload=1 << 24)
    np.save(os.path.join(out, f"batch-{batches}.npy"), np.frombuffer(payload, dtype=np.uint16).reshape(rows, -1))
    batches += 1


def step(loss=3.0):
    batch(ROWS)
    return ask({"op": "tick", "loss": loss})[0]


ROWS = plan.get("rows", 4)
for action in plan["steps"]:
    op, arg = (action, None) if isinstance(action, str) else action
    if op == "ready":
        channel.send({"op": "ready"})
    elif op == "step":
        step(*(() if arg is None else (arg,)))
    elif op == "until-done":
        while not step().get("done"):
            time.sleep(0.01)
    elif op == "sleep":
        time.sleep(arg)
    elif op == "send":
        channel.send(arg)
    elif op == "raw":
        channel.writer.write(arg.encode())
        channel.writer.flush()
    elif op == "exit":
        sys.exit(arg or 0)
time.sleep(600)  # the harness ends this process
'''


@pytest.fixture
def run(prepared_test, tmp_path):
    """run(steps, profile=..., **limits) -> (Training, answers, batches): supervise a fake process that runs `steps`."""
    started: list[AgentProcess] = []

    def run_(steps: list, profile=None, *, startup_limit: float = 120.0, deadline: float = 300.0,  # noqa: ANN001
             model_bytes: int = 0, stop: threading.Event | None = None, rows: int = ROWS,
             checkpoints: Checkpoints | None = None):
        profile = profile or replace(TEST, time_budget=0.3, warmup_steps=2)
        scratch = tmp_path / f"run-{len(started)}"
        scratch.mkdir()
        (scratch / "fake_trainer.py").write_text(FAKE_TRAINER)  # python -m finds it in its working folder
        plan = json.dumps({"steps": steps, "rows": rows})
        process = AgentProcess(Jail("off", scratch), "fake_trainer", [plan, str(scratch)],
                               TrialLog(scratch / "log.txt"), "train")
        started.append(process)
        feed = Feed(prepared_test, profile, 7, Tokenizer.load(prepared_test.tokenizer).bos_id)
        try:
            training = supervise(process, feed, profile, startup_limit=startup_limit,
                                 deadline=time.perf_counter() + deadline, model_bytes=lambda: model_bytes, stop=stop,
                                 checkpoints=checkpoints)
        finally:
            process.kill()
            feed.close()
        answers = [json.loads(line) for line in (scratch / "answers.jsonl").read_text().splitlines()] \
            if (scratch / "answers.jsonl").exists() else []
        batches = [np.load(scratch / f"batch-{i}.npy") for i in range(len(list(scratch.glob("batch-*.npy"))))]
        return training, answers, batches

    yield run_
    for process in started:
        process.kill()


def training_rows(prepared_test, seed: int, n: int) -> np.ndarray:
    return np.stack(list(islice(token_rows(prepared_test, "train", TEST.seq_len, seed=seed, loop=True), n)))


def test_random_tokens_until_the_clock_starts_then_the_split(run, prepared_test):
    t, answers, batches = run(["ready", "step", "step", "step", "until-done", ["send", {"op": "finish"}]])
    assert t.status == "ok", t.error
    bos = Tokenizer.load(prepared_test.tokenizer).bos_id
    # warmup_steps=2: the batches of steps 1 and 2 are random tokens (each row starts with BOS) ...
    real = training_rows(prepared_test, 7, ROWS * len(batches))
    split = np.asarray(load_split(prepared_test, "train")[0])
    for noise in batches[:2]:
        assert noise.shape == (ROWS, TEST.seq_len + 1) and (noise[:, 0] == bos).all() and noise[:, 1:].max() < bos
        for row in noise:  # not taken from the split: not even 4 tokens in a row occur in it
            a, b, c, d = row[1:5]
            assert not ((split[:-3] == a) & (split[1:-2] == b) & (split[2:-1] == c) & (split[3:] == d)).any()
    assert not (batches[0] == batches[1]).all()
    # ... and from the third on, the training split in the order of the trial's seed, from its first row
    assert (np.concatenate(batches[2:]) == real[:ROWS * (len(batches) - 2)]).all()
    assert t.steps == len(batches) and t.tokens == ROWS * TEST.seq_len * (len(batches) - 2)
    # the clock started at tick number warmup_steps: nothing spent before it, the budget spent after it
    assert [a["progress"] for a in answers if "progress" in a][:1] == [0.0]
    assert answers[-1]["done"] and t.training_seconds >= 0.3 and t.clock_start is not None
    assert t.ready is not None and t.reported == dict.fromkeys(REPORTED)


def test_without_warmup_steps_the_clock_starts_at_the_first_batch(run, prepared_test):
    t, answers, batches = run(["ready", "step", ["send", {"op": "finish", "num_params": 12, "peak_memory_mb": -1}]],
                              replace(TEST, time_budget=30.0, warmup_steps=0))
    assert t.status == "ok", t.error
    assert (batches[0] == training_rows(prepared_test, 7, ROWS)).all()
    assert t.tokens == ROWS * TEST.seq_len and t.clock_start is not None and t.finished > t.clock_start
    assert t.reported["num_params"] == 12 and t.reported["peak_memory_mb"] is None  # untrusted numbers, checked


@pytest.mark.parametrize("loss", ["nan", 101.0, "text"])
def test_a_diverged_loss_is_nan(run, loss):
    value = float(loss) if loss in ("nan", "inf") else loss
    t, answers, _ = run(["ready", "step", ["step", value], "step"])
    assert t.status == "nan" and "training loss is" in t.error and "at step 2" in t.error


def test_training_past_done_is_invalid(run):
    t, _, _ = run(["ready", "until-done", "step", ["send", {"op": "finish"}]])
    assert t.status == "invalid" and "past session.done" in t.error


def test_finish_long_after_done_is_invalid(run):
    t, _, _ = run(["ready", "until-done", ["sleep", 5.0], ["send", {"op": "finish"}]])
    assert t.status == "invalid" and "after session.done" in t.error and "training past the budget" in t.error


@pytest.mark.parametrize("model_bytes, status", [(0, "invalid"), (10**10, "ok")])
def test_saving_the_model_earns_its_time(run, monkeypatch, model_bytes, status):
    """With no slack for steps, a finish just after done is late unless the model takes time to save (10 GB at
    100 MB/s: 100 s)."""
    monkeypatch.setattr(harness.training, "LATE_STEPS", 0)
    monkeypatch.setattr(harness.training, "LATE_SECONDS", 0.0)
    t, _, _ = run(["ready", "until-done", ["sleep", 0.2], ["send", {"op": "finish"}]], model_bytes=model_bytes)
    assert t.status == status, t.error


@pytest.mark.parametrize("steps", [0, 2])
def test_a_process_whose_clock_never_starts_hits_the_startup_limit(run, steps):
    """One that never ticks, and one that stays in its warm-up steps (5 here), are stopped at `startup_limit`."""
    t, _, _ = run(["ready", *["step"] * steps], replace(TEST, warmup_steps=5), startup_limit=1.5)
    assert t.status == "timeout" and "clock did not start within" in t.error and t.clock_start is None
    assert t.steps <= steps and t.tokens == 0


def test_a_garbled_message_is_a_crash(run):
    t, _, _ = run(["ready", ["raw", "this is not json\n"]])
    assert t.status == "crash" and "without handing over a model" in t.error


@pytest.mark.parametrize("message", [{"op": "teleport"}, {"no": "op"}])
def test_an_unknown_message_is_a_crash(run, message):
    t, _, _ = run(["ready", ["send", message]])
    assert t.status == "crash" and "unknown message" in t.error


@pytest.mark.parametrize("rows", [0, 1 << 20, True])
def test_a_bad_batch_size_is_a_crash(run, rows):
    t, _, _ = run(["ready", ["send", {"op": "batch", "rows": rows}]])
    assert t.status == "crash" and "batch size must be between 1 and" in t.error


def test_the_deadline_is_a_timeout(run):
    t, _, _ = run(["ready", "step", "step", ["sleep", 600]], replace(TEST, time_budget=1000.0), deadline=1.5)
    assert t.status == "timeout" and "wall-clock limit" in t.error


def test_a_clock_that_runs_on_without_finish_is_a_timeout(run, monkeypatch):
    monkeypatch.setattr(harness.training, "OVERRUN", 1.0)
    t, _, _ = run(["ready", "step", "step", ["sleep", 600]])
    assert t.status == "timeout" and "without finish()" in t.error


def test_a_process_that_ends_without_a_model_is_a_crash(run):
    t, _, _ = run(["ready", "step", ["exit", 0]])
    assert t.status == "crash" and "ended without handing over a model" in t.error


def test_returning_without_finish_is_invalid(run):
    t, _, _ = run(["ready", "step", "step", ["send", {"op": "returned"}]])
    assert t.status == "invalid" and "never called session.finish" in t.error


def test_finish_before_the_clock_is_invalid(run):
    t, _, _ = run(["ready", "step", ["send", {"op": "finish"}]])
    assert t.status == "invalid" and "clock never ran" in t.error


@pytest.mark.parametrize("status, expected",
                         [("oom", "oom"), ("nan", "nan"), ("ok", "crash"), ("invalid", "crash")])
def test_a_reported_error_keeps_only_a_failure_class(run, status, expected):
    t, _, _ = run(["ready", ["send", {"op": "error", "status": status, "error": "x" * 2000}]])
    assert t.status == expected and t.error == "x" * 500


def test_stop_raises_keyboard_interrupt(run):
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    with pytest.raises(KeyboardInterrupt):
        run(["ready", "step", ["sleep", 600]], stop=stop)


WATCHED = ["ready", ["send", {"op": "watch"}]]  # train.py called session.watch(model)


def checkpoints(told: list, *, prune_at: float = 2.0, seconds: float = 0.0, tokens: int = 10**9,
                score: Score | None = None) -> Checkpoints:
    """Checkpoints at a quarter, half and three quarters of the budget whose measurement takes `seconds`; what is
    told goes into `told`, and the trial is pruned from `prune_at` on. `tokens` in the slice set the pause's bound."""
    def measure() -> Score:
        time.sleep(seconds)
        return score or Score(val_bpb=5.0 - len(told))

    def report(fraction: float, value: float) -> bool:
        told.append((fraction, value, time.perf_counter()))
        return fraction >= prune_at
    return Checkpoints((0.25, 0.5, 0.75), tokens, measure, report)


def test_intermediate_evaluations_pause_the_clock(run):
    told: list = []
    t, answers, _ = run([*WATCHED, "until-done", ["send", {"op": "finish"}]], replace(TEST, time_budget=0.6),
                        checkpoints=checkpoints(told, seconds=0.2))
    assert t.status == "ok", t.error
    assert [f for f, _, _ in told] == [0.25, 0.5, 0.75] and t.intermediate == [(f, v) for f, v, _ in told]
    # each evaluation is off the clock: the budget is trained in full beside them
    assert t.evaluating >= 0.6 and t.paused == pytest.approx(t.evaluating)
    assert 0.6 <= t.training_seconds < t.finished - t.clock_start - 0.5


def test_a_pause_is_off_the_clock_only_up_to_its_bound(run):
    told: list = []
    t, _, _ = run([*WATCHED, "until-done", ["send", {"op": "finish"}]], replace(TEST, time_budget=0.6),
                  checkpoints=checkpoints(told, seconds=0.2, tokens=0))
    assert t.status == "ok" and t.evaluating >= 0.2
    assert t.paused <= len(told) * PAUSE_SLACK * 0.6 + 1e-9  # longer than the bound: the trial's own time


def test_no_intermediate_evaluation_of_an_unwatched_model(run):
    told: list = []
    t, _, _ = run(["ready", "until-done", ["send", {"op": "finish"}]], checkpoints=checkpoints(told))
    assert t.status == "ok" and told == [] and t.intermediate == [] and t.paused == 0


def test_a_condemned_trial_ends_at_the_decision(run):
    told: list = []
    t, answers, _ = run([*WATCHED, "until-done", ["send", {"op": "finish"}]], replace(TEST, time_budget=5.0),
                        checkpoints=checkpoints(told, prune_at=0.5))
    assert t.status == "pruned" and t.error == "pruned at 50% of the budget: intermediate val_bpb 4.0000"
    assert [f for f, _, _ in told] == [0.25, 0.5] and t.finished is None
    assert not any(a.get("done") for a in answers)  # no answer after the decision: the runner kills the process
    assert t.training_seconds < 5.0 * 0.75


@pytest.mark.parametrize("status", ["crash", "oom", "nan", "timeout"])
def test_a_failed_intermediate_evaluation_fails_the_trial(run, status):
    told: list = []
    t, _, _ = run([*WATCHED, "until-done", ["send", {"op": "finish"}]], replace(TEST, time_budget=5.0),
                  checkpoints=checkpoints(told, score=Score(status=status, error="it broke")))
    assert t.status == status and t.error == "at the intermediate evaluation at 25% of the budget: it broke"
    assert told == []


def test_a_failure_still_stops_at_once_with_checkpoints(run):
    told: list = []
    t, _, _ = run([*WATCHED, "step", "step", ["step", float("nan")], "step"], replace(TEST, time_budget=5.0),
                  checkpoints=checkpoints(told))
    assert t.status == "nan" and "at step 3" in t.error and told == []


def session_over(answers: bytes, tmp_path: Path) -> tuple[api.Session, io.BytesIO]:
    """train.py's side of the channel, reading `answers` from the harness; what it asks goes into the buffer."""
    sent = io.BytesIO()
    spec = {"model_path": str(tmp_path / "model.pt"), "device": "cpu", "seq_len": 4, "time_budget": 1.0,
            "vocab_size": 11, "bos_id": 10}
    return api.Session(spec, Channel(io.BytesIO(answers), sent)), sent


def message(header: dict, payload: bytes = b"") -> bytes:
    return json.dumps({**header, "bytes": len(payload)}).encode() + b"\n" + payload


def test_the_session_of_train_py(tmp_path):
    rows = np.arange(2 * 5, dtype=np.uint16).reshape(2, 5)
    answers = (message({"rows": 2}, rows.tobytes()) + message({"progress": 0.25, "done": False})
               + message({"progress": 1.0, "done": True}) + message({"diverged": "training loss is nan at step 3"}))
    session, sent = session_over(answers, tmp_path)
    x, y = next(session.train_batches(2))
    assert x.dtype == torch.int64 and x.tolist() == rows[:, :-1].tolist() and y.tolist() == rows[:, 1:].tolist()
    assert session.tick(3.0) == 0.25 and not session.done
    assert session.tick(2.5) == 1.0 and session.done
    with pytest.raises(api.Diverged, match="at step 3"):
        session.tick(float("nan"))
    asked = [json.loads(line) for line in sent.getvalue().splitlines()]
    assert asked[0] == {"op": "batch", "rows": 2, "bytes": 0} and asked[1] == {"op": "tick", "loss": 3.0, "bytes": 0}


def test_a_tick_at_a_checkpoint_answers_with_the_watched_models_logits(tmp_path):
    """The harness asks for logits in answer to a tick; the session writes them into the shared file, in eval mode
    and without gradients, and the tick returns once the harness answers the progress."""
    logits_path = tmp_path / "logits.bin"
    logits_path.write_bytes(bytes(3 * 4 * 11 * 4))
    ids = np.arange(2 * 4, dtype=np.int32).reshape(2, 4)
    answers = message({"op": "logits", "rows": 2}, ids.tobytes()) + message({"progress": 0.5, "done": False})
    sent = io.BytesIO()
    spec = {"model_path": str(tmp_path / "model.pt"), "device": "cpu", "seq_len": 4, "time_budget": 1.0,
            "vocab_size": 11, "bos_id": 10, "intermediate_rows": 3, "intermediate_logits": str(logits_path)}
    session = api.Session(spec, Channel(io.BytesIO(answers), sent))
    model = torch.nn.Sequential(torch.nn.Embedding(11, 11), torch.nn.Dropout(0.5))
    session.watch(model)
    assert session.tick(3.0) == 0.5 and model.training
    written = np.memmap(logits_path, dtype=np.float32, mode="r", shape=(3, 4, 11))
    assert np.array_equal(written[:2], model[0](torch.from_numpy(ids).long()).detach().numpy())  # no dropout
    asked = [json.loads(line) for line in sent.getvalue().splitlines()]
    assert [a["op"] for a in asked] == ["watch", "tick", "logits"]


def test_finish_saves_the_model_and_reports_its_size(tmp_path):
    session, sent = session_over(b"", tmp_path)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ChannelError):  # the harness never answers: it ends the process once it has the model
        session.finish(model)
    assert json.loads(sent.getvalue())["num_params"] == 8 and json.loads(sent.getvalue())["op"] == "finish"
    assert torch.load(tmp_path / "model.pt", weights_only=False).weight.shape == (2, 3)


def test_a_batch_larger_than_asked_is_refused(tmp_path):
    session, _ = session_over(message({"rows": 3}, np.zeros((3, 5), dtype=np.uint16).tobytes()), tmp_path)
    with pytest.raises(ChannelError, match="at most"):
        next(session.train_batches(2))


def test_the_feed_packs_ahead_without_changing_the_sequence(prepared_test):
    """The batch after each one is packed on a thread: whatever the sizes asked (and random batches between),
    the rows handed out are the split's rows of the seed, in order."""
    bos = Tokenizer.load(prepared_test.tokenizer).bos_id
    asks = [(4, False), (4, False), (4, True), (4, True), (2, True), (7, True), (1, False), (7, True), (3, True)]
    feed = Feed(prepared_test, TEST, 7, bos)
    try:
        handed = [feed.batch(rows, real) for rows, real in asks]
    finally:
        feed.close()
    real = np.concatenate([b for b, (_, r) in zip(handed, asks) if r])
    assert [len(b) for b in handed] == [rows for rows, _ in asks]
    assert np.array_equal(real, training_rows(prepared_test, 7, len(real)))
    assert all((b[:, 0] == bos).all() for b, (_, r) in zip(handed, asks) if not r)
