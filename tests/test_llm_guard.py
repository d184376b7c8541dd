"""The patch guard: each reason it refuses an agent's train.py for, and what it lets through.

The guard is a first filter that explains refusals (the sandbox and the trusted scorer are the boundary); the
harness seal is tested in tests/test_seal.py.
"""
from __future__ import annotations

import pytest

from hybrid.llm.guard import PatchRejected, check_patch, check_code
from hybrid.paths import PROJECT_ROOT

BASELINE = (PROJECT_ROOT / "train.py").read_text()
ANCHOR = "    session = api.start()\n"


def with_lines(*lines: str, top: str = "") -> str:
    """The baseline train.py with lines added right after `session = api.start()` (and imports at the top)."""
    assert BASELINE.count(ANCHOR) == 1
    body = "".join(f"    {line}\n" for line in lines)
    return top + BASELINE.replace(ANCHOR, ANCHOR + body)


def reason(code: str) -> str:
    with pytest.raises(PatchRejected) as e:
        check_code(code)
    assert "\n" not in e.value.reason
    return e.value.reason


def test_the_baseline_passes():
    check_code(BASELINE)


REFUSED = [
    # imports outside the allow-list, and the harness beyond harness.api
    ("import os\n" + BASELINE, "import of os is not allowed (allowed: torch, numpy"),
    ("import sys\n" + BASELINE, "import of sys is not allowed"),
    ("import subprocess\n" + BASELINE, "import of subprocess is not allowed"),
    ("import socket\n" + BASELINE, "import of socket is not allowed"),
    ("import urllib.request\n" + BASELINE, "import of urllib.request is not allowed"),
    ("import importlib\n" + BASELINE, "import of importlib is not allowed"),
    ("import ctypes\n" + BASELINE, "import of ctypes is not allowed"),
    ("import inspect\n" + BASELINE, "import of inspect is not allowed"),
    ("import pathlib\n" + BASELINE, "import of pathlib is not allowed"),
    ("import operator\n" + BASELINE, "import of operator is not allowed"),
    ("import einops\n" + BASELINE, "import of einops is not allowed"),
    ("import torch.distributed as dist\n" + BASELINE, "import of torch.distributed is not allowed"),
    ("from torch.utils.data import DataLoader\n" + BASELINE, "import of torch.utils.data is not allowed"),
    ("from torch import load\n" + BASELINE, "`from torch import load` is not allowed"),
    ("from os import *\n" + BASELINE, "`from os import *` is not allowed"),
    ("from torch import *\n" + BASELINE, "`from torch import *` is not allowed"),
    ("from . import helpers\n" + BASELINE, "relative imports are not allowed"),
    (with_lines("from harness import loader"), "train.py may use the harness only through harness.api"),
    (with_lines("import harness.scorer"), "import of harness.scorer: train.py may use the harness only"),
    # files and the harness's data
    (with_lines('open("/tmp/x").read()'), "`open` is not allowed"),
    (with_lines("x = torch.load('ckpt.pt')"), "`.load` is not allowed"),
    (with_lines("torch.save(model, 'm.pt')"), "`.save` is not allowed"),
    (with_lines("x = np.fromfile('a')"), "`.fromfile` is not allowed"),
    (with_lines("x = torch.from_file('a', size=3)"), "`.from_file` is not allowed"),
    (with_lines("x = torch.hub"), "torch.hub is not allowed"),
    (with_lines("x = torch.utils.cpp_extension.load_inline('m', '')"), "torch.utils.cpp_extension.load_inline is not"),
    (with_lines("name = 'tokens-2048/val.bin'"), "refers to the harness's files or data"),
    (with_lines("x = '/root/.cache/hybrid/builtin'"), "refers to the harness's files or data"),
    (with_lines("x = 'harness/scorer.py'"), "refers to the harness's files or data"),
    (with_lines("x = 'result.json'"), "refers to the harness's files or data"),
    # processes, the network, the environment
    (with_lines("x = torch.os.environ"), "`.environ` is not allowed"),
    (with_lines("home = config.getenv('HOME')"), "`.getenv` is not allowed"),
    (with_lines("x = typing.sys.modules"), "`.sys` is not allowed"),
    (with_lines("x = np.ctypeslib", top="import numpy as np\n"), "numpy.ctypeslib is not allowed"),
    (with_lines("x = torch.multiprocessing.spawn"), "`.spawn` is not allowed"),
    (with_lines("p = mp.spawn(f)"), "`.spawn` is not allowed"),
    (with_lines("x = torch.utils.data"), "torch.utils.data is not allowed"),
    # dynamic code, and the interpreter's internals
    (with_lines("x = eval('1')"), "`eval` is not allowed"),
    (with_lines("exec('x = 1')"), "`exec` is not allowed"),
    (with_lines("c = compile('1', 'f', 'eval')"), "`compile` is not allowed"),
    (with_lines("m = __import__('os')"), "`__import__` is not allowed"),
    (with_lines("g = globals()"), "`globals` is not allowed"),
    (with_lines("v = vars(torch)"), "`vars` is not allowed"),
    (with_lines("breakpoint()"), "`breakpoint` is not allowed"),
    (with_lines("b = __builtins__"), "`__builtins__` is not allowed"),
    (with_lines("x = F.__dict__"), "`.__dict__` is not allowed"),
    (with_lines("x = [c for c in ().__class__.__base__.__subclasses__()]"), "`.__subclasses__` is not allowed"),
    (with_lines("x = main.__globals__"), "`.__globals__` is not allowed"),
    (with_lines("x = gc.get_objects()"), "`.get_objects` is not allowed"),
    (with_lines("x = getattr(torch, 'o' + 's')"), "getattr is allowed only as"),
    (with_lines("f = getattr"), "getattr is allowed only as"),
    (with_lines("x = getattr(torch, 'os')"), "getattr(..., 'os') is not allowed"),
    (with_lines("x = getattr(main, '__globals__')"), "getattr(..., '__globals__') is not allowed"),
    (with_lines("x = getattr(model, '__class__')"), "getattr(..., '__class__') is not allowed"),  # any dunder
    # patching what it imports (harmless to the scorer, and pointless)
    (with_lines("F.cross_entropy = lambda *a, **k: 0"), "may not patch modules (torch.nn.functional.cross"),
    (with_lines("time.perf_counter = lambda: 0.0"), "may not patch modules (time.perf_counter)"),
    (with_lines("torch.Tensor.item = lambda self: 0.0"), "(torch.Tensor.item)"),
    (with_lines("del math.log"), "(math.log)"),
    # the metric
    (with_lines('print(f"val_bpb: {0.1:.6f}")'), "may not print metric lines"),
    (with_lines('print("val" + "_bpb:", 0.1)'), "may not print metric lines"),
    (with_lines('print("%s %f" % ("val_bpb", 0.1))'), "may not print metric lines"),
    (with_lines('print(f"bits per byte {1.0}")'), "may not print metric lines"),
    (with_lines('log.write("val_loss 0.5")'), "may not print metric lines"),
    # the harness API must stay in use
    (BASELINE.replace("    session.finish(model)\n", ""), "never calls session.finish"),
    (BASELINE.replace("    from harness import api\n", "    api = None\n"), "no longer imports harness.api"),
    # size and syntax
    (BASELINE + "x = 1\n" * 3000, "lines, more than the 3,000 allowed"),
    (BASELINE + "#" * 100_001 + "\n", "bytes, more than the 100,000 allowed"),
    (BASELINE + "def broken(:\n", "does not parse"),
    (BASELINE + "x = 1\0\n", "does not parse"),
]


@pytest.mark.parametrize("code, why", REFUSED, ids=[why[:40] + f"-{i}" for i, (_, why) in enumerate(REFUSED)])
def test_refused(code, why):
    assert why in reason(code)


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
    with_lines("x = torch.zeros(3)", "x.data = torch.ones(3)"),
    with_lines("for m in model.modules():", "    pass"),
    with_lines("name = type(model).__name__", "super_init = nn_init = object.__init__"),
    with_lines("torch._dynamo.config.cache_size_limit = 64"),
    # the sandbox and the scorer's own process make these harmless: the guard no longer chases them
    with_lines("x = api._session", "session._start_clock = None"),
    with_lines("T = torch.Tensor", "T.item = lambda self: 0.0"),
    with_lines("setattr(F, 'cross_entropy', None)"),
]


@pytest.mark.parametrize("code", ALLOWED, ids=range(len(ALLOWED)))
def test_allowed(code):
    check_code(code)


def test_the_catalog_mutations_pass_the_guard():
    catalog = pytest.importorskip("hybrid.llm.catalog")
    for mutation in catalog.MUTATIONS:
        check_code(mutation.apply(BASELINE).code)


def test_an_unchanged_file_is_not_an_edit():
    with pytest.raises(PatchRejected, match="changes nothing"):
        check_patch(BASELINE, BASELINE)
    check_patch(BASELINE, BASELINE.replace("LOGIT_SOFTCAP = 15.0", "LOGIT_SOFTCAP = 12.0"))


def test_the_first_refused_line_is_named():
    code = with_lines("x = eval('1')", "import os")
    line = next(i for i, text in enumerate(code.splitlines(), 1) if "eval(" in text)
    assert reason(code).startswith(f"line {line}: `eval`")


# -- a foreign repository's train.py (hybrid run --repo): its own constructs allowed, line for line --------------

FOREIGN = '''import os
os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
import math
import time

import torch
from kernels import get_kernel
fa3 = get_kernel("kernels-community/flash-attn3").flash_attn_interface

from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb

DEPTH = 8
MATRIX_LR = 0.04


def main():
    model = torch.nn.Linear(4, 4)
    t0 = time.time()
    val_bpb = evaluate_bpb(model, Tokenizer.from_directory(), 32)
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {time.time() - t0:.1f}")


main()
'''


def foreign_reason(code: str) -> str:
    with pytest.raises(PatchRejected) as e:
        check_patch(FOREIGN, code, foreign_base=FOREIGN)
    return e.value.reason


def test_a_foreign_train_py_passes_as_it_is_and_with_its_knobs_changed():
    check_code(FOREIGN, foreign_base=FOREIGN)
    check_patch(FOREIGN, FOREIGN.replace("DEPTH = 8", "DEPTH = 10").replace("= 0.04", "= 0.02"), foreign_base=FOREIGN)
    assert "harness.api" in reason(FOREIGN)  # without the foreign rules, its imports are refused


@pytest.mark.parametrize("edit, why", [
    (("import time\n", "import time\nimport subprocess\n"), "import of subprocess is not allowed"),
    (("DEPTH = 8\n", "DEPTH = 8\nos.environ['HOME'] = '/tmp'\n"), "`.environ` is not allowed"),
    (("    print(\"---\")\n", "    val_bpb = val_bpb * 0.5\n    print(\"---\")\n"), "may not compute it otherwise"),
    (("    val_bpb = evaluate_bpb(model, Tokenizer.from_directory(), 32)\n",
      "    val_bpb = evaluate_bpb(model, Tokenizer.from_directory(), 32) - 0.1\n"), "may not compute it otherwise"),
    (("    print(\"---\")\n", "    print(\"---\")\n    print('val_bpb: 0.5')\n"), "may not print metric lines"),
    (("DEPTH = 8\n", "DEPTH = 8\ndef evaluate_bpb(*a):\n    return 0.5\n"), "may not define evaluate_bpb"),
    (("make_dataloader, evaluate_bpb", "make_dataloader"), "no longer imports evaluate_bpb from prepare"),
    (("from prepare import", "from harness.api import start\nfrom prepare import"), "only through harness.api"),
])
def test_a_foreign_edit_is_refused_for_what_the_repository_never_did(edit, why):
    old, new = edit
    assert FOREIGN.count(old) == 1
    assert why in foreign_reason(FOREIGN.replace(old, new))
