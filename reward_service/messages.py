"""The messages of the service's two process links, one frozen dataclass per kind.

Batching link (:mod:`reward_service.batch_loop`): the server's :class:`~reward_service.batcher.
Batcher` and the batching loop beside the model.

- server to loop (:data:`ToBatchLoop`): :class:`ScoreJob`, :class:`CancelJob`;
- loop to server (:data:`FromBatchLoop`): :class:`JobsTaken`, :class:`BatchScored`,
  :class:`JobsFailed`.

Model link (:mod:`reward_service.runner`): the server's :class:`~reward_service.runner.
ProcessRunner` and its model process, before the model process turns into the batching loop.

- server to model process (:data:`ToModelProcess`): :class:`RunForward`, :class:`TimeForward`,
  :class:`StartBatchLoop`;
- model process to server (:data:`FromModelProcess`): :class:`ModelLoaded`, :class:`ModelAnswer`,
  :class:`ModelError`.

:mod:`reward_service.link` sends each message as its kind's index in :data:`KINDS` and its
fields, not as a pickled instance: pickling an instance looks its class up by module and name
on every message, which costs a few microseconds a request on both sides of the batching link.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reward_service.batch_loop import BatchLimits
    from reward_service.runner import ModelInfo


# ----------------------------------------------------------------------------- batching link
@dataclass(frozen=True)
class ScoreJob:
    """Server to loop: one request's token ids, to be scored under ``job_id``."""

    job_id: int
    seqs: list[list[int]]


@dataclass(frozen=True)
class CancelJob:
    """Server to loop: the request's handler is gone; skip what is left of its items."""

    job_id: int


@dataclass(frozen=True)
class JobsTaken:
    """Loop to server: a round took these requests out of the queue, each after waiting so
    many seconds (``(job_id, waited_s)``)."""

    waits: list[tuple[int, float]]


@dataclass(frozen=True)
class BatchScored:
    """Loop to server: one forward pass ran (``items`` items, ``tokens`` real of
    ``padded_tokens`` padded, in ``seconds``), and ``done`` holds the requests it finished:
    ``(job_id, head logits of each item)``."""

    done: list[tuple[int, list[list[float]]]]
    items: int
    tokens: int
    padded_tokens: int
    seconds: float


@dataclass(frozen=True)
class JobsFailed:
    """Loop to server: these requests failed with ``error`` (a forward pass raised)."""

    job_ids: list[int]
    error: BaseException


ToBatchLoop = ScoreJob | CancelJob
FromBatchLoop = JobsTaken | BatchScored | JobsFailed


# ----------------------------------------------------------------------------- model link
@dataclass(frozen=True)
class RunForward:
    """Server to model process: the head logits of one padded batch, please."""

    seqs: list[list[int]]


@dataclass(frozen=True)
class TimeForward:
    """Server to model process: how many seconds one forward pass of ``seqs`` takes there."""

    seqs: list[list[int]]


@dataclass(frozen=True)
class StartBatchLoop:
    """Server to model process: become the batching loop, with these limits (the link then
    carries the batching link's messages)."""

    limits: BatchLimits


@dataclass(frozen=True)
class ModelLoaded:
    """Model process to server: the model is loaded; what the server needs to know of it."""

    info: ModelInfo


@dataclass(frozen=True)
class ModelAnswer:
    """Model process to server: the answer to a :class:`RunForward` (rows of logits) or a
    :class:`TimeForward` (seconds)."""

    value: Any


@dataclass(frozen=True)
class ModelError:
    """Model process to server: loading the model, or the request just made, raised
    ``error``."""

    error: BaseException


ToModelProcess = RunForward | TimeForward | StartBatchLoop
FromModelProcess = ModelLoaded | ModelAnswer | ModelError

Message = ToBatchLoop | FromBatchLoop | ToModelProcess | FromModelProcess

# Every message kind; a kind's index here is its tag on the wire.
KINDS: tuple[type[Message], ...] = (
    ScoreJob, CancelJob, JobsTaken, BatchScored, JobsFailed,
    RunForward, TimeForward, StartBatchLoop, ModelLoaded, ModelAnswer, ModelError,
)  # fmt: skip
