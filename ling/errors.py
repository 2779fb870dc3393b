"""The one exception type that reaches the user.

Code anywhere in ling raises `LingError` for a problem the user can fix (bad path, bad
record, bad config key); the CLI prints its message as one line and exits non-zero,
instead of a traceback.
"""


class LingError(Exception):
    """A user-facing error: the message says what was wrong, where, and what to do."""


def read_json(path) -> object:
    """A JSON file's content; a missing file or bad JSON is a LingError naming path:line."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LingError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise LingError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise LingError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except ValueError as e:  # e.g. an integer longer than Python converts
        raise LingError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise LingError(f"{path}: invalid JSON (nested too deeply)") from None
    except OSError as e:  # a directory, no permission
        raise LingError(f"{path}: cannot be read ({e.strerror})") from None
