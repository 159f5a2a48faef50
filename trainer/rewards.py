"""Rewards from several sources (reward services and Python reward functions), requested
concurrently and combined per sample as TRL's GRPO trainer combines ``reward_funcs``.

The pure parts: :func:`reward_column` (a function's answer checked), :func:`combine_rewards`
(weighted sum over the sources that apply, TRL's ``nansum`` rule) and :func:`reward_metrics`
(``rewards/<name>/mean|std``). :class:`RewardSources` runs the requests: every service through
the reward client (its retries and failover, errors raised and never scored), sync functions
in threads, ``async def`` functions on the event loop those requests run on, all at once, and
hands back a :class:`~concurrent.futures.Future` so the caller keeps computing meanwhile.
:class:`ModelChangePolicy` applies ``reward_model_change`` to redeployed reward models.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import httpx
import torch

from common.client import AsyncRewardClient, EventHook, RewardServiceError, redact
from common.schemas import InfoResponse
from trainer.generation import Prompt, is_conversational
from trainer.reward_specs import (
    FunctionSpec,
    RewardConfigError,
    RewardFuncEntry,
    ServiceSpec,
    SourceSpec,
    check_columns,
    logging_arguments,
    parse_reward_sources,
    resolve_weights,
)
from trainer.scoring import score_items

logger = logging.getLogger(__name__)


class RewardFunctionError(RuntimeError):
    """A reward function raised, or answered something that is not one reward per sample."""


class NoApplicableRewardError(RuntimeError):
    """Every source returned ``None`` ("does not apply") for a sample: it has no reward."""


class RewardModelChanged(RuntimeError):
    """A reward service now serves other weights and ``reward_model_change`` is ``stop``.

    The trainer catches it to save a checkpoint and exit; the batch scored by the new model
    is not trained on.
    """

    def __init__(self, source: str, payload: Mapping[str, Any]) -> None:
        self.source = source
        self.payload = dict(payload)
        self.checkpoint: str | None = None  # set by the trainer once it has saved one
        super().__init__(
            f"the reward model of source {source!r} changed during training "
            f"({payload.get('model_id')} at {payload.get('url')}: weights "
            f"{payload.get('old_hash')} -> {payload.get('new_hash')}); reward_model_change=stop "
            "keeps a run on one reward model: resume from the checkpoint on purpose, or set "
            "reward_model_change=warn"
        )


# ----------------------------------------------------------------------------- pure parts
def repeat_per_sample(values: Sequence[Any], num_samples: int) -> list[Any]:
    """Per-prompt values aligned with the trainer's ``K·B`` samples (block layout: sample ``k``
    of prompt ``i`` is ``k·B + i``, i.e. ``list(prompts) * K``)."""
    return list(values) * num_samples


def reward_column(values: Any, num_samples: int, name: str, step: int) -> list[float]:
    """A function's answer as floats, ``None`` -> NaN ("does not apply"); raises
    :class:`RewardFunctionError` naming ``name`` and ``step`` unless it is one finite number
    or ``None`` per sample."""
    if hasattr(values, "tolist") and not isinstance(values, list | tuple):
        values = values.tolist()  # numpy arrays, tensors
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(values).__name__} at step {step}; "
            f"expected a list of {num_samples} numbers (None where it does not apply)"
        )
    if len(values) != num_samples:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(values)} rewards at step {step}, but "
            f"{num_samples} were expected (one per completion)"
        )
    column = []
    for i, value in enumerate(values):
        if value is None:
            column.append(math.nan)
        elif isinstance(value, Real) and math.isfinite(float(value)):
            column.append(float(value))
        else:
            raise RewardFunctionError(
                f"reward function {name!r} returned {value!r} for completion {i} at step "
                f"{step}; rewards must be finite numbers, or None where it does not apply"
            )
    return column


def combine_rewards(
    per_source: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    *,
    step: int,
    prompts: Sequence[Prompt],
) -> torch.Tensor:
    """Weighted sum per sample over the sources that apply (NaN = does not apply), TRL's
    ``(rewards_per_func * weights).nansum(dim=1)``.

    ``per_source`` is ``[samples, sources]``. A sample with no applicable source has no
    reward: :class:`NoApplicableRewardError` names the step and its prompt (TRL only warns and
    trains on 0).
    """
    if per_source.dim() != 2:
        raise ValueError(f"per_source must be [samples, sources], got {tuple(per_source.shape)}")
    w = torch.as_tensor(weights, dtype=per_source.dtype, device=per_source.device)
    if w.shape != (per_source.shape[1],):
        raise ValueError(f"{w.numel()} weights for {per_source.shape[1]} sources")
    unscorable = per_source.isnan().all(dim=1)
    if unscorable.any():
        rows = unscorable.nonzero().flatten().tolist()
        raise NoApplicableRewardError(
            f"step {step}: no reward source applies to completion {rows[0]} of prompt "
            f"{prompts[rows[0]]!r} (every source returned None; {len(rows)} such "
            "completion(s) in the batch)"
        )
    return (per_source * w).nansum(dim=1)


def reward_metrics(
    per_source: torch.Tensor, names: Sequence[str], prefix: str = "rewards/"
) -> dict[str, float]:
    """``{prefix}<name>/mean`` and ``/std`` per source over the samples it applies to (TRL's
    ``nanmean`` / unbiased ``nanstd``). A source that applies to no sample has no mean, and one
    that applies to fewer than two has no std: the key is left out rather than logged as NaN."""
    metrics = {}
    for i, name in enumerate(names):
        column = per_source[:, i]
        values = column[~column.isnan()].double()
        if values.numel():
            metrics[f"{prefix}{name}/mean"] = values.mean().item()
        if values.numel() > 1:
            metrics[f"{prefix}{name}/std"] = values.std().item()
    return metrics


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with repeats made distinct: the second ``x`` becomes ``x_2``, and so on."""
    seen: Counter[str] = Counter()
    taken = set(names)
    out = []
    for name in names:
        seen[name] += 1
        candidate = name
        if seen[name] > 1:
            n = seen[name]
            while f"{name}_{n}" in taken:
                n += 1
            candidate = f"{name}_{n}"
            taken.add(candidate)
        out.append(candidate)
    return out


def service_name(model_id: str, url: str) -> str:
    """A service's metric name: the last part of its model id (TRL names reward models so),
    or ``host:port`` when the id has none."""
    name = model_id.rstrip("/").rsplit("/", 1)[-1]
    if name:
        return name
    parsed = httpx.URL(url)
    return f"{parsed.host}:{parsed.port}" if parsed.port else parsed.host


# ----------------------------------------------------------------------------- model changes
class ModelChangePolicy:
    """``reward_model_change``: what a redeployed reward model does to the run.

    :meth:`hook` gives each service's client an event hook that adds the source's name to
    every event (``source``) before passing it on to ``on_event`` (the trainer's
    ``events.jsonl`` writer). ``warn`` logs and counts a change; ``stop`` also makes
    :meth:`raise_if_stopped` raise :class:`RewardModelChanged` from then on.
    """

    def __init__(self, mode: str = "warn", on_event: EventHook | None = None) -> None:
        if mode not in ("warn", "stop"):
            raise RewardConfigError(f"reward_model_change must be 'warn' or 'stop', got {mode!r}")
        self.mode = mode
        self.on_event = on_event
        self.changes: Counter[str] = Counter()
        self._stop: RewardModelChanged | None = None
        self._lock = threading.Lock()

    def hook(self, source_name: Callable[[], str]) -> EventHook:
        """The event hook of one service; ``source_name()`` gives its current name."""

        def on_event(name: str, payload: dict[str, Any]) -> None:
            source = source_name()
            payload = {**payload, "source": source}
            if name == "reward_model_changed":
                with self._lock:
                    self.changes[source] += 1
                    if self.mode == "stop" and self._stop is None:
                        self._stop = RewardModelChanged(source, payload)
                if self.mode == "stop":
                    logger.error("reward source %s: reward model changed; stopping", source)
                else:
                    logger.warning(
                        "reward source %s: reward model changed (%s -> %s); training goes on "
                        "(reward_model_change=warn)",
                        source, payload.get("old_hash"), payload.get("new_hash"),
                    )  # fmt: skip
            if self.on_event is not None:
                self.on_event(name, payload)

        return on_event

    def reset(self) -> None:
        """Forget the changes seen so far (those of the start-up checks)."""
        with self._lock:
            self.changes.clear()
            self._stop = None

    @property
    def total_changes(self) -> int:
        with self._lock:
            return sum(self.changes.values())

    def raise_if_stopped(self) -> None:
        with self._lock:
            stop = self._stop
        if stop is not None:
            raise stop


# ----------------------------------------------------------------------------- the requests
@dataclass(frozen=True)
class RewardBatch:
    """Rewards of one batch of samples.

    ``per_source`` is ``[samples, sources]`` float32 (NaN where a function returned None),
    ``combined`` the weighted sum per sample, ``spans`` each source's ``time.perf_counter()``
    at its start and its end.
    """

    names: tuple[str, ...]
    per_source: torch.Tensor
    combined: torch.Tensor
    spans: dict[str, tuple[float, float]]
    # What the functions logged: each log_metric name's mean, each log_extra column per sample.
    logged_metrics: dict[str, float] = field(default_factory=dict)
    logged_extra: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def seconds(self) -> dict[str, float]:
        """Each source's wall time (e.g. for ``time/reward/<name>``)."""
        return {name: end - start for name, (start, end) in self.spans.items()}

    def metrics(self, prefix: str = "rewards/") -> dict[str, float]:
        """``rewards/<name>/mean|std`` of this batch (see :func:`reward_metrics`)."""
        return reward_metrics(self.per_source, self.names, prefix)

    def by_source(self) -> dict[str, list[float | None]]:
        """Each source's rewards as a list, None where it does not apply (for logs)."""
        return {
            name: [None if math.isnan(v) else v for v in self.per_source[:, i].tolist()]
            for i, name in enumerate(self.names)
        }


class FunctionLogs:
    """What the functions of one request log through TRL's callbacks: ``log_metric(name,
    value)``, a scalar averaged into the step's metrics, and ``log_extra(column, values)``, a
    value per sample for the completions table. Thread-safe: the functions run at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list[Any]] = {}

    def log_metric(self, name: str, value: float) -> None:
        with self._lock:
            self.metrics.setdefault(name, []).append(float(value))

    def log_extra(self, column: str, values: Sequence[Any]) -> None:
        with self._lock:
            self.extra.setdefault(column, []).extend(values)

    def callbacks(self, names: Sequence[str]) -> dict[str, Callable[..., None]]:
        """The callbacks called ``names`` (of ``log_extra``, ``log_metric``)."""
        return {name: getattr(self, name) for name in names}

    def results(self, num_samples: int, step: int) -> tuple[dict[str, float], dict[str, list[Any]]]:
        """Each metric's mean and each extra column; a column of another length than the
        batch is an error naming it and the step."""
        with self._lock:
            for column, values in self.extra.items():
                if len(values) != num_samples:
                    raise RewardFunctionError(
                        f"log_extra column {column!r} got {len(values)} values at step {step}, "
                        f"but the batch has {num_samples} samples"
                    )
            means = {name: sum(v) / len(v) for name, v in self.metrics.items()}
            return means, {column: list(values) for column, values in self.extra.items()}


@dataclass(frozen=True)
class _Request:
    prompts: list[Prompt]
    completions: list[str]
    completion_ids: list[list[int]]
    columns: dict[str, list[Any]]
    trainer_state: Any
    step: int
    logs: FunctionLogs = field(default_factory=FunctionLogs)

    def function_kwargs(self, logging: Sequence[str] = ()) -> dict[str, Any]:
        """TRL's call: conversational prompts as messages, then completions as one assistant
        message each; every list its own copy (the functions run at the same time); the
        ``logging`` callbacks the function takes."""
        if self.prompts and is_conversational(self.prompts[0]):
            completions: list[Any] = [
                [{"role": "assistant", "content": c}] for c in self.completions
            ]
        else:
            completions = list(self.completions)
        return {
            **{name: list(values) for name, values in self.columns.items()},
            "prompts": list(self.prompts),
            "completions": completions,
            "completion_ids": [list(ids) for ids in self.completion_ids],
            "trainer_state": self.trainer_state,
            **self.logs.callbacks(logging),
        }


class RewardSources:
    """Every configured reward source, requested concurrently for each batch.

    Build it from :func:`~trainer.reward_specs.parse_reward_sources` output (or with
    :meth:`from_args`), call :meth:`check` once (``GET /info`` of each service: names and
    request sizes), optionally :meth:`check_columns` with the dataset's columns, then
    :meth:`submit` per batch. Thread-safe; :meth:`close` when done.
    """

    def __init__(
        self,
        specs: Sequence[SourceSpec],
        weights: Sequence[float] | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 12,
        model_change: str = "warn",
        on_event: EventHook | None = None,
    ) -> None:
        if not specs:
            raise RewardConfigError("no reward source given")
        self.specs = list(specs)
        self.weights = resolve_weights(weights, len(self.specs))
        self.policy = ModelChangePolicy(model_change, on_event)
        self.columns: list[str] | None = None
        # Until /info answers, a service is named by its first URL's host:port.
        self.names = unique_names(
            [
                s.name if isinstance(s, FunctionSpec) else service_name("", s.urls[0])
                for s in self.specs
            ]
        )
        self._max_items: dict[int, int] = {}
        # The logging callbacks each function takes (TRL's log_extra, log_metric).
        self._logging = {
            i: logging_arguments(spec.func)
            for i, spec in enumerate(self.specs)
            if isinstance(spec, FunctionSpec)
        }
        self._checked = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="reward-loop", daemon=True
        )
        self._thread.start()
        sync_functions = sum(isinstance(s, FunctionSpec) and not s.is_async for s in self.specs)
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, 2 * sync_functions), thread_name_prefix="reward-fn"
        )
        self._clients: dict[int, AsyncRewardClient] = {}
        for i, spec in enumerate(self.specs):
            if isinstance(spec, ServiceSpec):
                self._clients[i] = AsyncRewardClient(
                    list(spec.urls),
                    api_key=api_key,
                    timeout=timeout,
                    max_retries=max_retries,
                    on_event=self.policy.hook(functools.partial(self._name, i)),
                )

    @classmethod
    def from_args(
        cls,
        args: Any,
        reward_funcs: Sequence[RewardFuncEntry] | RewardFuncEntry | None = None,
        on_event: EventHook | None = None,
    ) -> RewardSources:
        """The sources of an :class:`~trainer.config.OnlineDPOConfig` (``reward_funcs`` given
        here, e.g. callables, replace ``args.reward_funcs``); not yet checked."""
        funcs = reward_funcs if reward_funcs is not None else args.reward_funcs
        specs = parse_reward_sources(funcs, args.reward_url)
        return cls(
            specs,
            args.reward_weights,
            api_key=args.reward_api_key,
            timeout=args.reward_timeout,
            max_retries=args.reward_max_retries,
            model_change=args.reward_model_change,
            on_event=on_event,
        )

    def _name(self, index: int) -> str:
        return self.names[index]

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def check(self) -> dict[str, list[InfoResponse]]:
        """``GET /info`` of every service replica (all at once): names each service after its
        model, sets its request size limit, logs what it serves. Raises when a service has no
        replica answering. Returns the answers by source name."""

        async def all_infos() -> list[list[InfoResponse]]:
            return list(await asyncio.gather(*(c.info() for c in self._clients.values())))

        infos = dict(zip(self._clients, self._run(all_infos()), strict=True))
        bases = []
        for i, spec in enumerate(self.specs):
            if i in infos:
                first = infos[i][0]
                hashes = sorted({info.weights_hash for info in infos[i]})
                if len(hashes) > 1 and self.policy.mode == "stop":
                    raise RewardConfigError(
                        f"the replicas of reward service {self._clients[i].urls} serve "
                        f"different weights {hashes}; reward_model_change=stop needs one model"
                    )
                self._max_items[i] = min(info.max_items_per_request for info in infos[i])
                bases.append(service_name(first.model_id, self._clients[i].urls[0]))
            else:
                assert isinstance(spec, FunctionSpec)
                bases.append(spec.name)
        self.names = unique_names(bases)
        for i, spec in enumerate(self.specs):
            if i in infos:
                info = infos[i][0]
                logger.info(
                    "reward source %s (weight %g): model %s (weights %s, %s) at %s",
                    self.names[i], self.weights[i], info.model_id, info.weights_hash,
                    info.dtype, ", ".join(redact(u) for u in self._clients[i].urls),
                )  # fmt: skip
            else:
                logger.info(
                    "reward source %s (weight %g): %s function %s",
                    self.names[i], self.weights[i],
                    "async" if spec.is_async else "sync", spec.label,
                )  # fmt: skip
        # Replicas seen with different weights at start-up are not a change during training.
        self.policy.reset()
        self._checked = True
        return {self.names[i]: infos[i] for i in infos}

    def check_columns(self, columns: Sequence[str]) -> list[str]:
        """Check every function against the dataset's columns (all but ``prompt`` are passed
        by name); returns the columns to pass."""
        self.columns = check_columns(self.specs, columns)
        return self.columns

    def submit_rollout(
        self,
        prompts: Sequence[Any],
        completions: list[str],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        columns: Mapping[str, Sequence[Any]],
        needed: Sequence[str],
        trainer_state: Any,
        step: int,
    ) -> Future[RewardBatch]:
        """:meth:`submit` for a rollout: ``K`` completions per prompt in block layout (sample
        ``k`` of prompt ``i`` at ``k·B + i``), the ``needed`` dataset columns given per
        prompt; functions get the token ids without padding, as TRL passes them."""
        k = len(completions) // len(prompts)
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"the batch has no column(s) {missing} that reward functions read")
        keep = completion_mask.bool()
        ids = [row[m].tolist() for row, m in zip(completion_ids, keep, strict=True)]
        return self.submit(
            repeat_per_sample(prompts, k), completions, ids,
            columns={c: repeat_per_sample(columns[c], k) for c in needed},
            trainer_state=trainer_state, step=step,
        )  # fmt: skip

    def submit(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        *,
        columns: Mapping[str, Sequence[Any]] | None = None,
        trainer_state: Any = None,
        step: int = 0,
    ) -> Future[RewardBatch]:
        """Request every source's rewards of these samples; returns at once.

        All arguments are per sample, aligned (use :func:`repeat_per_sample` for per-prompt
        prompts and columns). ``completions`` are decoded texts; functions get them as TRL
        gives them (one assistant message each when the prompts are conversational).
        ``Future.result()`` is the :class:`RewardBatch`, or raises the first failure: a
        service error (:class:`~common.client.RewardServiceError`, the message naming the
        source and step), :class:`RewardFunctionError`, :class:`NoApplicableRewardError`,
        :class:`RewardModelChanged`.
        """
        if not self._checked:
            raise RuntimeError("call RewardSources.check() before submit()")
        if self._loop.is_closed():
            raise RuntimeError("the reward sources are closed")
        n = len(completions)
        if n == 0:
            raise ValueError("no completions to score")
        columns = {k: list(v) for k, v in (columns or {}).items()}
        lengths = {
            "prompts": len(prompts),
            "completion_ids": len(completion_ids),
            **{f"column {k!r}": len(v) for k, v in columns.items()},
        }
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ValueError(f"{n} completions but {wrong}: give one value per sample")
        if self.columns is not None and sorted(columns) != self.columns:
            raise ValueError(
                f"columns {sorted(columns)} are not the ones checked against the reward "
                f"functions ({self.columns})"
            )
        request = _Request(
            list(prompts), list(completions), [list(ids) for ids in completion_ids], columns,
            trainer_state, step,
        )  # fmt: skip
        return asyncio.run_coroutine_threadsafe(self._score(request), self._loop)

    async def _score(self, request: _Request) -> RewardBatch:
        spans: dict[str, tuple[float, float]] = {}

        async def timed(i: int) -> list[float]:
            start = time.perf_counter()
            try:
                return await self._source(i, request)
            finally:
                spans[self.names[i]] = (start, time.perf_counter())

        tasks = [asyncio.ensure_future(timed(i)) for i in range(len(self.specs))]
        try:
            columns = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            # Collect the others' outcomes (a sync function's thread itself runs on).
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self.policy.raise_if_stopped()
        per_source = torch.tensor(columns, dtype=torch.float32).T.contiguous()  # [N, S]
        combined = combine_rewards(
            per_source, self.weights, step=request.step, prompts=request.prompts
        )
        metrics, extra = request.logs.results(len(request.completions), request.step)
        return RewardBatch(tuple(self.names), per_source, combined, spans, metrics, extra)

    async def _source(self, index: int, request: _Request) -> list[float]:
        spec = self.specs[index]
        name = self.names[index]
        if isinstance(spec, ServiceSpec):
            return await self._service(index, request)
        kwargs = request.function_kwargs(self._logging[index])
        try:
            if spec.is_async:
                values = await spec.func(**kwargs)
            else:
                loop = asyncio.get_running_loop()
                values = await loop.run_in_executor(
                    self._pool, functools.partial(spec.func, **kwargs)
                )
        except Exception as e:
            raise RewardFunctionError(
                f"reward function {name!r} ({spec.label}) raised at step {request.step}: "
                f"{type(e).__name__}: {e}"
            ) from e
        return reward_column(values, len(request.completions), name, request.step)

    async def _service(self, index: int, request: _Request) -> list[float]:
        client = self._clients[index]
        items = score_items(request.prompts, request.completions)
        size = self._max_items[index]
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        try:
            answers = await asyncio.gather(*(client.score(chunk) for chunk in chunks))
        except RewardServiceError as e:
            # Same type and fields, the message naming the source and the step.
            raise type(e)(
                e.status, e.type, f"{e.message} (reward source {self.names[index]!r}, step "
                f"{request.step})", e.url,
            ) from e  # fmt: skip
        return [score for answer in answers for score in answer.scores]

    def close(self) -> None:
        """Cancel what is in flight, close the HTTP pools, stop the loop and the threads."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in self._clients.values():
                await client.aclose()

        try:
            self._run(shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RewardSources:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
