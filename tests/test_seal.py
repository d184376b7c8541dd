"""The harness seal: what it covers (sources, bytecode, the corpus, prepared data), what it forgives (the
interpreter's own bytecode cache), and a run that stops with one line when the harness changes under it."""
from __future__ import annotations

import json
import os
import py_compile
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import harness.seal
import hybrid.loop
from harness.profiles import get_profile
from harness.result import TrialResult
from harness.seal import EDGE_BYTES, HarnessChanged, seal
from util import cli

HARNESS = Path(harness.seal.__file__).resolve().parent
PYC = f"__pycache__/scorer.{sys.implementation.cache_tag}.pyc"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the harness package, without bytecode."""
    copy = tmp_path / "harness"
    shutil.copytree(HARNESS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Prepared data of the test profile, in miniature: the pointer, a tokenizer pickle, a token cache."""
    profile = get_profile("test")
    monkeypatch.setenv("HYBRID_DATA_DIR", str(tmp_path / "data"))
    root = tmp_path / "data" / "builtin"
    tokens = root / f"tokens-{profile.vocab_size}"
    tokens.mkdir(parents=True)
    (root / f"tokenizer-{profile.vocab_size}.pkl").write_bytes(b"ranks" * 100)
    for split in ("train", "val"):
        (tokens / f"{split}.bin").write_bytes(np.arange(3 * EDGE_BYTES // 2, dtype=np.uint16).tobytes())  # 3 MiB
        np.save(tokens / f"{split}.idx.npy", np.array([0, 10, 20]))
    (tokens / "meta.json").write_text(json.dumps({"corpus": "builtin", "vocab_size": profile.vocab_size}))
    (tmp_path / "data" / "prepared-test.json").write_text(json.dumps(
        {"corpus": "builtin", "vocab_size": profile.vocab_size, "root": str(root)}))
    return tokens


def test_an_unchanged_tree_gives_no_change(tree: Path, data: Path) -> None:
    s = seal(get_profile("test"), harness=tree)
    assert any(name.startswith("harness/corpus/") for name in s.digests)
    assert {Path(n).name for n in s.digests if not n.startswith("harness/")} == {
        "prepared-test.json", "tokenizer-2048.pkl", "meta.json", "train.bin", "val.bin", "train.idx.npy", "val.idx.npy"}
    assert s.check() == []
    s.verify()


def test_a_changed_added_or_removed_harness_file_is_named(tree: Path) -> None:
    s = seal(harness=tree)
    (tree / "scorer.py").write_text((tree / "scorer.py").read_text() + "\n# edited\n")
    (tree / "extra.py").write_text("x = 1\n")
    (tree / "corpus" / "LICENSE").unlink()
    assert s.check() == ["harness/corpus/LICENSE", "harness/extra.py", "harness/scorer.py"]


def test_a_planted_pyc_is_a_change_the_interpreters_own_is_not(tree: Path) -> None:
    s = seal(harness=tree)
    pyc = tree / PYC
    pyc.parent.mkdir()
    py_compile.compile(str(tree / "scorer.py"), cfile=str(pyc), doraise=True)  # what an import writes
    (tree / f"{PYC}.140211").write_bytes(b"half")  # importlib's temporary file, renamed to the .pyc a moment later
    assert s.check() == []
    forged = tree / "forged.py"
    forged.write_text((tree / "scorer.py").read_text().replace("def ", "def _forged_", 1))
    py_compile.compile(str(forged), cfile=str(pyc), doraise=True)  # other code under scorer's cache name
    forged.unlink()
    assert s.check() == [f"harness/{PYC}"]


def test_a_pyc_without_its_source_or_for_another_interpreter_is_a_change(tree: Path) -> None:
    s = seal(harness=tree)
    (tree / "__pycache__").mkdir()
    orphan = f"__pycache__/gone.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(tree / "scorer.py"), cfile=str(tree / orphan), doraise=True)
    (tree / "__pycache__/scorer.cpython-399.pyc").write_bytes(b"\0" * 32)
    py_compile.compile(str(tree / "scorer.py"), cfile=str(tree / "scorer.pyc"), doraise=True)  # sourceless: loaded
    assert s.check() == [f"harness/{orphan}", "harness/__pycache__/scorer.cpython-399.pyc", "harness/scorer.pyc"]


def test_a_sealed_pyc_may_be_rewritten_or_removed_by_the_interpreter(tree: Path) -> None:
    pyc = tree / PYC
    pyc.parent.mkdir()
    pyc.write_bytes(b"stale")
    s = seal(harness=tree)
    py_compile.compile(str(tree / "scorer.py"), cfile=str(pyc), doraise=True)  # a stale cache rewritten
    assert s.check() == []
    pyc.unlink()
    assert s.check() == []
    pyc.write_bytes(b"stale")
    assert s.check() == [f"harness/{PYC}"]


def test_changed_prepared_data_is_named(tree: Path, data: Path) -> None:
    s = seal(get_profile("test"), harness=tree)
    tokenizer = data.parent / "tokenizer-2048.pkl"
    tokenizer.write_bytes(b"other" * 100)
    assert s.check() == [str(tokenizer)]

    s = seal(get_profile("test"), harness=tree)
    (data / "val.idx.npy").write_bytes((data / "val.idx.npy").read_bytes()[:-1] + b"\1")
    assert s.check() == [str(data / "val.idx.npy")]


def test_a_token_file_is_sealed_by_size_mtime_and_its_first_and_last_mib(tree: Path, data: Path) -> None:
    val = data / "val.bin"
    stat = val.stat()

    def rewrite(offset: int) -> None:
        before = val.stat()
        with val.open("r+b") as f:
            f.seek(offset)
            old = f.read(2)
            f.seek(offset)
            f.write(bytes(255 - b for b in old))
        os.utime(val, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same mtime: only the hash can tell

    s = seal(get_profile("test"), harness=tree)
    rewrite(stat.st_size - 2)  # the tail
    assert s.check() == [str(val)]
    s = seal(get_profile("test"), harness=tree)
    rewrite(0)  # the head
    assert s.check() == [str(val)]
    s = seal(get_profile("test"), harness=tree)
    os.utime(val, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    assert s.check() == [str(val)]
    s = seal(get_profile("test"), harness=tree)
    with val.open("ab") as f:  # grown
        f.write(b"\0\0")
    assert s.check() == [str(val)]
    s = seal(get_profile("test"), harness=tree)
    rewrite(EDGE_BYTES + 10)  # the middle, size and mtime kept: not seen, as documented
    assert s.check() == []


def test_a_profile_without_prepared_data_seals_the_harness_alone(tree: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRID_DATA_DIR", str(tmp_path / "empty"))
    s = seal(get_profile("test"), harness=tree)
    assert s.digests and all(name.startswith("harness/") for name in s.digests)


def test_the_error_is_one_line_naming_the_files(tree: Path) -> None:
    s = seal(harness=tree)
    for name in ("0\nnew.py", "a.py", "b.py", "c.py", "d.py"):
        (tree / name).write_text("x = 1\n")
    with pytest.raises(HarnessChanged) as e:
        s.verify()
    assert str(e.value) == ("the harness changed since the run started: harness/0\\nnew.py, harness/a.py, harness/b.py "
                            "and 2 more; restore it, or start a new run")


# -- a run ---------------------------------------------------------------------------------------------------

class EditsTheHarness:
    """Instant trials; the second one changes harness/scorer.py (of a copy) as a trial of a broken sandbox might."""
    name = "edits-the-harness"

    def __init__(self, scorer: Path) -> None:
        self.scorer, self.trials = scorer, 0

    def evaluate(self, code: str, config: dict, *, seed: int, trial_number: int, trial_dir: Path) -> TrialResult:
        self.trials += 1
        if self.trials == 2:
            self.scorer.write_text(self.scorer.read_text() + "\n# changed mid-run\n")
        return TrialResult(val_bpb=1.0 + trial_number / 100, training_seconds=1.0, total_seconds=1.0, config=config)


def test_a_harness_changed_mid_run_stops_the_run_with_one_line(tree: Path, tmp_path: Path, capsys,  # noqa: ANN001
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness.seal, "HARNESS_DIR", tree)
    objective = EditsTheHarness(tree / "scorer.py")
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: objective)
    code, err = cli(capsys, "run", "--method", "tpe", "--objective", "surrogate", "--study", "s", "--trials", "6")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == ("hybrid: error: the harness changed since the run started: harness/scorer.py; "
                                    "restore it, or start a new run")
    assert objective.trials == 2  # the trial after the change never ran
