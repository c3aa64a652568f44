"""The one exception type users see: a message that names the problem and the fix."""


class PeftkitError(Exception):
    """A user-facing error. The message says what is wrong and what to do about it."""
