"""Reading a code agent's answer: a whole train.py in a fenced python block, or a unified diff against it.

Models answer both ways, with prose around the code. Nothing is applied half-way: read_edit returns the
complete new code or raises PatchRejected with a one-line reason the agent sees next time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from hybrid.llm.guard import PatchRejected

TARGET = "train.py"
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<marker>`{3,}|~{3,})(?P<info>[^`\n]*)$")
HUNK = re.compile(r"^@@(?: -(\d+)(?:,\d+)? \+\d+(?:,\d+)? )?.*@@|^@@\s*$", re.MULTILINE)  # line numbers optional
FILE_NAME = re.compile(r"[\w./-]+\.(?:py|yaml|yml|md|json|toml|txt)\b")
PLACEHOLDER = re.compile(r"^\s*(?:#\s*)?(?:\.\.\.|…)\s*$|^\s*#\s*(?:\.\.\.|…)|#.*\b(?:rest of (?:the )?(?:file|code|script|module|"
                         r"function|class|training loop)|(?:remains?|stays?|is|are|kept) unchanged|unchanged (?:code|below|above|"
                         r"from)|same as (?:before|above|the original|original)|existing code|code omitted|omitted for brevity)\b",
                         re.IGNORECASE)
LABEL = re.compile(r"^\s*(?:\*\*)?(?:change|description|summary|idea)(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*(.+)$", re.IGNORECASE)
MIN_FILE_FRACTION = 0.3  # a "whole file" shorter than this share of train.py is a fragment
DESCRIPTION_CHARS = 160


@dataclass(frozen=True)
class Edit:
    code: str          # the whole new train.py
    description: str   # one line: what the agent says it changed
    form: str          # "file" (a replacement) or "diff" (a unified diff applied to the current file)


@dataclass(frozen=True)
class Block:
    """A fenced block of an answer."""
    info: str          # the fence's info string: "python", "diff", "python title=train.py", ...
    text: str
    start: int         # line index of the opening fence in the answer
    closed: bool       # False for a block cut off by the end of the answer

    @property
    def language(self) -> str:
        return self.info.split()[0].split(":")[0].lower() if self.info else ""


def read_edit(answer: str, current: str) -> Edit:
    """The new train.py the answer describes; PatchRejected when it cannot be read or applies to another file."""
    blocks = fenced_blocks(answer)
    lines = answer.splitlines()
    description = describe(answer)
    diffs = [b for b in blocks if _is_diff(b)]
    if diffs:
        return Edit(_apply_diff_block(diffs[-1], current), description, "diff")
    code = [b for b in blocks if _is_python(b)]
    if code:
        block = max(code, key=lambda b: len(b.text))
        return Edit(_whole_file(block, lines, current), description, "file")
    if answer.lstrip().startswith(("--- ", "diff --git", "@@")):  # a bare diff, no fence and no prose
        return Edit(apply_diff(answer, current), description, "diff")
    if any(not b.closed for b in blocks):
        raise PatchRejected("the answer was cut off inside a code block: nothing was applied")
    raise PatchRejected("the answer has no python block and no unified diff: answer the whole train.py in one "
                        "```python block, or a unified diff in one ```diff block")


def fenced_blocks(answer: str) -> list[Block]:
    """Fenced blocks in order; an unclosed last block (a cut-off answer) is kept with closed=False."""
    blocks: list[Block] = []
    lines = answer.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        marker, info = m.group("marker"), m.group("info").strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(marker[0])}{{{len(marker)},}}\s*$", lines[j]):
            body.append(lines[j])
            j += 1
        blocks.append(Block(info, "\n".join(body) + "\n", i, j < len(lines)))
        i = j + 1
    return blocks


def _is_diff(block: Block) -> bool:
    if block.language in ("diff", "patch", "udiff"):
        return True
    head = block.text.lstrip()
    return head.startswith(("--- ", "diff --git", "@@ ")) and bool(HUNK.search(block.text) or "\n@@" in block.text)


def _is_python(block: Block) -> bool:
    return block.language in ("python", "py", "python3", "") and not _is_diff(block)


def _named_file(block: Block, lines: list[str]) -> str | None:
    """The file a code block says it is: in its fence info, a first-line comment, or the prose line just before."""
    candidates = [block.info, block.text.split("\n", 1)[0] if block.text.lstrip().startswith("#") else ""]
    before = next((line for line in reversed(lines[:block.start]) if line.strip()), "")
    if before.strip(" *`").endswith(":"):  # "Here is the updated harness/evaluate.py:"
        candidates.append(before)
    for text in candidates:
        names = FILE_NAME.findall(text)
        if names:
            return names[-1] if all(n.rsplit("/", 1)[-1] != TARGET for n in names) else TARGET
    return None


def _whole_file(block: Block, lines: list[str], current: str) -> str:
    if not block.closed:
        raise PatchRejected("the answer was cut off inside the python block: nothing was applied")
    named = _named_file(block, lines)
    if named is not None and named.rsplit("/", 1)[-1] != TARGET:
        raise PatchRejected(f"the answer edits {named}: only train.py may change (the harness is locked)")
    for number, line in enumerate(block.text.splitlines(), 1):
        if PLACEHOLDER.search(line) and not line.strip().startswith(('"', "'")):
            raise PatchRejected(f"the python block is incomplete: line {number} is a placeholder ({line.strip()[:60]!r}); "
                                "answer the whole file or a unified diff")
    have, want = block.text.count("\n"), current.count("\n")
    if have < MIN_FILE_FRACTION * want:
        raise PatchRejected(f"the python block has {have} lines, train.py has {want}: answer the whole file "
                            "or a unified diff, not a fragment")
    return block.text


def _apply_diff_block(block: Block, current: str) -> str:
    if not block.closed:
        raise PatchRejected("the answer was cut off inside the diff: nothing was applied")
    return apply_diff(block.text, current)


def describe(answer: str) -> str:
    """What the answer says it changes: a labelled line (`Change: ...`), else its first line of prose; markdown stripped."""
    blocks = fenced_blocks(answer)
    inside = {i for b in blocks for i in range(b.start, b.start + b.text.count("\n") + 2)}
    prose = [line for i, line in enumerate(answer.splitlines()) if i not in inside and line.strip()]
    labelled = next((m.group(1) for line in prose if (m := LABEL.match(line))), None)
    text = labelled or (prose[0] if prose else "an edit of train.py")
    text = re.sub(r"\*\*|`|^\s*[#>]+\s*", "", text).strip()
    return text[:DESCRIPTION_CHARS]


# -- unified diffs --------------------------------------------------------------------------------------------

@dataclass
class _Hunk:
    old_start: int
    old: list[str]   # context and removed lines
    new: list[str]   # context and added lines


def _check_paths(old_header: str, new_header: str) -> None:
    """A file header pair (--- a/X, +++ b/X) must name train.py on both sides."""
    for header in (old_header, new_header):
        path = header[4:].strip().split("\t")[0]
        path = path[2:] if path.startswith(("a/", "b/")) else path
        if path == "/dev/null":
            raise PatchRejected("the diff creates or deletes a file: only train.py may change, as an edit of the current one")
        if path.rsplit("/", 1)[-1] != TARGET:
            raise PatchRejected(f"the diff edits {path}: only train.py may change (the harness is locked)")


def _parse_diff(text: str) -> list[_Hunk]:
    """The hunks of a diff of train.py; header counts are not trusted (models get them wrong)."""
    hunks: list[_Hunk] = []
    hunk: _Hunk | None = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            _check_paths(line, lines[i + 1])
            hunk = None
            continue
        if hunk is None and line.startswith(("+++ ", "diff --git", "index ")):
            continue
        m = HUNK.match(line)
        if m:
            hunk = _Hunk(int(m.group(1) or 1), [], [])
            hunks.append(hunk)
        elif hunk is None:
            continue
        elif line.startswith("-"):
            hunk.old.append(line[1:])
        elif line.startswith("+"):
            hunk.new.append(line[1:])
        elif line.startswith(" ") or line == "":
            hunk.old.append(line[1:])
            hunk.new.append(line[1:])
        elif line.startswith("\\"):
            continue
        else:
            raise PatchRejected(f"the diff has a line that is neither context, + nor -: {line[:60]!r}")
    if not hunks:
        raise PatchRejected("the diff has no hunks (@@ -a,b +c,d @@)")
    return hunks


def _find(lines: list[str], wanted: list[str], start: int, hint: int) -> int | None:
    """Where `wanted` occurs in lines[start:], nearest to `hint`; exact first, then ignoring trailing spaces."""
    for key in (lambda s: s, lambda s: s.rstrip()):
        target = [key(s) for s in wanted]
        found = [i for i in range(start, len(lines) - len(wanted) + 1) if [key(s) for s in lines[i:i + len(wanted)]] == target]
        if found:
            return min(found, key=lambda i: abs(i - hint))
    return None


def apply_diff(diff: str, current: str) -> str:
    """`current` with every hunk applied, or PatchRejected naming the first hunk that does not match."""
    lines = current.splitlines()
    out: list[str] = []
    position = 0
    for number, hunk in enumerate(_parse_diff(diff), 1):
        if not hunk.old:  # pure insertion at the stated line
            at = max(position, min(len(lines), hunk.old_start))
        else:
            at = _find(lines, hunk.old, position, hunk.old_start - 1)
            if at is None:
                first = next((s.strip() for s in hunk.old if s.strip()), "")
                raise PatchRejected(f"the diff does not apply: hunk {number} (@@ -{hunk.old_start}) does not match "
                                    f"train.py near {first[:50]!r}; nothing was applied")
        out.extend(lines[position:at])
        out.extend(hunk.new)
        position = at + len(hunk.old)
    out.extend(lines[position:])
    return "\n".join(out) + "\n"
