"""The patch guard: an agent's train.py is untrusted, so it is read (never run) and refused when it could reach
past the training script: the harness, its data, the environment, processes, the network, or the metric.

The checks are static and conservative: an allow-list of imports, a deny-list of names and attributes that
lead to files, processes, the environment or the interpreter's internals, no patching of modules, no private
state of the harness, and no metric lines of its own. They are a first line only: the harness runs the trial
in a clean process and computes val_bpb itself, so code that slips past gains nothing.
"""
from __future__ import annotations

import ast
import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import harness
from hybrid.errors import UserError

MAX_BYTES = 100_000
MAX_LINES = 3000
HARNESS_DIR = Path(harness.__file__).resolve().parent

ALLOWED_MODULES = ("torch", "numpy", "math", "time", "dataclasses", "functools", "typing", "collections",
                   "itertools", "contextlib", "enum", "abc", "random", "gc", "__future__", "harness.api")
# Submodules of allowed packages that read or write files, start processes or open sockets.
DENIED_MODULES = ("torch.hub", "torch.utils.cpp_extension", "torch.utils.data", "torch.utils.collect_env",
                  "torch.utils.tensorboard", "torch.multiprocessing", "torch.distributed", "torch.package",
                  "torch.serialization", "torch.testing", "torch.onnx", "numpy.lib", "numpy.ctypeslib",
                  "numpy.f2py", "numpy.testing", "numpy.distutils")
# Builtins that open files, run code or reach the interpreter's state.
DENIED_NAMES = frozenset({"open", "eval", "exec", "compile", "__import__", "globals", "locals", "vars", "breakpoint",
                          "setattr", "delattr", "__builtins__", "__loader__", "__spec__", "__file__"})
# Attribute names refused on any object: modules re-exported by allowed ones (torch.os, typing.sys), the
# environment, processes, files, serialization, and the interpreter's introspection hooks.
DENIED_ATTRIBUTES = frozenset({
    "os", "sys", "subprocess", "socket", "builtins", "importlib", "ctypes", "shutil", "pathlib", "io", "inspect",
    "urllib", "http", "requests", "pickle", "signal", "threading", "multiprocessing", "_thread", "platform",
    "tempfile", "glob", "runpy", "marshal", "mmap", "resource", "posix", "_os", "_sys", "site",
    "environ", "environb", "getenv", "putenv", "unsetenv", "system", "popen", "Popen", "fork", "spawn",
    "open", "read_text", "read_bytes", "write_text", "write_bytes", "unlink", "rmdir", "mkdir", "rename", "touch",
    "symlink_to", "chmod", "load", "loads", "save", "savez", "savez_compressed", "savetxt", "loadtxt", "genfromtxt",
    "fromfile", "tofile", "from_file", "memmap", "open_memmap", "load_library", "load_state_dict_from_url",
    "download_url_to_file", "load_url", "DataSource", "fromregex", "get_type_hints", "make_dataclass",
    "__subclasses__", "__globals__", "__builtins__", "__code__", "__closure__", "__dict__", "__mro__", "__bases__",
    "__base__", "__getattribute__", "__reduce__", "__reduce_ex__", "__loader__", "__spec__", "__file__", "__path__",
    "__import__", "__self__", "__func__", "__wrapped__", "__setattr__", "__delattr__", "__traceback__",
    "_getframe", "f_globals", "f_locals", "f_back", "f_builtins", "f_code", "gi_frame", "gi_code", "cr_frame",
    "cr_code", "ag_frame", "tb_frame", "tb_next", "get_objects", "get_referrers", "get_referents",
})
# Attributes of harness objects (the session) that lead to its data.
HARNESS_HIDDEN = frozenset({"data"})
# Module state that train.py may set (compiler and kernel switches); any other assignment into a module is a patch.
SETTABLE_PREFIXES = ("torch.backends.", "torch._dynamo.config.", "torch._inductor.config.", "torch._functorch.config.")
SELF_NAMES = ("self", "cls")
METRIC = re.compile(r"val[_ ]?bpb|bits[_ ]per[_ ]byte|val[_ ]?loss", re.IGNORECASE)
HARNESS_FILES = re.compile(r"val\.bin|val\.idx|tokens-\d|\.cache/hybrid|HYBRID_DATA_DIR|harness/|\.parquet|result[-.\w]*\.json")
FORMAT_ATTRIBUTE = re.compile(r"\{[^{}]*__\w*[^{}]*\}")  # "{0.__init__.__globals__}".format(f) reaches attributes


class PatchRejected(Exception):
    """A proposal refused before anything ran; `reason` is one line, shown to the agent next time."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HarnessChanged(UserError):
    """The harness package differs from when the run started: no result after that point can be trusted."""


class HarnessSeal:
    """SHA-256 of every file of the harness package, taken once; verify() compares the files now."""

    def __init__(self, root: Path = HARNESS_DIR) -> None:
        self.root = Path(root)
        self.hashes = self._hash_all()

    def _hash_all(self) -> dict[str, str]:
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}

    def verify(self) -> None:
        now = self._hash_all()
        changed = sorted(name for name in self.hashes.keys() | now.keys() if self.hashes.get(name) != now.get(name))
        if changed:
            raise HarnessChanged(f"the harness changed since the run started ({', '.join(changed[:5])}): "
                                 "restore it (git checkout harness/) before going on")


SEAL = HarnessSeal()  # taken when the optimizer first loads the guard: the start of the run


def api_surface(api_source: str) -> frozenset[str]:
    """The names train.py may use from harness.api: its __all__, else what it defines publicly (not what it imports)."""
    names: set[str] = set()
    for node in ast.parse(api_source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return frozenset(ast.literal_eval(node.value))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(n for n in names if not n.startswith("_"))


API_SURFACE = api_surface((HARNESS_DIR / "api.py").read_text())


def check_patch(old_source: str, new_source: str) -> None:
    """PatchRejected(reason) unless `new_source` is a safe replacement for train.py `old_source`.

    Also verifies that the harness is as it was at the start of the run (HarnessChanged otherwise).
    """
    SEAL.verify()
    if new_source == old_source:
        raise PatchRejected("the edit changes nothing")
    check_source(new_source)


def check_source(source: str) -> None:
    """PatchRejected(reason) unless the whole train.py passes the guard's static checks."""
    size = len(source.encode("utf-8"))
    if size > MAX_BYTES:
        raise PatchRejected(f"train.py would be {size:,} bytes, more than the {MAX_BYTES:,} allowed")
    lines = source.count("\n") + 1
    if lines > MAX_LINES:
        raise PatchRejected(f"train.py would be {lines:,} lines, more than the {MAX_LINES:,} allowed")
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise PatchRejected(f"train.py does not parse: line {e.lineno}: {e.msg}") from None
    except ValueError as e:  # null bytes
        raise PatchRejected(f"train.py does not parse: {e}") from None
    nodes = list(ast.walk(tree))
    for aliases in (False, True):  # direct uses first, so that the reason points at the line that does it
        _Checker(tree, nodes, aliases).run()


def _fail(node: ast.AST, message: str) -> PatchRejected:
    return PatchRejected(f"line {getattr(node, 'lineno', '?')}: {message}")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_allowed(name: str) -> bool:
    return _under(name, ALLOWED_MODULES) and not _under(name, DENIED_MODULES)


def _harness_path_allowed(path: str) -> bool:
    """harness.api and the names it defines; nothing else of the harness package."""
    parts = path.split(".")
    return parts[:2] == ["harness", "api"] and (len(parts) == 2 or parts[2] in API_SURFACE)


def _chain(node: ast.AST) -> tuple[str, list[str]] | None:
    """`a.b.c` as ("a", ["b", "c"]); None when the chain does not start at a name."""
    attrs: list[str] = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


def _root(node: ast.AST) -> str | None:
    """The name an expression hangs from: `session` in session.train_batches(8)[0].x, type(session).tick, getattr(session, "x")."""
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript, ast.Starred)):
        if isinstance(node, ast.Call):
            see_through = isinstance(node.func, ast.Name) and node.func.id in ("type", "getattr") and node.args
            node = node.args[0] if see_through else node.func
        else:
            node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _strings(node: ast.AST) -> str:
    """All string constants under a node, concatenated (f-string pieces included)."""
    return "".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def _bound_names(target: ast.AST) -> Iterator[str]:
    for n in ast.walk(target):
        if isinstance(n, ast.Name):
            yield n.id


def _binding_sites(nodes: list[ast.AST]) -> Iterator[str]:
    """Every place a name is bound other than by an import: assignments, loops, parameters, definitions."""
    for node in nodes:
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            yield node.id
        elif isinstance(node, ast.arg):
            yield node.arg
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name


class _Checker(ast.NodeVisitor):
    """One pass over the module after the bindings are known; raises at the first violation.

    With `aliases`, names assigned from a module (`T = torch.Tensor`) stand for it; without, only imports do.
    """

    def __init__(self, tree: ast.Module, nodes: list[ast.AST], aliases: bool) -> None:
        self.tree, self.nodes, self.aliases = tree, nodes, aliases
        self.modules: dict[str, str] = {}  # name -> dotted module path it stands for (imports and aliases)
        self.patchable: set[str] = set()   # names bound to a module somewhere, and to something else elsewhere
        self.harness: set[str] = set()     # names bound to harness objects (api.start(), the session, ...)
        self.uses_harness = False
        self.finishes = False

    def run(self) -> None:
        self._collect_bindings()
        self.visit(self.tree)
        if not self.uses_harness:
            raise PatchRejected("train.py no longer imports harness.api: it must train through the harness's session")
        if not self.finishes:
            raise PatchRejected("train.py never calls session.finish(model): the harness must be handed the model")

    # -- what names stand for ---------------------------------------------------------------------------

    def _collect_bindings(self) -> None:
        """Which names stand for modules (imports, plain aliases like `T = torch.Tensor`) and for harness objects."""
        assignments: list[tuple[list[str], ast.AST]] = []
        alias_sites: Counter[str] = Counter()  # assignments of a name to a module path
        for node in self.nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.asname or alias.name.split(".")[0]
                    self.modules.setdefault(name, alias.name if alias.asname else name)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    self.modules.setdefault(alias.asname or alias.name, f"{node.module}.{alias.name}")
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr, ast.withitem)):
                value = node.context_expr if isinstance(node, ast.withitem) else node.value
                targets = node.targets if isinstance(node, ast.Assign) else [
                    node.optional_vars if isinstance(node, ast.withitem) else node.target]
                if value is not None:
                    assignments.append(([n for t in targets if t is not None for n in _bound_names(t)], value))
        changed = True
        while changed:  # aliases of aliases, sessions of sessions: to a fixed point
            changed = False
            for names, value in assignments:
                chain = _chain(value)
                if self.aliases and chain and chain[0] in self.modules:
                    path = ".".join([self.modules[chain[0]], *chain[1]])
                    for name in names:
                        if name not in self.modules:  # the first binding wins: `x = x.mT` must not loop
                            self.modules[name], changed = path, True
                root = _root(value)
                if root is not None and self._is_harness(root):
                    for name in names:
                        if name not in self.harness:
                            self.harness.add(name)
                            changed = True
        for names, value in assignments:
            chain = _chain(value)
            if chain and chain[0] in self.modules:
                alias_sites.update(names)
        # A name bound to a module in one place and to something else in another is ambiguous: its reads are
        # checked where it was bound to the module; stores through it are still refused. Aliases of the
        # harness stay resolved (their attributes are checked against the harness API either way).
        sites = Counter(_binding_sites(self.nodes))
        for name in [n for n, path in self.modules.items() if sites[n] > alias_sites[n] and not path.startswith("harness")]:
            self.patchable.add(name)
            del self.modules[name]

    def _is_harness(self, name: str) -> bool:
        return name in self.harness or self.modules.get(name, "").split(".")[0] == "harness"

    def _path(self, node: ast.AST) -> str | None:
        """The dotted module path an attribute chain refers to (`F.cross_entropy` -> torch.nn.functional.cross_entropy)."""
        chain = _chain(node)
        if chain is None or chain[0] not in self.modules:
            return None
        return ".".join([self.modules[chain[0]], *chain[1]])

    # -- imports ----------------------------------------------------------------------------------------

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_import(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            raise _fail(node, "relative imports are not allowed: train.py is a single file")
        module = node.module or ""
        for alias in node.names:
            full = f"{module}.{alias.name}"
            if alias.name == "*":
                raise _fail(node, f"`from {module} import *` is not allowed: import the names you use")
            if module == "harness":
                self._check_import(node, full)
            elif module == "harness.api":
                self._check_import(node, module)
                if not _harness_path_allowed(full):
                    raise _fail(node, f"{full} is not part of the harness API ({', '.join(sorted(API_SURFACE))})")
            else:
                self._check_import(node, module)
                if alias.name in DENIED_ATTRIBUTES or _under(full, DENIED_MODULES):
                    raise _fail(node, f"`from {module} import {alias.name}` is not allowed")

    def _check_import(self, node: ast.AST, name: str) -> None:
        if name.split(".")[0] == "harness":
            if name != "harness.api":
                raise _fail(node, f"import of {name}: train.py may use the harness only through harness.api")
            self.uses_harness = True
            return
        if not _module_allowed(name):
            allowed = ", ".join(m for m in ALLOWED_MODULES if m != "__future__")
            raise _fail(node, f"import of {name} is not allowed (allowed: {allowed})")

    # -- names, attributes, calls -----------------------------------------------------------------------

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in DENIED_NAMES:
            raise _fail(node, f"`{node.id}` is not allowed in train.py (files, the environment and dynamic code are off limits)")
        if node.id == "getattr":
            raise _fail(node, "getattr is allowed only as getattr(obj, \"literal_name\"[, default])")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check_attribute(node, node.value, node.attr)
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._check_store(node)
        self.generic_visit(node)

    def _check_attribute(self, node: ast.AST, owner: ast.AST, attr: str) -> None:
        if attr in DENIED_ATTRIBUTES:
            raise _fail(node, f"`.{attr}` is not allowed in train.py (files, processes, the environment and "
                              "the interpreter's internals are off limits)")
        owner_path = self._path(owner)
        if owner_path is not None:
            path = f"{owner_path}.{attr}"
            if path.split(".")[0] == "harness" and not _harness_path_allowed(path):
                raise _fail(node, f"{path} is not part of the harness API (harness.api: {', '.join(sorted(API_SURFACE))})")
            if _under(path, DENIED_MODULES):
                raise _fail(node, f"{path} is not allowed (files, processes or the network)")
        root = _root(owner)
        if root is not None and self._is_harness(root) and (attr.startswith("_") or attr in HARNESS_HIDDEN):
            raise _fail(node, f"`.{attr}` of a harness object is the harness's own state: use the session's public API")

    def _check_store(self, node: ast.Attribute) -> None:
        root = _root(node.value)
        if root in SELF_NAMES or root is None:
            return
        if self._is_harness(root):
            raise _fail(node, f"train.py may not change the harness's objects ({ast.unparse(node)})")
        path = self._path(node)
        if (root in self.modules or root in self.patchable) and (path is None or not path.startswith(SETTABLE_PREFIXES)):
            raise _fail(node, f"train.py may not patch modules ({path or ast.unparse(node)} is shared with the "
                              "harness); define your own function instead")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "getattr":
            name = node.args[1] if len(node.args) >= 2 else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)) or len(node.args) > 3:
                raise _fail(node, "getattr is allowed only as getattr(obj, \"literal_name\"[, default])")
            self._check_attribute(node, node.args[0], name.value)
            for arg in node.args:
                self.visit(arg)
            return
        if isinstance(func, ast.Name) and func.id == "print" and METRIC.search(_strings(node)):
            raise _fail(node, "train.py may not print metric lines (val_bpb is computed and reported by the harness)")
        if isinstance(func, ast.Attribute) and func.attr == "finish":
            self.finishes = True
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and HARNESS_FILES.search(node.value):
            raise _fail(node, f"the string {node.value[:60]!r} refers to the harness's files or data")
        if isinstance(node.value, str) and FORMAT_ATTRIBUTE.search(node.value):
            raise _fail(node, f"the format string {node.value[:60]!r} reaches into attributes")
