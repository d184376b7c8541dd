"""The patch guard: what an agent's train.py may not do, what it may, and the harness seal."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hybrid.llm import guard
from hybrid.llm.guard import HarnessChanged, HarnessSeal, PatchRejected, api_surface, check_patch, check_source
from hybrid.paths import PROJECT_ROOT

BASELINE = (PROJECT_ROOT / "train.py").read_text()
ANCHOR = "    session = api.start()\n"


@pytest.fixture(autouse=True)
def fresh_seal(monkeypatch):
    """The harness as it is now (other work may have changed it since the guard was imported)."""
    monkeypatch.setattr(guard, "SEAL", HarnessSeal())


def with_lines(*lines: str, top: str = "") -> str:
    """The baseline train.py with lines added right after `session = api.start()` (and imports at the top)."""
    assert BASELINE.count(ANCHOR) == 1
    body = "".join(f"    {line}\n" for line in lines)
    return top + BASELINE.replace(ANCHOR, ANCHOR + body)


def reason(source: str) -> str:
    with pytest.raises(PatchRejected) as e:
        check_source(source)
    assert "\n" not in e.value.reason
    return e.value.reason


def test_the_baseline_passes():
    check_source(BASELINE)


REFUSED = [
    # files and the validation data
    (with_lines('open("/tmp/x").read()'), "`open` is not allowed"),
    (with_lines("x = torch.load('ckpt.pt')"), "`.load` is not allowed"),
    (with_lines("x = np.fromfile('val.bin')", ), "`.fromfile` is not allowed"),
    (with_lines("x = torch.from_file('a', size=3)"), "`.from_file` is not allowed"),
    (with_lines("root = session.data"), "`.data` of a harness object"),
    (with_lines("p = session.data.root"), "`.data` of a harness object"),
    (with_lines("s = type(session)", "y = s._start_clock"), "`._start_clock` of a harness object"),
    (with_lines("name = 'tokens-2048/val.bin'"), "refers to the harness's files"),
    (with_lines("x = '/root/.cache/hybrid/builtin'"), "refers to the harness's files"),
    # the harness's internals
    (with_lines("from harness import loader"), "train.py may use the harness only through harness.api"),
    (with_lines("import harness.evaluate"), "import of harness.evaluate"),
    (with_lines("x = api.loader"), "harness.api.loader is not part of the harness API"),
    (with_lines("x = api._session"), "harness.api._session is not part of the harness API"),
    (with_lines("from harness.api import _session"), "harness.api._session is not part of the harness API"),
    (with_lines("import harness.api", "x = harness.data"), "harness.data is not part of the harness API"),
    (with_lines("a = api", "x = a.prepared"), "harness.api.prepared"),
    # changing the harness's objects or the modules it uses
    (with_lines("session.training_seconds = 0.0"), "may not change the harness's objects"),
    (with_lines("session.tokens += 1"), "may not change the harness's objects"),
    (with_lines("type(session).tick = lambda self, loss: 0.0"), "may not change the harness's objects"),
    (with_lines("time.perf_counter = lambda: 0.0"), "may not patch modules (time.perf_counter"),
    (with_lines("F.cross_entropy = lambda *a, **k: 0"), "may not patch modules (torch.nn.functional.cross_entropy"),
    (with_lines("Tensor = torch.Tensor", "Tensor.item = lambda self: 0.0"), "may not patch modules (torch.Tensor.item"),
    (with_lines("T = torch.Tensor", "T.item = lambda self: 0.0"), "may not patch modules (T.item"),  # T is also a length
    (with_lines("getattr(torch, 'nn').functional = None"), "may not patch modules"),
    (with_lines("del F.cross_entropy"), "may not patch modules"),
    (with_lines("setattr(F, 'cross_entropy', None)"), "`setattr` is not allowed"),
    # the environment, processes, the network, dynamic code, the interpreter
    (with_lines("x = torch.os.environ"), "`.environ` is not allowed"),
    (with_lines("x = typing.sys"), "`.sys` is not allowed"),
    (with_lines("x = F.__dict__"), "`.__dict__` is not allowed"),
    (with_lines("x = [c for c in ().__class__.__base__.__subclasses__()]"), "`.__subclasses__` is not allowed"),
    (with_lines("x = main.__globals__"), "`.__globals__` is not allowed"),
    (with_lines("x = gc.get_objects()"), "`.get_objects` is not allowed"),
    (with_lines("x = getattr(torch, 'o' + 's')"), "getattr is allowed only as"),
    (with_lines("f = getattr"), "getattr is allowed only as"),
    (with_lines("x = getattr(torch, 'os')"), "`.os` is not allowed"),
    (with_lines("x = eval('1')"), "`eval` is not allowed"),
    (with_lines("exec('x = 1')"), "`exec` is not allowed"),
    (with_lines("m = __import__('os')"), "`__import__` is not allowed"),
    (with_lines("g = globals()"), "`globals` is not allowed"),
    (with_lines("v = vars(torch)"), "`vars` is not allowed"),
    (with_lines("breakpoint()"), "`breakpoint` is not allowed"),
    (with_lines("x = '{0.__init__.__globals__}'.format(session)"), "reaches into attributes"),
    (with_lines("x = torch.utils.cpp_extension.load_inline('m', '')"), "torch.utils.cpp_extension.load_inline is not allowed"),
    (with_lines("x = torch.hub"), "torch.hub is not allowed"),
    ("import os\n" + BASELINE, "import of os is not allowed"),
    ("import sys\n" + BASELINE, "import of sys is not allowed"),
    ("import subprocess\n" + BASELINE, "import of subprocess is not allowed"),
    ("import socket\n" + BASELINE, "import of socket is not allowed"),
    ("import urllib.request\n" + BASELINE, "import of urllib.request is not allowed"),
    ("import importlib\n" + BASELINE, "import of importlib is not allowed"),
    ("import ctypes\n" + BASELINE, "import of ctypes is not allowed"),
    ("import inspect\n" + BASELINE, "import of inspect is not allowed"),
    ("import pathlib\n" + BASELINE, "import of pathlib is not allowed"),
    ("import einops\n" + BASELINE, "import of einops is not allowed"),
    ("import torch.distributed as dist\n" + BASELINE, "import of torch.distributed is not allowed"),
    ("from torch.utils.data import DataLoader\n" + BASELINE, "import of torch.utils.data is not allowed"),
    ("from torch import load\n" + BASELINE, "`from torch import load` is not allowed"),
    ("from os import *\n" + BASELINE, "import *"),
    ("from . import helpers\n" + BASELINE, "relative imports are not allowed"),
    # the metric
    (with_lines('print(f"val_bpb: {0.1:.6f}")'), "may not print metric lines"),
    (with_lines('print("val" + "_bpb:", 0.1)'), "may not print metric lines"),
    (with_lines('print("%s %f" % ("val_bpb", 0.1))'), "may not print metric lines"),
    (with_lines('print(f"bits per byte {1.0}")'), "may not print metric lines"),
    # the harness API must stay in use
    (BASELINE.replace("    session.finish(model)\n", ""), "never calls session.finish"),
    (BASELINE.replace("    from harness import api\n", "    api = None\n"), "no longer imports harness.api"),
    # size and syntax
    (BASELINE + "x = 1\n" * 3000, "lines, more than the 3,000 allowed"),
    (BASELINE + "#" * 100_001 + "\n", "bytes, more than the 100,000 allowed"),
    (BASELINE + "def broken(:\n", "does not parse"),
    (BASELINE + "x = 1\0\n", "does not parse"),
]


@pytest.mark.parametrize("source, why", REFUSED, ids=[why[:40] + f"-{i}" for i, (_, why) in enumerate(REFUSED)])
def test_refused(source, why):
    assert why in reason(source)


ALLOWED = [
    with_lines("torch.backends.cuda.matmul.allow_tf32 = True"),
    with_lines("torch._inductor.config.coordinate_descent_tuning = True"),
    with_lines("model_norm = getattr(F, 'rms_norm', None)"),
    with_lines("b = np.zeros(3)", top="import numpy as np\n"),
    with_lines("from harness.api import Diverged"),
    with_lines("t0 = time.perf_counter()", "gc.collect()"),
    with_lines('print(f"step {1:05d} | loss {2.5:.4f} | tok/s {100:,}")'),
    with_lines("n = session.vocab_size + session.seq_len", "bos = session.bos_id"),
    with_lines("class Box:", "    def __init__(self):", "        self._x = 1", "        self.__dict_like = {}"),
    with_lines("x = torch.zeros(3)", "x.data = torch.ones(3)"),  # a tensor's .data is not the session's
]


@pytest.mark.parametrize("source", ALLOWED, ids=range(len(ALLOWED)))
def test_allowed(source):
    check_source(source)


def test_the_catalog_mutations_pass_the_guard():
    catalog = pytest.importorskip("hybrid.llm.catalog")
    for mutation in catalog.MUTATIONS:
        check_source(mutation.apply(BASELINE).source)


def test_an_unchanged_file_is_not_an_edit():
    with pytest.raises(PatchRejected, match="changes nothing"):
        check_patch(BASELINE, BASELINE)
    check_patch(BASELINE, BASELINE.replace("LOGIT_SOFTCAP = 15.0", "LOGIT_SOFTCAP = 12.0"))


def test_the_seal_notices_a_changed_harness(tmp_path, monkeypatch):
    copy = tmp_path / "harness"
    shutil.copytree(Path(guard.HARNESS_DIR), copy, ignore=shutil.ignore_patterns("__pycache__"))
    seal = HarnessSeal(copy)
    seal.verify()
    (copy / "evaluate.py").write_text((copy / "evaluate.py").read_text() + "\n# edited\n")
    with pytest.raises(HarnessChanged, match=r"evaluate\.py"):
        seal.verify()
    monkeypatch.setattr(guard, "SEAL", seal)
    with pytest.raises(HarnessChanged):  # a user error: the run stops, nothing more is trusted
        check_patch(BASELINE, BASELINE.replace("LOGIT_SOFTCAP = 15.0", "LOGIT_SOFTCAP = 12.0"))


def test_the_api_surface():
    assert {"start", "Session", "Diverged"} <= guard.API_SURFACE
    assert "loader" not in guard.API_SURFACE and "_session" not in guard.API_SURFACE
    assert api_surface("__all__ = ['start']\ndef start(): pass\ndef helper(): pass\n") == {"start"}
    assert api_surface("import os\nfrom x import y\ndef start(): pass\n_hidden = 1\nLIMIT = 3\n") == {"start", "LIMIT"}
