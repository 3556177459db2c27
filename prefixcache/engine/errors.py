"""Errors an engine reports to whoever serves it."""


class EngineDeadError(RuntimeError):
    """The engine's loop stopped (an error, or a shutdown); no further requests are served."""
