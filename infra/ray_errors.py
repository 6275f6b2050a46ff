"""Finding our own error behind Ray's wrappers.

A task's exception reaches the caller as RayTaskError(UserCodeException) whose `.cause` may hold the original;
a Ray Train worker's reaches the driver inside WorkerGroupError, which keeps only each worker's formatted
traceback (`.worker_failures`). Both kinds of remains are searched here, in one place.
"""

from __future__ import annotations

from collections.abc import Iterator


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and every exception behind it (`__cause__`, `__context__`, Ray's `.cause` and a WorkerGroupError's
    `.worker_failures`), each once."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        e = pending.pop()
        if not isinstance(e, BaseException) or id(e) in seen:  # None, or a `.cause` that is not an exception
            continue
        seen.add(id(e))
        yield e
        pending += [getattr(e, "cause", None), e.__cause__, e.__context__]
        failures = getattr(e, "worker_failures", None)
        pending += list(failures.values()) if isinstance(failures, dict) else []


def remote_error_message(exc: BaseException, cls: type) -> str | None:
    """The message of a `cls` error raised in a Ray task or Ray Train worker, recovered from the formatted
    traceback Ray kept: the last '<module>.<Class>: <message>' line (a WorkerGroupError's own text is a
    truncated snippet, so its workers' texts are read first)."""
    marker = f"{cls.__name__}: "
    texts = [str(e) for e in exception_chain(exc)]
    for text in texts[::-1]:
        for line in reversed(text.splitlines()):
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return None
