"""Where the project's editable files are: the working directory first, then the project checkout."""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_file(name: str) -> Path:
    """./NAME if it exists (the user's copy), else the one shipped at the project root."""
    local = Path.cwd() / name
    return local if local.exists() else PROJECT_ROOT / name
