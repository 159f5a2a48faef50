"""The reward service as a reward function of other trainers: TRL's and OpenRLHF's.

TRL's trainers (``GRPOTrainer``, ``OnlineDPOTrainer``, ``RLOOTrainer``) take callables in
``reward_funcs`` and call them as ``f(prompts=..., completions=..., completion_ids=...,
**dataset_columns)``, expecting one float per completion (``trl/trainer/grpo_trainer.py``,
``_calculate_rewards``). OpenRLHF's ``--remote_rm_url reward_func.py`` loads a module-level
``reward_func`` and calls it as ``reward_func(queries, prompts, labels)`` from worker threads,
expecting ``{"rewards", "scores", "extra_logs"}`` (``openrlhf/utils/agent.py``,
``SingleTurnAgentExecutor``): :meth:`RewardServiceFunction.openrlhf` is that function.

Only httpx and pydantic are imported: the function runs in a trainer that has its own torch,
and installs with the client alone (``pip install online-dpo-service``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from common.client import (
    API_KEY_ENV,
    DEFAULT_MAX_RETRIES,
    RewardClient,
    split_urls,
)
from common.schemas import ScoreItem

# A chat message as TRL passes it: {"role": ..., "content": ...}.
Messages = Sequence[Mapping[str, Any]]


def score_item(prompt: str | Messages, completion: str | Messages) -> ScoreItem:
    """The ``/score`` item of one prompt and completion, in the form TRL gives them.

    Conversational (lists of messages): the prompt's messages followed by the completion's,
    rendered by the service with the reward tokenizer's chat template, as TRL renders them for
    a reward model (``{"messages": prompt + completion}``, unstripped). Plain text: ``prompt``
    and ``completion``, concatenated by the service as TRL concatenates them. Raises
    ``ValueError`` (pydantic's ``ValidationError``) naming what does not fit the wire schema,
    e.g. a message with tool calls or image parts.
    """
    if isinstance(completion, str):
        return ScoreItem(prompt=prompt, completion=completion)
    if isinstance(prompt, str):
        raise ValueError("a conversational completion (a list of messages) needs a message prompt")
    return ScoreItem(messages=[*prompt, *completion])


class RewardServiceFunction:
    """Scores completions with the reward service; a TRL reward function.

    ``RewardServiceFunction("http://HOST:8000")`` goes in TRL's ``reward_funcs=[...]``; its
    ``__name__`` (``name``) names TRL's metrics (``rewards/<name>/mean``). ``url`` is one base
    URL or several replicas (a list, or comma-separated), routed and retried like
    :class:`~common.client.RewardClient`. ``api_key`` defaults to ``$REWARD_API_KEY``; ``label``
    picks the head of a multi-label reward model (index or name, the service's default
    otherwise).

    The HTTP client is made on first use, and dropped when pickled (TRL and multiprocessing
    pickle reward functions), so a copy in another process opens its own connections. The
    first call asks every replica's ``/info`` for the request size limit; longer batches are
    split. Errors are raised, never turned into rewards.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        api_key: str | None = None,
        label: int | str | None = None,
        name: str = "reward_service",
        timeout: float = 30.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        self.urls = split_urls(url)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.label = label
        self.__name__ = name
        self.timeout = timeout
        self.max_retries = max_retries
        self._client: RewardClient | None = None
        self._max_items = 0
        self._lock = threading.Lock()

    def __call__(
        self,
        prompts: Sequence[str | Messages],
        completions: Sequence[str | Messages],
        **kwargs: Any,
    ) -> list[float]:
        """One reward per completion. TRL's other arguments (``completion_ids``,
        ``trainer_state``, dataset columns) are accepted and not used."""
        return self.score([score_item(p, c) for p, c in zip(prompts, completions, strict=True)])

    def openrlhf(
        self,
        queries: Sequence[str],
        prompts: Sequence[Any] | None = None,
        labels: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """OpenRLHF's ``reward_func``: each query (prompt + response, already rendered by the
        policy's tokenizer) is scored as text, as the service's ``/get_reward`` scores it.
        ``prompts`` and ``labels`` (reference answers) are not used by a reward model."""
        scores = self.score([ScoreItem(text=q) for q in queries])
        return {"rewards": scores, "scores": scores, "extra_logs": {}}

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        """Scores of ``items`` in order, in requests of at most the service's limit."""
        if not items:
            return []
        client, max_items = self._connect()
        scores: list[float] = []
        for start in range(0, len(items), max_items):
            batch = items[start : start + max_items]
            scores += client.score(batch, label=self.label).scores
        return scores

    def _connect(self) -> tuple[RewardClient, int]:
        """The client (made on first use) and the smallest ``max_items_per_request``."""
        with self._lock:
            if self._client is None:
                client = RewardClient(
                    self.urls,
                    api_key=self.api_key,
                    timeout=self.timeout,
                    max_retries=self.max_retries,
                )
                try:
                    infos = client.info()
                except BaseException:
                    client.close()
                    raise
                self._max_items = min(info.max_items_per_request for info in infos)
                self._client = client
            return self._client, self._max_items

    def close(self) -> None:
        """Close the connections (a later call opens new ones)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_max_items"] = 0
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.urls!r}, name={self.__name__!r})"
