"""The one exception type for mistakes a user can fix; the CLI prints these without a traceback."""


class MiniResNetError(Exception):
    """Bad input, a missing file, a broken checkpoint: the message says what and what to do."""
