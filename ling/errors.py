"""The one exception type that reaches the user.

Code anywhere in ling raises `LingError` for a problem the user can fix (bad path, bad
record, bad config key); the CLI prints its message as one line and exits non-zero,
instead of a traceback.
"""


class LingError(Exception):
    """A user-facing error: the message says what was wrong, where, and what to do."""
