"""Exceptions that name the bad input, so users never have to decode an AttributeError."""


class PruningConfigError(ValueError):
    """A pruning configuration that cannot be honoured: a bad value, an unknown tensor, an unprunable path."""


class UnsupportedPatternError(PruningConfigError):
    """A configured tensor's channels reach an op that fusion cannot narrow exactly."""


class OutputReachedError(PruningConfigError):
    """An explicit config names a tensor whose channels reach the model's output, while the output is protected."""


class PrunerStateError(RuntimeError):
    """A pruner method was called out of order, e.g. ``step()`` or ``prune()`` before ``prepare()``."""
