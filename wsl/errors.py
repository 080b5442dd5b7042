"""The one exception type whose message the CLI prints as a single line (no traceback)."""


class WslError(Exception):
    """A problem with the user's input or config: the message names it and how to fix it."""
