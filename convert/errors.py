"""The converter's user-facing error: one line naming the file, tensor, field or flag."""

from qmlx.errors import UserError


class ConvertError(UserError):
    """A source, destination or setting the converter refuses; the message says which and why."""
