"""The serving errors: each carries the HTTP status the server answers with and a message naming
what was wrong and what would be right.

The engine raises them at once from :meth:`~peftlab.serve.engine.Engine.submit` and
:meth:`~peftlab.serve.engine.Engine.load_adapter`; the HTTP server maps ``http_status`` to the
response code and ``str(error)`` to the JSON error message.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base of every serving error; ``http_status`` is the response code the server answers with."""

    http_status: int = 500


class UnknownAdapterError(ServeError):
    """A request or an unload names an adapter that is not registered."""

    http_status = 404


class QueueFullError(ServeError):
    """The request queue holds ``max_queue`` requests; try again after ``retry_after`` seconds."""

    http_status = 429

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = float(retry_after)


class PromptTooLongError(ServeError):
    """The prompt (plus at least one new token) does not fit in the model's context."""

    http_status = 400


class InvalidAdapterError(ServeError):
    """An adapter directory cannot be loaded: not safetensors, outside the allowed roots, too big,
    or a bad adapter_config.json."""

    http_status = 400


class InvalidRequestError(ServeError):
    """A request field has a value the engine cannot serve; ``field`` names it."""

    http_status = 400

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field
