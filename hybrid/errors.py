"""The error every command turns into a one-line message and exit status 2."""


class UserError(ValueError):
    """Bad input from the user: a flag, a file, a study that does not match. Nothing was changed."""
