"""peft-bench runner: one run = build -> train -> evaluate -> measure -> record."""


class BenchError(Exception):
    """A user-facing error: its message is one line that says what to do. Printed without a traceback."""
