"""Text that comes back from agent code (errors, logs) cut to a bounded excerpt and cleaned of the trusted side's
secrets before it is stored or put into a prompt."""
from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from harness.sandbox import ENV_ALLOWED

MIN_SECRET = 6          # shorter values (1, true, en_US) are not worth hiding and would garble text
REDACTED = "[redacted]"
_registered: set[str] = set()


def register(*values: str | None) -> None:
    """Values of the trusted side that are not in its environment (a storage URL given as a flag, a key)."""
    for value in values:
        if value:
            _registered.update(_variants(value))


def _variants(value: str) -> set[str]:
    """A value and, for a URL, its password and user:password parts, which text may carry on their own."""
    out = {value}
    try:
        parts = urlsplit(value)
        if parts.password:
            out |= {parts.password, f"{parts.username}:{parts.password}"}
    except ValueError:
        pass
    return out


def _names_paths(value: str) -> bool:
    """Whether a value is a path or a list of paths that exist (PATH, HOME, PWD): places, not secrets."""
    parts = [part for part in value.split(os.pathsep) if part]
    return bool(parts) and all(part.startswith("/") and os.path.exists(part) for part in parts)


def secrets() -> list[str]:
    """Every value the trusted side holds that a trial must never show (but its paths), longest first."""
    values = set(_registered)
    for name, value in os.environ.items():
        if name not in ENV_ALLOWED and not _names_paths(value):
            values |= _variants(value)
    return sorted((v for v in values if len(v) >= MIN_SECRET), key=len, reverse=True)


def scrub(text: str, limit: int | None = None) -> str:
    """`text` with every trusted value replaced by [redacted], cut to its last `limit` characters."""
    values = secrets()
    if values:
        text = re.sub("|".join(map(re.escape, values)), REDACTED, text)
    if limit is not None and len(text) > limit:
        text = "[...] " + text[-limit:]
    return text
