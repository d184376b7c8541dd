"""Knobs of a train.py: its top-level ALL_CAPS literal assignments, read and rewritten through the AST."""
from __future__ import annotations

import ast
import functools
import re
import threading
from dataclasses import dataclass
from typing import Any

KNOB_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
Literal = int | float | str | bool
_AST_LOCK = threading.Lock()


class KnobError(ValueError):
    """A knob that does not exist, or a value that cannot be written into it."""


@dataclass(frozen=True)
class FoundKnob:
    name: str
    value: Literal
    type: str  # int | float | str | bool
    line: int


def _type_name(value: Any) -> str | None:
    for cls in (bool, int, float, str):  # bool before int: True is an int too
        if isinstance(value, cls):
            return cls.__name__
    return None


def _assignments(tree: ast.Module) -> dict[str, ast.AST]:
    """Top-level `NAME = <literal>` (or `NAME: T = <literal>`) value nodes by name; the last one wins."""
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value = node.target.id, node.value
        else:
            continue
        if KNOB_NAME.match(name):
            found[name] = value
    return found


_ARITHMETIC = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Pow: lambda a, b: a**b}


def _constant_value(node: ast.AST) -> Any:
    """The value of a literal or of plain arithmetic on numeric literals (`2**19`, `-1e-3`, `4 * 128`)."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _constant_value(node.left), _constant_value(node.right)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            raise ValueError("arithmetic on non-numbers")
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _ARITHMETIC[type(node.op)](left, right)
    return ast.literal_eval(node)


def parse_python(code: str) -> ast.Module:
    """ast.parse, one thread at a time: CPython 3.11 counts AST depth per interpreter, so two threads
    parsing at once can fail with "AST constructor recursion depth mismatch" (CPython gh-106905)."""
    with _AST_LOCK:
        return ast.parse(code)


@functools.lru_cache(maxsize=8)
def _parse(code: str) -> ast.Module:
    """The tree of `code`, shared by the readers below (none changes it): every trial of a generation reads and
    writes the knobs of the same train.py, four times per trial (3 ms a parse on a quiet core, more under load)."""
    try:
        return parse_python(code)
    except SyntaxError as e:
        raise KnobError(f"train.py does not parse: line {e.lineno}: {e.msg}") from None


def find_knobs(code: str) -> dict[str, FoundKnob]:
    """Every top-level ALL_CAPS assignment whose value is an int, float, str or bool constant."""
    knobs: dict[str, FoundKnob] = {}
    for name, node in _assignments(_parse(code)).items():
        try:
            value = _constant_value(node)
        except (ValueError, TypeError, ZeroDivisionError, SyntaxError):
            continue
        kind = _type_name(value)
        if kind is not None:
            knobs[name] = FoundKnob(name, value, kind, node.lineno)
    return knobs


def find_constants(code: str) -> dict[str, str]:
    """The other top-level ALL_CAPS assignments (tuples, expressions), as source text: reported, not tuned."""
    knobs = find_knobs(code)
    return {name: ast.unparse(node) for name, node in _assignments(_parse(code)).items() if name not in knobs}


def _coerce(name: str, found: FoundKnob, value: Any) -> Literal:
    kind = _type_name(value)
    if found.type == "float" and kind == "int":
        return float(value)
    if found.type == "int" and kind == "float" and float(value).is_integer():
        return int(value)
    if kind != found.type:
        raise KnobError(f"{name} is {found.type} in train.py, got {type(value).__name__} {value!r}")
    return value


def inject_knobs(code: str, values: dict[str, Any]) -> str:
    """train.py with the given knob values written in place of the literals; comments and layout kept."""
    knobs = find_knobs(code)
    unknown = sorted(set(values) - set(knobs))
    if unknown:
        raise KnobError(f"unknown knob(s) {', '.join(unknown)}: train.py defines {', '.join(sorted(knobs))}")
    nodes = _assignments(_parse(code))
    lines = code.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode("utf-8")))
    data = code.encode("utf-8")
    edits = []
    for name, value in values.items():
        node = nodes[name]
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        edits.append((start, end, repr(_coerce(name, knobs[name], value)).encode("utf-8")))
    for start, end, text in sorted(edits, reverse=True):
        data = data[:start] + text + data[end:]
    return data.decode("utf-8")
