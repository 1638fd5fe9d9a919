"""Exceptions whose message is meant for the user: one line saying what was wrong and what to do."""


class EngineError(Exception):
    """A user-facing error; front ends show str(err) without a traceback."""


class ImageError(EngineError):
    """An image could not be read or is not usable."""


class DatasetError(EngineError):
    """A dataset folder is missing, empty or unusable."""


class RunNotFound(EngineError):
    """The requested run, epoch or checkpoint does not exist."""


class GateFailed(EngineError):
    """A backend named explicitly failed its accuracy gate on this machine, so it is not served."""
