class UsageError(ValueError):
    """Bad input (a path, a setting, a data file): the command line prints its message alone, with no traceback."""


def one_line(error, limit=200):
    """An exception's message on one line, cut to `limit` characters, for a UsageError that quotes it."""
    return " ".join(str(error).split())[:limit]
