"""The service's errors: raised where a failure happens, rendered once, as OpenAI does.

Each class has one row in ERRORS, its HTTP status and OpenAI error type; the apps' exception
handler (service.web) turns any of them into an ErrorResponse whose code is that status, and a
stream that already started sends the same body as an SSE event. Messages are public: a
class whose failure is internal (InternalError, EngineFailure) has a fixed message, and its
cause (`raise EngineFailure() from error`) goes to the log only.
"""

from __future__ import annotations

from service.protocol import ErrorInfo, ErrorResponse


class ServiceError(Exception):
    """A failure with a public message; its class decides the status (see ERRORS)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, if one is


class InvalidRequest(ServiceError):
    """The request cannot be served as sent: a bad value, an unsupported option."""


class Unauthorized(ServiceError):
    """A bad or missing API key."""


class NotFound(ServiceError):
    """An unknown route or model."""


class MethodNotAllowed(ServiceError):
    """A known route called with the wrong method."""


class PayloadTooLarge(ServiceError):
    """A request body above the configured size (refused before it is read)."""


class Overloaded(ServiceError):
    """The worker holds as much work as it admits; try again after `retry_after` seconds."""

    def __init__(self, message: str, param: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, param)
        self.retry_after = retry_after  # seconds, sent as the Retry-After header


class Unavailable(ServiceError):
    """Not now, maybe later: shutting down, model not loaded yet, paused, no healthy worker."""


class UpstreamError(ServiceError):
    """The gateway could not get an answer from a worker (refused, reset, failed)."""


class UpstreamTimeout(ServiceError):
    """A worker did not answer the gateway in time."""


class InternalError(ServiceError):
    """A bug: an exception nothing expected. The public message says nothing of it."""

    def __init__(self) -> None:
        super().__init__("internal server error")


class EngineFailure(ServiceError):
    """The engine failed while generating (a failed forward, out of device memory)."""

    def __init__(self) -> None:
        super().__init__("generation failed")


ERRORS: dict[type[ServiceError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    Unauthorized: (401, "authentication_error"),
    NotFound: (404, "not_found_error"),
    MethodNotAllowed: (405, "invalid_request_error"),
    PayloadTooLarge: (413, "invalid_request_error"),
    Overloaded: (429, "rate_limit_error"),
    InternalError: (500, "internal_error"),
    EngineFailure: (500, "internal_error"),
    UpstreamError: (502, "upstream_error"),
    Unavailable: (503, "service_unavailable"),
    UpstreamTimeout: (504, "upstream_timeout"),
}

_BY_STATUS = {status: kind for kind, (status, _) in reversed(ERRORS.items())}


def status_of(error: ServiceError) -> int:
    return _row(error)[0]


def error_response(error: ServiceError) -> ErrorResponse:
    status, kind = _row(error)
    return ErrorResponse(
        error=ErrorInfo(message=error.message, type=kind, param=error.param, code=status)
    )


def error_for_status(status: int) -> type[ServiceError]:
    """The class whose status is `status` (the first row, for 500), for statuses that arrive
    as numbers: Starlette's routing errors and workers' replies the gateway passes on. A status
    with no row is a client error (< 500) or an upstream failure."""
    found = _BY_STATUS.get(status)
    if found is not None:
        return found
    return InvalidRequest if status < 500 else UpstreamError


def _row(error: ServiceError) -> tuple[int, str]:
    for kind in type(error).__mro__:
        row = ERRORS.get(kind)
        if row is not None:
            return row
    raise TypeError(f"{type(error).__name__} has no row in ERRORS")
