"""The one error type the service's parts raise for a request they refuse: the API answers it as HTTP `status`
with its message. It crosses Ray calls intact (Ray's task errors are instances of the cause's class)."""

from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __reduce__(self):
        return type(self), (self.message, self.status)
