"""The one error base for mistakes a user can fix (a path, a file, a field, a flag).

The CLI prints these as one line and exits 2; every other exception is a bug.
"""


class UserError(ValueError):
    """An error caused by the user's input; the message names the file, field or flag."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP turned into an interrupt by the CLI, so every Ctrl-C clean-up runs for them too.

    Code that treats Ctrl-C as "cancel this and go on" (the chat prompt) re-raises a Stopped.
    """

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
