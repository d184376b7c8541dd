"""The error every command turns into a one-line message and exit status 2 (defined by the harness, which
imports nothing from hybrid)."""
from harness.errors import UserError

EXIT_USER_ERROR = 2     # a UserError, said in one line
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "UserError"]
