"""Bring your own autoresearch: `hybrid run --repo`, `hybrid space --init-yaml` and `hybrid import autoresearch`
on a small autoresearch-shaped repository built here (CPU-sized prepare.py and train.py, git history, results.tsv)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import git
import optuna
import pytest
import yaml

from hybrid.study import store
from hybrid.foreign import ForeignObjective, Repo, outcome, parse_summary
from hybrid.space import check_against_code, load_space
from tests.util import cli

PREPARE_PY = '''"""A CPU-sized stand-in for autoresearch's prepare.py: its interface, bytes as tokens, tiny data."""
import math
import os
import random

import torch
import torch.nn.functional as F

MAX_SEQ_LEN = 32
TIME_BUDGET = 1
EVAL_TOKENS = 2048
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")
DATA_DIR = os.path.join(CACHE_DIR, "data")
WORDS = "the a model learns to predict next byte of text with small loss and low bits per byte".split()


class Tokenizer:
    @classmethod
    def from_directory(cls):
        assert os.path.exists(os.path.join(DATA_DIR, "train.txt")), "run prepare.py first"
        return cls()

    def get_vocab_size(self):
        return 257

    def get_bos_token_id(self):
        return 256

    def encode(self, text):
        return list(text.encode("utf-8"))


def _tokens(split):
    with open(os.path.join(DATA_DIR, f"{split}.txt"), "rb") as f:
        return torch.tensor(list(f.read()), dtype=torch.long)


def make_dataloader(tokenizer, B, T, split):
    data, epoch = _tokens(split), 1
    g = torch.Generator().manual_seed(0)
    while True:
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        rows = torch.stack([data[s:s + T + 1] for s in starts.tolist()])
        yield rows[:, :-1], rows[:, 1:], epoch


@torch.no_grad()
def evaluate_bpb(model, tokenizer, batch_size):
    data = _tokens("val")[:EVAL_TOKENS + 1]
    nats, count = 0.0, 0
    for start in range(0, len(data) - MAX_SEQ_LEN - 1, MAX_SEQ_LEN * batch_size):
        rows = [data[s:s + MAX_SEQ_LEN + 1] for s in range(start, min(start + MAX_SEQ_LEN * batch_size,
                                                                       len(data) - MAX_SEQ_LEN - 1), MAX_SEQ_LEN)]
        batch = torch.stack(rows)
        logits = model(batch[:, :-1])
        nats += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return nats / count / math.log(2)


if __name__ == "__main__":
    os.makedirs(DATA_DIR, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", 20000), ("val", 4000)):
        with open(os.path.join(DATA_DIR, f"{split}.txt"), "w") as f:
            f.write(" ".join(rng.choice(WORDS) for _ in range(n)))
'''

TRAIN_PY = '''"""An autoresearch-like train.py, CPU-sized: knobs on top; TIME_BUDGET seconds of training, a summary."""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, evaluate_bpb, make_dataloader

# Model architecture
ASPECT_RATIO = 32       # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 16           # target head dimension
WINDOW_PATTERN = "SSSL" # unused by this small model

# Optimization
TOTAL_BATCH_SIZE = 256  # tokens per optimizer step
EMBEDDING_LR = 0.05     # learning rate for the token embeddings
UNEMBEDDING_LR = 0.004  # learning rate for lm_head
MATRIX_LR = 0.01        # learning rate for the matrices
SCALAR_LR = 0.5         # learning rate for scalars (unused)
WEIGHT_DECAY = 0.0      # AdamW weight decay
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0      # fraction of the time budget for LR warmup
WARMDOWN_RATIO = 0.5    # fraction of the time budget for LR warmdown
FINAL_LR_FRAC = 0.0     # final LR as a fraction of the initial
MLP_RATIO = 4           # hidden units per model channel

# Model size
DEPTH = 1               # number of blocks
DEVICE_BATCH_SIZE = 8   # rows per forward/backward pass
H100_BF16_PEAK_FLOPS = 989.5e12


class Model(nn.Module):
    def __init__(self, vocab, dim, depth):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.ReLU(),
                                                  nn.Linear(MLP_RATIO * dim, dim)) for _ in range(depth))
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.lm_head(x)


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress > 1 - WARMDOWN_RATIO:
        return FINAL_LR_FRAC + (1 - FINAL_LR_FRAC) * (1 - progress) / WARMDOWN_RATIO
    return 1.0


t_start = time.time()
torch.manual_seed(42)
torch.set_num_threads(1)
tokenizer = Tokenizer.from_directory()
dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
model = Model(tokenizer.get_vocab_size(), dim, DEPTH)
groups = [{"params": model.wte.parameters(), "lr": EMBEDDING_LR}, {"params": model.lm_head.parameters(),
          "lr": UNEMBEDDING_LR}, {"params": model.blocks.parameters(), "lr": MATRIX_LR}]
optimizer = torch.optim.AdamW(groups, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
for group in optimizer.param_groups:
    group["initial_lr"] = group["lr"]
tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0
accum = TOTAL_BATCH_SIZE // tokens_per_fwdbwd
loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train")
t0, step, training_time = time.time(), 0, 0.0
while training_time < TIME_BUDGET:
    for _ in range(accum):
        x, y, _ = next(loader)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        (loss / accum).backward()
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier(training_time / TIME_BUDGET)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    training_time = time.time() - t0
val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {training_time:.1f}")
print(f"total_seconds:    {time.time() - t_start:.1f}")
print(f"peak_vram_mb:     {0.0:.1f}")
print(f"mfu_percent:      {0.0:.2f}")
print(f"total_tokens_M:   {step * TOTAL_BATCH_SIZE / 1e6:.4f}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {sum(p.numel() for p in model.parameters()) / 1e6:.4f}")
print(f"depth:            {DEPTH}")
'''

# What the user keeps of `hybrid space --init-yaml` after review: the ranges narrowed to what a CPU trains in a second.
SPACE = {"knobs": {
    "DEPTH": {"type": "int", "low": 1, "high": 2, "default": 1},
    "MATRIX_LR": {"type": "float", "low": 0.001, "high": 0.1, "default": 0.01, "log": True},
    "EMBEDDING_LR": {"type": "float", "low": 0.005, "high": 0.5, "default": 0.05, "log": True},
    "WARMDOWN_RATIO": {"type": "float", "low": 0.1, "high": 0.8, "default": 0.5},
}}
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"


def commit_edit(repo: git.Repo, old: str, new: str, message: str) -> str:
    """Replace `old` by `new` in train.py and commit it; the short sha."""
    path = Path(repo.working_dir) / "train.py"
    path.write_text(path.read_text().replace(old, new))
    repo.index.add(["train.py"])
    return repo.index.commit(message).hexsha[:7]


def build_night(root: Path) -> tuple[Path, list[str]]:
    """An autoresearch checkout after a night: kept commits on autoresearch/test, discarded ones reset away."""
    root.mkdir()
    (root / "prepare.py").write_text(PREPARE_PY)
    (root / "train.py").write_text(TRAIN_PY)
    (root / ".gitignore").write_text("results.tsv\nsearch_space.yaml\n")
    repo = git.Repo.init(root)
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "agent").set_value("user", "email", "agent@localhost")
    repo.index.add(["prepare.py", "train.py", ".gitignore"])
    base = repo.index.commit("initial").hexsha[:7]
    repo.git.checkout("-b", "autoresearch/test")
    rows = [f"{base}\t1.900000\t0.1\tkeep\tbaseline"]
    lr = commit_edit(repo, "MATRIX_LR = 0.01 ", "MATRIX_LR = 0.02 ", "raise MATRIX_LR")
    rows.append(f"{lr}\t1.850000\t0.1\tkeep\traise MATRIX_LR to 0.02")
    gelu = commit_edit(repo, "nn.ReLU()", "nn.GELU()", "GELU")
    repo.git.reset("--hard", "HEAD~1")
    rows.append(f"{gelu}\t1.860000\t0.1\tdiscard\tReLU -> GELU")
    deep = commit_edit(repo, "DEPTH = 1 ", "DEPTH = 2 ", "deeper")
    repo.git.reset("--hard", "HEAD~1")
    rows.append(f"{deep}\t1.870000\t0.2\tdiscard\tDEPTH 2")
    huge = commit_edit(repo, "DEVICE_BATCH_SIZE = 8 ", "DEVICE_BATCH_SIZE = 3 ", "odd batch")
    repo.git.reset("--hard", "HEAD~1")
    rows.append(f"{huge}\t0.000000\t0.0\tcrash\tDEVICE_BATCH_SIZE 3 (assertion)")
    emb = commit_edit(repo, "EMBEDDING_LR = 0.05 ", "EMBEDDING_LR = 0.1 ", "raise EMBEDDING_LR")
    rows.append(f"{emb}\t1.800000\t0.1\tkeep\traise EMBEDDING_LR to 0.1")
    (root / "results.tsv").write_text(HEADER + "\n".join(rows) + "\n")
    (root / "search_space.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
    return root, rows


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    """The checkout, its data prepared by its own prepare.py under a $HOME of the test's."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(home))
    mp.delenv("HYBRID_AUTORESEARCH_CACHE", raising=False)
    root, _ = build_night(tmp_path_factory.mktemp("checkout") / "autoresearch")
    subprocess.run([sys.executable, "prepare.py"], cwd=root, env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                   check=True)
    yield root
    mp.undo()


def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hybrid.db'}"


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=store.open_storage(url)).get_trials()


# -- hybrid space --init-yaml -----------------------------------------------------------------------------

def test_init_yaml_proposes_the_paper_knobs_and_marks_the_rest(night, tmp_path, capsys):
    out = tmp_path / "space.yaml"
    code, err = cli(capsys, "space", "--train-py", str(night / "train.py"), "--init-yaml", str(out))
    assert code == 0, err
    text = out.read_text()
    space = load_space(out)
    check_against_code(space, (night / "train.py").read_text())
    paper = set(load_space(Path(__file__).resolve().parents[1] / "search_space.yaml").knobs)
    assert set(space.knobs) == paper | {"MLP_RATIO"}
    marked = {line.split(":")[0].strip() for line in text.splitlines() if "# REVIEW" in line}
    assert marked == {"MLP_RATIO"}
    assert "H100_BF16_PEAK_FLOPS = 989500000000000.0: a hardware constant" in text
    assert "ADAM_BETAS = (0.8, 0.95): not a literal" in text
    assert space.knobs["DEPTH"].low == 1 and space.knobs["DEPTH"].default == 1  # the paper's 4..24, widened
    assert space.knobs["MATRIX_LR"].low == 0.005 and space.knobs["MATRIX_LR"].high == 0.2
    assert cli(capsys, "space", "--train-py", str(night / "train.py"), "--init-yaml", str(out)) == (
        2, f"hybrid: error: {out} exists: --init-yaml never overwrites a file; remove it or choose another path\n")


# -- hybrid run --repo ------------------------------------------------------------------------------------

def test_a_tpe_run_trains_the_repository_own_train_py(night, tmp_path, capsys):
    url = storage(tmp_path)
    code, err = cli(capsys, "run", "--method", "tpe", "--study", "tpe", "--repo", str(night), "--trials", "3",
                    "--storage", url)
    assert code == 0, err
    assert "not hybrid's harness" in err
    trials = trials_of(url, "tpe")
    assert len(trials) == 3 and [t.user_attrs["status"] for t in trials] == ["ok"] * 3, \
        [t.user_attrs.get("error") for t in trials]
    for t in trials:
        assert 0 < t.value < 100 and t.value == t.user_attrs["val_bpb"], t.user_attrs
        assert t.user_attrs["num_steps"] > 0 and t.user_attrs["total_tokens"] > 0, t.user_attrs
        assert t.user_attrs["training_seconds"] >= 1 and t.user_attrs["total_seconds"] > 1, t.user_attrs
        ran = Path(t.user_attrs["log_path"]).parent / "train.py"
        assert f"DEPTH = {t.params['DEPTH']} " in ran.read_text()
    assert trials[0].user_attrs["source"] == "baseline"
    assert trials[0].params == load_space(night / "search_space.yaml").defaults()


def test_a_train_py_without_val_bpb_is_a_recorded_failure(night, tmp_path, capsys):
    repo = tmp_path / "silent"
    shutil.copytree(night, repo, ignore=shutil.ignore_patterns(".git"))
    train = repo / "train.py"
    train.write_text(train.read_text().replace('print(f"val_bpb:', 'print(f"loss:'))
    url = storage(tmp_path)
    code, err = cli(capsys, "run", "--method", "tpe", "--study", "s", "--repo", str(repo), "--trials", "1",
                    "--storage", url)
    assert code == 0, err
    (trial,) = trials_of(url, "s")
    assert trial.user_attrs["status"] == "crash" and trial.value == 100.0
    assert "printed no `val_bpb:` line" in trial.user_attrs["error"]


def test_summary_parsing_and_failure_classes():
    text = ("step 1\n---\nval_bpb:          0.997900\ntraining_seconds: 300.1\npeak_vram_mb:     45060.2\n"
            "mfu_percent:      39.80\ntotal_tokens_M:   499.6\nnum_steps:        953\nnum_params_M:     50.3\n")
    assert parse_summary(text)["val_bpb"] == 0.9979
    ok = outcome(0, text, None)
    assert (ok.status, ok.val_bpb, ok.peak_memory_mb, ok.total_tokens, ok.num_steps, ok.num_params) == \
        ("ok", 0.9979, 45060.2, 499_600_000, 953, 50_300_000) and ok.mfu == pytest.approx(0.398)
    assert outcome(1, "torch.OutOfMemoryError: CUDA out of memory", None).status == "oom"
    assert outcome(1, "Traceback\nAssertionError", None).error == "train.py exited with status 1: AssertionError"
    assert outcome(None, "", 302.0).status == "timeout"
    assert outcome(0, "val_bpb: nan\n", None).status == "nan"


def test_a_changed_prepare_py_stops_the_run(night, tmp_path):
    repo = tmp_path / "r"
    shutil.copytree(night, repo, ignore=shutil.ignore_patterns(".git"))
    objective = ForeignObjective(Repo.open(repo), sandbox="off")
    (repo / "prepare.py").write_text((repo / "prepare.py").read_text() + "\n# edited\n")
    with pytest.raises(Exception, match="prepare.py changed since the run started"):
        objective.evaluate(TRAIN_PY, {}, seed=0, trial_number=0, trial_dir=tmp_path / "t")


@pytest.mark.parametrize("missing", ["prepare.py", "train.py"])
def test_a_repo_without_its_scripts_is_refused(night, tmp_path, capsys, missing):
    repo = tmp_path / "partial"
    shutil.copytree(night, repo, ignore=shutil.ignore_patterns(".git", missing))
    db = tmp_path / "hybrid.db"
    for argv in (["run", "--method", "tpe", "--study", "s", "--repo", str(repo), "--trials", "1"],
                 ["import", "autoresearch", "--repo", str(repo), "--study", "s"]):
        code, err = cli(capsys, *argv, "--storage", storage(tmp_path))
        assert code == 2 and err.count("\n") == 1 and f"has no {missing}" in err, err
    assert not db.exists()


# -- hybrid import autoresearch ---------------------------------------------------------------------------

def test_import_then_report_then_a_hybrid_run_continues(night, tmp_path, capsys):
    url = storage(tmp_path)
    code, err = cli(capsys, "import", "autoresearch", "--repo", str(night), "--study", "night", "--storage", url)
    assert code == 0, err
    study = optuna.load_study(study_name="night", storage=store.open_storage(url))
    gens = store.load_generations(study)
    assert sorted(gens) == [0, 1, 2] and [gens[n]["status"] for n in (0, 1, 2)] == ["base", "promoted", "promoted"]
    assert [gens[n]["parent"] for n in (0, 1, 2)] == [None, 0, 1] and "EMBEDDING_LR = 0.1" in gens[2]["code"]
    assert "+MATRIX_LR = 0.02" in gens[1]["diff"]
    trials = study.get_trials()
    assert [t.user_attrs["autoresearch_status"] for t in trials] == ["keep", "keep", "discard", "discard", "crash",
                                                                      "keep"]
    assert [t.user_attrs["status"] for t in trials] == ["ok", "ok", "ok", "ok", "crash", "ok"]
    assert {t.user_attrs["source"] for t in trials} == {"import"} and study.best_value == 1.8
    # the discarded GELU changed code (no generation); DEPTH 2 and the crash changed knobs only (generation 1)
    assert [t.user_attrs.get("generation") for t in trials] == [0, 1, None, 1, 1, 2]
    assert trials[3].params["DEPTH"] == 2 and trials[2].params == {}
    assert trials[5].params == {**load_space(night / "search_space.yaml").defaults(), "MATRIX_LR": 0.02,
                                "EMBEDDING_LR": 0.1}

    code, _ = cli(capsys, "report", "--storage", url, "--study", "night", "--out", str(tmp_path / "report"))
    report = (tmp_path / "report" / "report.md").read_text()
    assert code == 0 and "repository's own evaluation" in report and "raise EMBEDDING_LR to 0.1" in report

    code, err = cli(capsys, "run", "--method", "hybrid", "--study", "night", "--repo", str(night), "--trials", "8",
                    "--storage", url)
    assert code == 0, err
    new = trials_of(url, "night")[6:]
    assert len(new) == 2 and all(t.user_attrs["status"] == "ok" for t in new), [t.user_attrs for t in new]
    assert {t.user_attrs["generation"] for t in new} == {2} and {t.user_attrs["source"] for t in new} == {"tpe"}


def write_tsv(repo: Path, rows: list[str]) -> None:
    (repo / "results.tsv").write_text(HEADER + "\n".join(rows) + "\n")


@pytest.mark.parametrize("case, expected", [
    ("extra field", "results.tsv: Error tokenizing data. C error: Expected 5 fields in line 3, saw 6"),
    ("bad status", "results.tsv line 3: status 'maybe' is not one of keep, discard, crash"),
    ("bad number", "results.tsv line 3: val_bpb 'low' and memory_gb '0.1' must be numbers"),
    ("missing kept commit", "results.tsv line 3: kept commit deadbee is missing from git: pass the night's --branch, "
                            "or fix the row"),
    ("unknown branch", "no branch 'autoresearch/none'"),
])
def test_bad_input_of_the_import_leaves_the_database_as_it_was(night, tmp_path, capsys, case, expected):
    repo = tmp_path / "copy"
    shutil.copytree(night, repo)
    rows = (night / "results.tsv").read_text().splitlines()[1:]
    second = {"extra field": rows[1] + "\textra", "bad status": rows[1].replace("keep", "maybe"),
              "bad number": rows[1].replace("1.850000", "low"),
              "missing kept commit": "deadbee\t1.8\t0.1\tkeep\tgone"}.get(case, rows[1])
    write_tsv(repo, [rows[0], second, *rows[2:]])
    url = storage(tmp_path)
    cli(capsys, "import", "autoresearch", "--repo", str(night), "--study", "first", "--storage", url)
    before = (tmp_path / "hybrid.db").read_bytes()
    branch = ["--branch", "autoresearch/none"] if case == "unknown branch" else []
    code, err = cli(capsys, "import", "autoresearch", "--repo", str(repo), "--study", "second", "--storage", url,
                    *branch)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert (tmp_path / "hybrid.db").read_bytes() == before


def test_a_discarded_commit_gone_from_git_is_imported_without_its_code(night, tmp_path, capsys):
    repo = tmp_path / "copy"
    shutil.copytree(night, repo)
    rows = (night / "results.tsv").read_text().splitlines()[1:]
    write_tsv(repo, [*rows, "0badc0d\t1.9\t0.1\tdiscard\tlost"])
    url = storage(tmp_path)
    code, err = cli(capsys, "import", "autoresearch", "--repo", str(repo), "--study", "s", "--storage", url)
    assert code == 0 and "results.tsv line 8: discard commit 0badc0d is missing from git" in err
    last = trials_of(url, "s")[-1]
    assert last.user_attrs["val_bpb"] == 1.9 and "generation" not in last.user_attrs and last.params == {}


def test_the_llm_code_agent_edits_the_repository_train_py_under_the_same_guard(night, tmp_path, capsys, monkeypatch):
    """The agent sees the repository's train.py and brief; an edit is guarded against what that file itself does."""
    from llm_server import FakeLLM, file_answer, shown_train_py

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("HYBRID_LLM_BACKOFF_SECONDS", "0.01")
    (night / "program.md").write_text("Make the tiny byte model better. Only train.py changes.\n")
    seen: list[str] = []

    def respond(system: str, prompt: str) -> str:
        seen.append(system)
        shown = shown_train_py(system)
        if len(seen) == 1:
            return file_answer(shown.replace("nn.ReLU()", "nn.GELU()"), "GELU instead of ReLU in the MLP")
        return file_answer(shown.replace("import math\n", "import math\nimport subprocess\n"), "profile the run")

    url = storage(tmp_path)
    with FakeLLM(responder=respond) as llm:
        code, err = cli(capsys, "run", "--method", "llm-code", "--study", "code", "--repo", str(night), "--trials",
                        "3", "--storage", url, "--llm", "anthropic", "--llm-base-url", llm.base_url)
    (night / "program.md").unlink()
    assert code == 0, err
    assert "Make the tiny byte model better" in seen[0] and "from prepare import" in seen[0]
    base, edit, hostile = trials_of(url, "code")
    assert [t.user_attrs["status"] for t in (base, edit)] == ["ok", "ok"], edit.user_attrs.get("error")
    assert "nn.GELU()" in (Path(edit.user_attrs["log_path"]).parent / "train.py").read_text()
    assert hostile.user_attrs["status"] == "rejected" and "import of subprocess" in hostile.user_attrs["error"]
