"""The patch guard: a fast first filter on an agent's train.py, read (never run) before anything runs it.

It is NOT the security boundary. Agent code runs only in sandboxed processes (harness/sandbox.py: no network,
no data files, no harness state, a scratch folder of its own), and val_bpb is computed from the model's logits
by the trusted scorer (harness/scorer.py), in a process agent code never runs in. Python offers too many paths
to the same object for a static check to close them all; an edit that slips past the guard gains nothing.

What the guard is for: refusing early, with one line the agent can act on, what a training script has no
business doing: importing outside the allow-list; files, processes, the network, the environment and dynamic
code (open, os, subprocess, socket, importlib, ctypes, eval/exec/compile, __import__, the interpreter's
internals); naming the harness's files or data; patching the modules it imports (pointless: the scorer has its
own process); printing or writing a metric line (val_bpb is the harness's).
Edits of files other than train.py are refused where the answer is read (hybrid/llm/edits.py). The harness
seal, which notices a changed harness or prepared data, is harness/seal.py, taken by the run (hybrid/loop.py).
"""
from __future__ import annotations

import ast
import re
from collections.abc import Iterator

from harness.knobs import parse_python

MAX_BYTES = 100_000
MAX_LINES = 3000

ALLOWED_MODULES = ("torch", "numpy", "math", "time", "dataclasses", "functools", "typing", "collections",
                   "itertools", "contextlib", "enum", "abc", "random", "gc", "__future__", "harness.api")
# Under `hybrid run --repo`: the repository's prepare.py instead of the harness (its own train.py may use more: see
# check_code), and the function whose value is its val_bpb.
FOREIGN_PREPARE, FOREIGN_METRIC = "prepare", "evaluate_bpb"
FOREIGN_MODULES = tuple(m for m in ALLOWED_MODULES if m != "harness.api") + (FOREIGN_PREPARE,)
# Submodules of allowed packages that read or write files, start processes or open sockets.
DENIED_MODULES = ("torch.hub", "torch.utils.cpp_extension", "torch.utils.data", "torch.utils.collect_env",
                  "torch.utils.tensorboard", "torch.multiprocessing", "torch.distributed", "torch.package",
                  "torch.serialization", "torch.testing", "torch.onnx", "numpy.lib", "numpy.ctypeslib",
                  "numpy.f2py", "numpy.testing", "numpy.distutils")
# Builtins that open files, run code built from strings, or reach the interpreter's state.
DENIED_NAMES = frozenset({"open", "eval", "exec", "compile", "__import__", "globals", "locals", "vars", "breakpoint",
                          "__builtins__", "__loader__", "__spec__", "__file__"})
# Attribute names refused on any object, by what they lead to.
DENIED_ATTRIBUTES = frozenset({
    # modules that allowed ones re-export (torch.os, typing.sys, np.ctypeslib's ctypes)
    "os", "sys", "subprocess", "socket", "builtins", "importlib", "ctypes", "shutil", "pathlib", "io", "inspect",
    "urllib", "http", "requests", "pickle", "signal", "threading", "multiprocessing", "_thread", "platform",
    "tempfile", "glob", "runpy", "marshal", "mmap", "resource", "posix", "site",
    # the environment and processes
    "environ", "environb", "getenv", "putenv", "unsetenv", "system", "popen", "Popen", "fork", "spawn", "kill",
    # files, serialization, downloads
    "open", "read_text", "read_bytes", "write_text", "write_bytes", "unlink", "rmdir", "mkdir", "rename", "touch",
    "symlink_to", "chmod", "load", "loads", "save", "savez", "savez_compressed", "savetxt", "loadtxt", "genfromtxt",
    "fromfile", "tofile", "from_file", "memmap", "open_memmap", "fromregex", "DataSource", "load_library",
    "load_state_dict_from_url", "download_url_to_file", "load_url",
    # the interpreter's internals: other modules' globals, every live object, frames
    "__subclasses__", "__globals__", "__builtins__", "__code__", "__closure__", "__dict__", "__mro__", "__bases__",
    "__base__", "__getattribute__", "__reduce__", "__reduce_ex__", "__loader__", "__spec__", "__file__", "__path__",
    "__import__", "__traceback__", "_getframe", "get_objects", "get_referrers", "get_referents",
})
# Module state train.py may set: compiler and kernel switches. Any other assignment into a module is a patch.
SETTABLE = ("torch.backends.", "torch._dynamo.config.", "torch._inductor.config.", "torch._functorch.config.")
METRIC = re.compile(r"val[_ ]?bpb|bits[_ ]per[_ ]byte|val[_ ]?loss", re.IGNORECASE)
HARNESS_FILES = re.compile(r"val\.bin|val\.idx|tokens-\d|\.cache/hybrid|HYBRID_DATA_DIR|harness/|\.parquet|"
                           r"result[-.\w]*\.json")
OFF_LIMITS = "files, processes, the network, the environment and the interpreter's internals are off limits"


class PatchRejected(Exception):
    """A proposal refused before anything ran; `reason` is one line, shown to the agent next time."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_patch(old_code: str, new_code: str, *, foreign_base: str | None = None) -> None:
    """PatchRejected(reason) unless `new_code` is an acceptable replacement for train.py `old_code`.
    `foreign_base`: the repository's own train.py of a `hybrid run --repo` (see check_code)."""
    if new_code == old_code:
        raise PatchRejected("the edit changes nothing")
    check_code(new_code, foreign_base=foreign_base)


def check_code(code: str, *, foreign_base: str | None = None) -> None:
    """PatchRejected(reason) naming the first line the guard refuses, unless the whole train.py passes.

    With `foreign_base` (an autoresearch checkout's own train.py), what that file does itself is allowed (its
    environment switches, kernel downloads, imports from its prepare.py, its summary lines), line for line; only
    what it lacks is refused, and the metric stays the repository's: evaluate_bpb imported from prepare and
    called, never defined, and no line that computes val_bpb otherwise than the repository's own."""
    size = len(code.encode("utf-8"))
    if size > MAX_BYTES:
        raise PatchRejected(f"train.py would be {size:,} bytes, more than the {MAX_BYTES:,} allowed")
    lines = code.count("\n") + 1
    if lines > MAX_LINES:
        raise PatchRejected(f"train.py would be {lines:,} lines, more than the {MAX_LINES:,} allowed")
    try:
        tree = parse_python(code)
    except SyntaxError as e:
        raise PatchRejected(f"train.py does not parse: line {e.lineno}: {e.msg}") from None
    except ValueError as e:  # null bytes
        raise PatchRejected(f"train.py does not parse: {e}") from None
    foreign = foreign_base is not None
    problems = sorted(_problems(tree, foreign), key=lambda p: p[:2])  # reading order; of nested ones, the outermost
    if foreign:
        problems = _not_in_base(problems, code, foreign_base)
    if problems:
        line, _, message = problems[0]
        raise PatchRejected(f"line {line}: {message}")
    nodes = list(ast.walk(tree))
    if foreign:
        _check_foreign_metric(nodes)
        return
    if not any(_imports_api(node) for node in nodes):
        raise PatchRejected("train.py no longer imports harness.api: it must train through the harness's session")
    if not any(isinstance(n, ast.Call) and _called_name(n) == "finish" for n in nodes):
        raise PatchRejected("train.py never calls session.finish(model): the harness must be handed the model")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports_api(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name == "harness.api" for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.module == "harness.api" or (node.module == "harness" and any(a.name == "api" for a in node.names))
    return False


def _not_in_base(problems: list[tuple[int, int, str]], code: str, base: str) -> list[tuple[int, int, str]]:
    """The problems of `code` whose line (its text, and the reason) the foreign repository's own train.py lacks."""
    def keyed(found: list[tuple[int, int, str]], text: str) -> list[tuple[str, str]]:
        lines = text.splitlines()
        return [(lines[line - 1].strip() if 0 < line <= len(lines) else "", message) for line, _, message in found]

    allowed = set(keyed(list(_problems(parse_python(base), True)), base))
    return [p for p, key in zip(problems, keyed(problems, code)) if key not in allowed]


def _check_foreign_metric(nodes: list[ast.AST]) -> None:
    """The foreign repository's val_bpb must stay its prepare.py's evaluate_bpb."""
    imported = any(isinstance(n, ast.ImportFrom) and n.module == FOREIGN_PREPARE
                   and any(a.name == FOREIGN_METRIC and a.asname is None for a in n.names) for n in nodes)
    if not imported:
        raise PatchRejected(f"train.py no longer imports {FOREIGN_METRIC} from {FOREIGN_PREPARE}: val_bpb must be the "
                            "repository's own evaluation")
    if not any(isinstance(n, ast.Call) and _called_name(n) == FOREIGN_METRIC for n in nodes):
        raise PatchRejected(f"train.py never calls {FOREIGN_METRIC}: val_bpb must be the repository's own evaluation")


def _problems(tree: ast.Module, foreign: bool = False) -> Iterator[tuple[int, int, str]]:
    """(line, column, reason) for every construct the guard refuses (under the foreign rules: see check_code)."""
    nodes = list(ast.walk(tree))
    modules = _imported_modules(nodes)
    called = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
    for node in nodes:
        where = (getattr(node, "lineno", 0), getattr(node, "col_offset", 0))
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from ((*where, m) for m in _import_problems(alias.name, foreign))
        elif isinstance(node, ast.ImportFrom):
            yield from ((*where, m) for m in _from_import_problems(node, foreign))
        elif foreign and isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == FOREIGN_METRIC:
            yield *where, f"train.py may not define {FOREIGN_METRIC}: val_bpb is the repository's own evaluation"
        elif foreign and isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and any(
                isinstance(t, ast.Name) and (METRIC.search(t.id) or t.id == FOREIGN_METRIC) for t in _targets(node)):
            yield *where, ("val_bpb is the repository's own evaluation: train.py may not compute it otherwise than "
                           "the repository's train.py does")
        elif isinstance(node, ast.Name):
            if node.id in DENIED_NAMES:
                yield *where, f"`{node.id}` is not allowed in train.py ({OFF_LIMITS})"
            elif node.id == "getattr" and id(node) not in called:
                yield *where, 'getattr is allowed only as getattr(obj, "literal_name"[, default])'
        elif isinstance(node, ast.Attribute):
            if node.attr in DENIED_ATTRIBUTES:
                yield *where, f"`.{node.attr}` is not allowed in train.py ({OFF_LIMITS})"
            path = _dotted(node, modules)
            if path and _under(path, DENIED_MODULES):
                yield *where, f"{path} is not allowed (files, processes or the network)"
            elif path and isinstance(node.ctx, (ast.Store, ast.Del)) and not path.startswith(SETTABLE):
                yield *where, (f"train.py may not patch modules ({path}): define your own function instead (the "
                               "harness scores in a process of its own, where a patch changes nothing)")
        elif isinstance(node, ast.Call):
            yield from ((*where, m) for m in _call_problems(node))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and HARNESS_FILES.search(node.value):
            yield *where, (f"the string {node.value[:60]!r} refers to the harness's files or data: train.py gets its "
                         "batches from the session")


def _targets(node: ast.Assign | ast.AugAssign | ast.AnnAssign) -> list[ast.AST]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [n for t in targets for n in ast.walk(t)]


def _import_problems(name: str, foreign: bool = False) -> Iterator[str]:
    modules = FOREIGN_MODULES if foreign else ALLOWED_MODULES
    if name.split(".")[0] == "harness" and (foreign or name != "harness.api"):
        yield f"import of {name}: train.py may use the harness only through harness.api"
    elif not _under(name, modules) or _under(name, DENIED_MODULES):
        allowed = ", ".join(m for m in modules if m != "__future__")
        yield f"import of {name} is not allowed (allowed: {allowed})"


def _from_import_problems(node: ast.ImportFrom, foreign: bool = False) -> Iterator[str]:
    if node.level:
        yield "relative imports are not allowed: train.py is a single file"
        return
    module = node.module or ""
    for alias in node.names:
        if alias.name == "*":
            yield f"`from {module} import *` is not allowed: import the names you use"
        elif module == "harness":
            yield from _import_problems(f"harness.{alias.name}", foreign)
        else:
            yield from _import_problems(module, foreign)
            if alias.name in DENIED_ATTRIBUTES or _under(f"{module}.{alias.name}", DENIED_MODULES):
                yield f"`from {module} import {alias.name}` is not allowed ({OFF_LIMITS})"


def _call_problems(node: ast.Call) -> Iterator[str]:
    func = node.func
    if isinstance(func, ast.Name) and func.id == "getattr":
        name = node.args[1] if len(node.args) >= 2 else None
        if not (isinstance(name, ast.Constant) and isinstance(name.value, str)) or len(node.args) > 3:
            yield 'getattr is allowed only as getattr(obj, "literal_name"[, default])'
        elif name.value in DENIED_ATTRIBUTES or name.value.startswith("__"):
            yield f"getattr(..., {name.value!r}) is not allowed in train.py ({OFF_LIMITS})"
    printing = _called_name(node) in ("print", "write")  # print(...), sys.stdout.write(...), log.write(...)
    strings = "".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))
    if printing and METRIC.search(strings):
        yield "train.py may not print metric lines, nor write them (val_bpb is computed and reported by the harness)"


def _called_name(call: ast.Call) -> str | None:
    """`print` for print(...), `finish` for session.finish(...), None for anything else."""
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _imported_modules(nodes: list[ast.AST]) -> dict[str, str]:
    """Name -> the module it was imported as (`import torch.nn.functional as F`: F -> torch.nn.functional)."""
    modules: dict[str, str] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                modules[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return modules


def _dotted(node: ast.Attribute, modules: dict[str, str]) -> str | None:
    """`torch.utils.cpp_extension.load` as a dotted path when it starts at an imported name, else None."""
    attrs: list[str] = []
    current: ast.AST = node
    while isinstance(current, ast.Attribute):
        attrs.append(current.attr)
        current = current.value
    if not isinstance(current, ast.Name) or current.id not in modules:
        return None
    return ".".join([modules[current.id], *reversed(attrs)])
