"""The one user-facing error type, at the bottom layer so every package can raise it."""


class BenchError(Exception):
    """A user-facing error: its message is one line that says what to do. Printed without a traceback."""
