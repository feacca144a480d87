"""The error hierarchy shared by the engine and the services.

The services map each class to one gRPC status in one place (services/common/errors.py).
"""


class TaxiwayError(Exception):
    """Base of every error taxiway raises on purpose."""


class InvalidRequest(TaxiwayError, ValueError):
    """The caller sent something that can never succeed (bad parameter, prompt too long...)."""


class Overloaded(TaxiwayError):
    """A bounded queue is full; the caller may retry later."""


class NotReady(TaxiwayError):
    """The component is starting, draining or lost a dependency."""


class DeadlineExceeded(TaxiwayError):
    """The request's deadline passed before it finished."""


class ModelLoadError(TaxiwayError):
    """A model folder or checkpoint is missing, malformed or does not match its config."""


class TensorParallelError(TaxiwayError):
    """A rank of the engine's tensor-parallel group died or a collective failed: the engine is lost
    (its executor reports itself so; the scheduler re-queues the work)."""
