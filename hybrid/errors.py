"""The error every command turns into a one-line message and exit status 2 (defined by the harness, which
imports nothing from hybrid)."""
from harness.errors import UserError

__all__ = ["UserError"]
