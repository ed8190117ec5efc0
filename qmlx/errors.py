"""The one error base for mistakes a user can fix (a path, a file, a field, a flag).

The CLI prints these as one line and exits 2; every other exception is a bug.
"""


class UserError(ValueError):
    """An error caused by the user's input; the message names the file, field or flag."""
