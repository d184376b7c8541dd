"""The harness seal: every file a trial loads, as it was when the run started.

A run takes the seal when it starts, whatever the method (hybrid/loop.py, `work`), and checks it before every
trial: a change stops the run with one line naming the file, since no result after it could be compared with
the ones before. It covers:

- every file under harness/, by SHA-256: the sources, their __pycache__/*.pyc, the bundled corpus, and
  anything else found there (a sourceless .pyc or a .so next to the sources would be loaded too);
- the profile's prepared data (when it is prepared): the pointer data_dir()/prepared-<profile>.json, the
  tokenizer pickle, and every file of tokens-<vocab>/: meta.json and *.idx.npy by SHA-256, the token files
  *.bin (up to many GB: hashing them before every trial would cost more than a trial) by size, mtime_ns and
  the SHA-256 of their first and last MiB. An edit inside a .bin that keeps its size and restores its mtime
  goes unseen; the sandbox is what keeps agent code away from those files, the seal catches accidents.

Bytecode: trusted processes (the runner, the scorer, the memory probe) write harness/__pycache__/*.pyc when
they first import a module after the seal was taken, or rewrite a stale one. So a .pyc in a __pycache__ folder
that is new, changed or gone since the seal is not a change when it is exactly what this interpreter compiles
from its .py (its magic number, and a code object equal to compile() of the source at the optimization level
its name says); it is then taken into the seal, and a later change to it counts. (The temporary file the
interpreter writes a cache to before renaming it, <name>.pyc.<digits>, is skipped.) The .py itself is sealed,
so a changed source is reported on its own. A .pyc for another interpreter, without its .py, or with other
code is a change. (Reading a .pyc's code uses marshal, which trusts its input; the sandbox keeps agent code
from writing there, so a forged one can come only from outside the run.)

Imports nothing from hybrid (harness never does).
"""
from __future__ import annotations

import hashlib
import importlib.util
import marshal
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import UserError

if TYPE_CHECKING:
    from harness.profiles import Profile

HARNESS_DIR = Path(__file__).resolve().parent
EDGE_BYTES = 2**20  # of a token .bin file: its first and last MiB are hashed, the rest by size and mtime
GONE = "gone"
# importlib writes a cache as <name>.pyc.<id> and renames it to <name>.pyc: never loaded, and gone a moment later
IMPORTLIB_TEMPORARY = re.compile(r"\.pyc\.\d+$")


class HarnessChanged(UserError):
    """A file the trials load differs from when the run started."""


@dataclass
class Seal:
    """Digests of the files of `harness` and of `data` (files, or folders read whole) at the time it was taken."""
    harness: Path
    data: tuple[Path, ...] = ()
    digests: dict[str, str] = field(default_factory=dict)

    def _files(self) -> dict[str, Path]:
        """Display name -> path: harness/... for the harness, the full path for data."""
        files = {f"{self.harness.name}/{p.relative_to(self.harness).as_posix()}": p
                 for p in self.harness.rglob("*") if p.is_file() and not _being_written(p)}
        for root in self.data:
            for p in (root.rglob("*") if root.is_dir() else [root]):
                if p.is_file():
                    files[str(p)] = p
        return files

    def _now(self) -> dict[str, str]:
        return {name: _digest(path) for name, path in self._files().items()}

    def check(self) -> list[str]:
        """The files changed, added or removed since the seal was taken (sorted; [] when none)."""
        now = self._now()
        changed = []
        for name in sorted(self.digests.keys() | now.keys()):
            if self.digests.get(name, GONE) == now.get(name, GONE):
                continue
            in_harness = name.startswith(f"{self.harness.name}/")
            if in_harness and _compiled_from_its_source(self.harness / name.split("/", 1)[1]):
                if name in now:  # the interpreter's own cache: sealed from now on
                    self.digests[name] = now[name]
                else:
                    self.digests.pop(name, None)
                continue
            changed.append(name)
        return changed

    def verify(self) -> None:
        """HarnessChanged (a one-line UserError) naming what changed; nothing when the files are as sealed."""
        changed = self.check()
        if changed:
            shown = ", ".join(_printable(name) for name in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise HarnessChanged(f"the harness changed since the run started: {shown}{more}; "
                                 "restore it, or start a new run")


def seal(profile: Profile | None = None, harness: Path | None = None) -> Seal:
    """The seal of the harness package and, with a profile whose data is prepared, of that data."""
    root = Path(harness) if harness is not None else HARNESS_DIR
    s = Seal(root, _prepared_files(profile) if profile is not None else ())
    s.digests = s._now()
    return s


def _prepared_files(profile: Profile) -> tuple[Path, ...]:
    from harness.data import prepared
    from harness.profiles import data_dir

    try:
        p = prepared(profile)
    except UserError:  # not prepared: trials of this profile cannot run, there is nothing to seal
        return ()
    return data_dir() / f"prepared-{profile.name}.json", p.tokenizer, p.tokens


def _digest(path: Path) -> str:
    try:
        if path.suffix == ".bin":
            stat = path.stat()
            h = hashlib.sha256()
            with path.open("rb") as f:
                h.update(f.read(EDGE_BYTES))
                f.seek(max(0, stat.st_size - EDGE_BYTES))
                h.update(f.read(EDGE_BYTES))
            return f"{stat.st_size}:{stat.st_mtime_ns}:{h.hexdigest()}"
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:  # vanished meanwhile, or unreadable: as good as changed
        return "unreadable"


def _being_written(path: Path) -> bool:
    return path.parent.name == "__pycache__" and IMPORTLIB_TEMPORARY.search(path.name) is not None


def _compiled_from_its_source(pyc: Path) -> bool:
    """Whether `pyc`, a bytecode cache in a __pycache__ folder, is what this interpreter compiles from its .py,
    which exists (a cache that is gone counts: the interpreter compiles the sealed source again)."""
    if pyc.suffix != ".pyc" or pyc.parent.name != "__pycache__":
        return False
    try:
        source = Path(importlib.util.source_from_cache(str(pyc)))
    except ValueError:  # another interpreter's cache tag, or not a cache name
        return False
    if not source.is_file():
        return False
    if not pyc.exists():
        return True  # a cache removed: the interpreter compiles the sealed source again
    try:
        data = pyc.read_bytes()
        if data[:4] != importlib.util.MAGIC_NUMBER:
            return False
        match = re.search(r"\.opt-(\d)\.pyc$", pyc.name)
        expected = compile(source.read_bytes(), str(source), "exec", dont_inherit=True,
                           optimize=int(match.group(1)) if match else 0)
        return marshal.loads(data[16:]) == expected
    except (OSError, ValueError, EOFError, TypeError, SyntaxError):
        return False


def _printable(name: str) -> str:
    return name.encode("unicode_escape").decode("ascii")
