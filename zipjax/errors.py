"""The one exception type zipjax raises for bad input.

Anything a user can get wrong (a path, a checkpoint of another architecture, a shape, a prompt that does not fit)
raises `ZipjaxError` with a message that names the problem. The CLI prints that message and exits non-zero with no
traceback; every other exception is a bug in zipjax and keeps its traceback.
"""


class ZipjaxError(Exception):
    """Bad input: the message says what is wrong and, where it can, how to fix it."""
