class UsageError(ValueError):
    """Bad input (a path, a setting, a data file): the command line prints its message alone, with no traceback."""
