"""Errors of the harness that a command reports as one line (exit status 2); harness imports nothing from hybrid."""


class UserError(ValueError):
    """Bad input from the user: a flag, a file, data that is not prepared. Nothing was changed."""
