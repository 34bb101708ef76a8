"""User-facing errors: one clear line, no traceback, from the CLI."""


class Lift3DError(Exception):
    """A problem with the user's input or setup. The message is the whole explanation."""


class InputError(Lift3DError):
    """A bad input file (missing, not an image, no foreground, …)."""


class ModelNotFoundError(Lift3DError):
    """A pretrained model that is neither in the cache nor a local folder."""
