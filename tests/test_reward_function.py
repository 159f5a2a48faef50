"""The reward function of other trainers, against a real reward service.

- TRL: ``GRPOTrainer`` (trl 1.16) trains on the demo policy with the function in
  ``reward_funcs`` and the rewards it logs equal direct ``/score`` answers for the completions it
  generated. TRL calls it as ``reward_func(prompts=..., completions=..., completion_ids=...,
  **reward_kwargs)`` and logs ``rewards/<__name__>/mean`` (``trl/trainer/grpo_trainer.py``,
  ``_calculate_rewards`` and ``_generate_and_score_completions``); conversational completions
  are ``[{"role": "assistant", "content": ...}]``.
- OpenRLHF: the two-line ``reward_func.py`` shim is loaded and called as
  ``SingleTurnAgentExecutor`` does (``openrlhf/utils/agent.py``: ``spec_from_file_location``,
  ``module.reward_func``, ``asyncio.to_thread(reward_func, queries, prompts, labels)``, then
  ``rewards_info.get("rewards")`` / ``"scores"`` / ``"extra_logs"``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import pickle
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.client import RewardClient, RewardServiceError
from common.demo_models import DemoModels
from common.reward_function import RewardServiceFunction
from trainer.service_process import running_service

API_KEY = "reward-function-test-key"
# Smaller than TRL's batch below, so every call is split into several requests.
MAX_ITEMS = 3
PROMPTS = [
    "my friends found the camera",
    "in the end the pacing seemed",
    "the soundtrack was",
    "honestly the plot felt",
]


@pytest.fixture(scope="module")
def service(demo_models: DemoModels) -> Iterator[str]:
    with running_service(
        demo_models.reward,
        REWARD_API_KEY=API_KEY,
        REWARD_MAX_ITEMS_PER_REQUEST=str(MAX_ITEMS),
    ) as url:
        yield url


def wire_items(prompts: list[Any], completions: list[Any]) -> list[dict[str, Any]]:
    """``/score`` items as the README documents them: ``messages`` for conversations (prompt
    messages + completion messages), ``prompt`` + ``completion`` for plain text."""
    return [
        {"messages": p + c} if isinstance(c, list) else {"prompt": p, "completion": c}
        for p, c in zip(prompts, completions, strict=True)
    ]


def direct_scores(url: str, items: list[dict[str, Any]]) -> list[float]:
    """``/score`` answers for ``items``, one request per item (no chunking by the function)."""
    with RewardClient(url, api_key=API_KEY) as client:
        return [client.score([item]).scores[0] for item in items]


def test_plain_and_conversational_items_score_as_direct_requests(service: str) -> None:
    """Plain text goes as prompt + completion, messages as ``messages`` (the reward tokenizer's
    chat template): each equals the direct answer, across more items than one request holds."""
    reward = RewardServiceFunction(service, api_key=API_KEY)
    completions = [" great and lovely .", " awful , boring and bad .", " fine .", " dull ."]
    got = reward(prompts=PROMPTS, completions=completions, completion_ids=[[1]] * 4)
    assert got == pytest.approx(direct_scores(service, wire_items(PROMPTS, completions)), abs=1e-5)

    chat_prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    chat_completions = [[{"role": "assistant", "content": c.strip()}] for c in completions]
    chat = reward(prompts=chat_prompts, completions=chat_completions)
    expected = direct_scores(service, wire_items(chat_prompts, chat_completions))
    assert chat == pytest.approx(expected, abs=1e-5)
    # The chat template matters: the same words scored as plain text give other scores.
    assert max(abs(a - b) for a, b in zip(chat, got, strict=True)) > 1e-3
    assert reward(prompts=[], completions=[]) == []


def test_survives_pickle_after_use(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pickled with an open client (TRL / multiprocessing pickle reward functions): the copy
    opens its own connections and scores the same; the API key comes from the environment."""
    monkeypatch.setenv("REWARD_API_KEY", API_KEY)
    reward = RewardServiceFunction([service, service], name="sentiment", label=0)
    first = reward(PROMPTS, [" great ."] * 4)
    copy = pickle.loads(pickle.dumps(reward))
    assert copy.__name__ == "sentiment"
    assert copy(PROMPTS, [" great ."] * 4) == first
    reward.close()
    assert reward(PROMPTS[:1], [" great ."]) == first[:1]  # reconnects after close()


def test_bad_inputs_fail_clearly(service: str) -> None:
    reward = RewardServiceFunction(service, api_key=API_KEY)
    with pytest.raises(ValueError, match="message prompt"):
        reward(["plain prompt"], [[{"role": "assistant", "content": "hi"}]])
    tool_call = [{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]
    with pytest.raises(ValueError, match="tool_calls"):
        reward([[{"role": "user", "content": "hi"}]], [tool_call])
    with pytest.raises(ValueError, match="reward service URL"):
        RewardServiceFunction("localhost:8000")
    wrong_key = RewardServiceFunction(service, api_key="wrong", max_retries=0)
    with pytest.raises(RewardServiceError) as err:
        wrong_key(PROMPTS[:1], [" great ."])
    assert err.value.status == 401


@pytest.mark.slow
@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "conversational"])
def test_trl_grpo_logs_the_service_rewards(
    service: str, demo_models: DemoModels, tmp_path: Path, conversational: bool
) -> None:
    """TRL 1.16's GRPOTrainer, 2 steps on the demo policy, with the function in
    ``reward_funcs``. A zero-weight second reward function records what TRL passed to every
    reward function; the logged per-step mean and std and the last batch's per-completion
    rewards equal direct ``/score`` answers for those completions."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    seen: list[tuple[list[Any], list[Any]]] = []

    def recorder(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        seen.append((list(prompts), list(completions)))
        return [0.0] * len(prompts)

    rows = [[{"role": "user", "content": p}] for p in PROMPTS] if conversational else PROMPTS
    reward = RewardServiceFunction(service, api_key=API_KEY, name="sentiment")
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        learning_rate=1e-4,
        reward_weights=[1.0, 0.0],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(demo_models.policy),
        processing_class=AutoTokenizer.from_pretrained(demo_models.policy),
        reward_funcs=[reward, recorder],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": rows}),
    )
    trainer.train()

    assert len(seen) == 2
    logged = [e for e in trainer.state.log_history if "rewards/sentiment/mean" in e]
    assert len(logged) == 2
    for (prompts, completions), entry in zip(seen, logged, strict=True):
        assert len(completions) == 4
        if conversational:
            assert completions[0][0]["role"] == "assistant"
        else:
            assert isinstance(completions[0], str)
        scores = direct_scores(service, wire_items(prompts, completions))
        assert entry["rewards/sentiment/mean"] == pytest.approx(statistics.mean(scores), abs=1e-5)
        assert entry["rewards/sentiment/std"] == pytest.approx(statistics.stdev(scores), abs=1e-5)
    # TRL's completions table (what `log_completions` prints) holds the last batch's rewards.
    assert list(trainer._logs["rewards"]["sentiment"]) == pytest.approx(scores, abs=1e-5)


OPENRLHF_SHIM = """\
from common.reward_function import RewardServiceFunction

reward_func = RewardServiceFunction({url!r}, api_key={key!r}).openrlhf
"""


def test_openrlhf_reward_func_shim(service: str, tmp_path: Path) -> None:
    """The README's ``reward_func.py`` for ``--remote_rm_url reward_func.py``, loaded and called
    the way OpenRLHF's ``SingleTurnAgentExecutor`` does; each query is scored as text."""
    path = tmp_path / "reward_func.py"
    path.write_text(OPENRLHF_SHIM.format(url=service, key=API_KEY))
    spec = importlib.util.spec_from_file_location("reward_func", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reward_func = module.reward_func

    queries = [f"<|user|> {p}\n<|assistant|> great and lovely ." for p in PROMPTS]
    labels = [None] * len(PROMPTS)

    async def fetch() -> list[dict[str, Any]]:
        # One query per call, several calls in threads at once, as _fetch_rewards_via_func.
        return await asyncio.gather(
            *(asyncio.to_thread(reward_func, [q], [p], [lab])
              for q, p, lab in zip(queries, PROMPTS, labels, strict=True))
        )  # fmt: skip

    infos = asyncio.run(fetch())
    expected = direct_scores(service, [{"text": q} for q in queries])
    for info, score in zip(infos, expected, strict=True):
        assert info["rewards"] == pytest.approx([score], abs=1e-5)
        assert info["scores"] == info["rewards"]
        assert info["extra_logs"] == {}
    # A whole batch in one call: one reward per query, in order.
    batch = reward_func(queries, PROMPTS, labels)
    assert batch["rewards"] == pytest.approx(expected, abs=1e-5)
