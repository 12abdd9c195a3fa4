"""The one exception users see.

Every mistake a user can make (a bad path, a wrong key in a recipe, a model
that cannot be found) raises :class:`QLoRAGuideError` with a one-line message
that names the problem. The CLI prints that line and exits with status 2
instead of showing a traceback.
"""


class QLoRAGuideError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty: a one-line reason."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
