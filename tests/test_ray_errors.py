"""Our errors found again behind Ray's wrappers (infra.ray_errors), without a cluster: the wrappers' shapes."""

from infra.ray_errors import exception_chain, remote_error_message


class PlainError(RuntimeError):
    pass


class WorkerGroupLike(RuntimeError):
    """Ray Train's WorkerGroupError: a truncated text, the workers' formatted tracebacks in worker_failures."""

    def __init__(self, text, worker_failures):
        super().__init__(text)
        self.worker_failures = worker_failures


class TaskErrorLike(RuntimeError):
    """Ray's RayTaskError: the original exception in `.cause`."""

    def __init__(self, text, cause):
        super().__init__(text)
        self.cause = cause


def test_chain_visits_causes_contexts_ray_causes_and_worker_failures_once():
    inner = PlainError("inner")
    task = TaskErrorLike("task failed", inner)
    try:
        try:
            raise task
        except TaskErrorLike as e:
            raise ValueError("while handling") from e
    except ValueError as outer:
        top = WorkerGroupLike("1 worker failed", {0: outer, 1: outer})
    inner.__context__ = top  # a cycle: each exception is still yielded once
    chain = list(exception_chain(top))
    assert chain[0] is top
    assert sorted(map(str, chain)) == sorted(["1 worker failed", "while handling", "task failed", "inner"])
    assert list(exception_chain(None)) == []
    odd = RuntimeError("odd")
    odd.cause, odd.worker_failures = "not an exception", ["not a dict"]
    assert list(exception_chain(odd)) == [odd]


def test_message_comes_from_the_workers_full_traceback_not_the_snippet():
    worker = RuntimeError("Traceback (most recent call last):\n  File ...\n"
                          "tests.test_ray_errors.PlainError: shard 3, row 17: truncated JPEG")
    top = WorkerGroupLike("Training failed: ...PlainError: shard 3, row", {0: worker})
    assert remote_error_message(top, PlainError) == "shard 3, row 17: truncated JPEG"
    assert remote_error_message(RuntimeError("nothing of ours"), PlainError) is None
