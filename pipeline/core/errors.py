"""The one exception type a user sees: a message naming the file, key or column at fault."""


class RebmError(Exception):
    """A problem with the user's input or configuration, explained in one message.

    The CLI prints it without a traceback and exits with status 2; anything else that
    escapes is a bug and keeps its traceback.
    """
