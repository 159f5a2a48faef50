"""Several reward sources: parsing and start-up checks, the combining math against TRL's
formula, and real requests to two reward-service subprocesses plus Python functions.

TRL's rules followed here are in ``trl/trainer/grpo_trainer.py`` (1.16): ``_calculate_rewards``
(functions called as ``fn(prompts=, completions=, completion_ids=, **reward_kwargs)`` with the
dataset columns but ``prompt``/``completion``/``completion_ids`` and ``trainer_state``;
``None`` -> NaN; a wrong count is an error naming the function), the ``nansum`` of weighted
rewards, ``rewards/<name>/mean|std`` with ``nanmean``/``nanstd``, and conversational
completions as ``[{"role": "assistant", "content": ...}]``.
"""

from __future__ import annotations

import math
import pickle
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import TrainerState

from common.client import RewardClient, RewardServiceUnavailable
from common.demo_models import DemoModels
from tests import reward_funcs as funcs
from trainer.cli import CliError, parse_train_args
from trainer.completion_log import completion_records
from trainer.config import OnlineDPOConfig
from trainer.losses import select_pairs
from trainer.reward_specs import (
    FunctionSpec,
    RewardConfigError,
    ServiceSpec,
    check_columns,
    logging_arguments,
    parse_reward_sources,
    resolve_weights,
)
from trainer.rewards import (
    ModelChangePolicy,
    NoApplicableRewardError,
    RewardFunctionError,
    RewardModelChanged,
    RewardSources,
    combine_rewards,
    repeat_per_sample,
    reward_column,
    reward_metrics,
    service_name,
    unique_names,
)
from trainer.rules import BREVITY_BUDGET_WORDS, brevity_reward
from trainer.scoring import score_items
from trainer.service_process import ServiceProcess, free_port, running_service

pytestmark = pytest.mark.slow

PROMPTS = ["the movie was", "my friends found the cast", "the plot is"]
K = 4
# K·B completions in the trainer's block layout: sample k of prompt i is k·B + i.
COMPLETIONS = [
    " great .", " boring and dull .", " wonderful and lovely",
    " awful .", " charming .", " fine",
    " bad and weak .", " moving and superb .", " long",
    " superb .", " great and great .", " old and new .",
]  # fmt: skip


def samples() -> tuple[list[str], list[str], list[list[int]]]:
    prompts = repeat_per_sample(PROMPTS, K)
    ids = [[len(c), 2] for c in COMPLETIONS]  # any ints: passed through to functions
    return prompts, list(COMPLETIONS), ids


# ----------------------------------------------------------------------------- the math
def test_combine_rewards_is_the_weighted_sum_over_applicable_sources() -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(50):
        row = [rng.uniform(-2, 2) for _ in range(3)]
        for j in rng.sample(range(3), rng.randint(0, 2)):  # at least one source applies
            row[j] = math.nan
        rows.append(row)
    weights = [1.0, 0.5, -2.0]
    combined = combine_rewards(torch.tensor(rows), weights, step=3, prompts=["p"] * 50)
    expected = [
        sum(w * v for w, v in zip(weights, row, strict=True) if not math.isnan(v)) for row in rows
    ]
    assert combined.tolist() == pytest.approx(expected, abs=1e-6)
    # TRL's own expression on the same matrix.
    trl = (torch.tensor(rows) * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)
    assert torch.allclose(combined, trl)


def test_a_sample_without_any_applicable_reward_stops_with_step_and_prompt() -> None:
    per_source = torch.tensor([[1.0, math.nan], [math.nan, math.nan], [math.nan, 2.0]])
    with pytest.raises(NoApplicableRewardError, match=r"step 7: .*completion 1 of prompt 'second'"):
        combine_rewards(per_source, [1.0, 1.0], step=7, prompts=["first", "second", "third"])


def test_reward_column_turns_none_into_nan_and_refuses_anything_else() -> None:
    column = reward_column([1, None, 0.5, True], 4, "f", 2)
    assert column[0] == 1.0 and math.isnan(column[1]) and column[2:] == [0.5, 1.0]
    assert reward_column(torch.tensor([1.0, 2.0]), 2, "f", 0) == [1.0, 2.0]
    cases = {
        "returned 1 rewards at step 4, but 2 were expected": [0.0],
        "returned 'x' for completion 1 at step 4": [0.0, "x"],
        "returned nan for completion 0 at step 4": [math.nan, 1.0],
        "returned inf for completion 1 at step 4": [1.0, math.inf],
        "returned float at step 4": 1.0,
        "returned str at step 4": "ab",
    }
    for message, values in cases.items():
        with pytest.raises(RewardFunctionError, match=f"reward function 'my_fn' {message}"):
            reward_column(values, 2, "my_fn", 4)


def test_reward_metrics_are_nan_aware_mean_and_unbiased_std() -> None:
    per_source = torch.tensor(
        [[1.0, math.nan, math.nan], [2.0, 5.0, math.nan], [4.0, math.nan, math.nan]]
    )
    metrics = reward_metrics(per_source, ["a", "b", "c"])
    assert metrics == {
        "rewards/a/mean": pytest.approx(statistics.mean([1, 2, 4])),
        "rewards/a/std": pytest.approx(statistics.stdev([1, 2, 4])),
        "rewards/b/mean": 5.0,  # one value: a mean, no std (TRL's nanstd gives NaN there)
    }
    assert reward_metrics(per_source, ["a", "b", "c"], "eval_rewards/")["eval_rewards/b/mean"] == 5


def test_names_are_unique_and_services_are_named_after_their_model() -> None:
    assert unique_names(["reward", "f", "reward", "reward"]) == [
        "reward",
        "f",
        "reward_2",
        "reward_3",
    ]
    assert unique_names(["f", "f", "f_2"]) == ["f", "f_3", "f_2"]  # a given name is kept
    assert service_name("/cache/demo/reward_alt", "http://h:1") == "reward_alt"
    assert service_name("org/model", "http://h:1") == "model"
    assert service_name("", "http://10.0.0.2:8001") == "10.0.0.2:8001"


def test_repeat_per_sample_matches_the_block_layout() -> None:
    assert repeat_per_sample(["a", "b"], 3) == ["a", "b", "a", "b", "a", "b"]


def test_brevity_rule_scores_shorter_completions_higher() -> None:
    completions = [" great .", " great and lovely and moving and the music was wonderful ."]
    short, long = brevity_reward(completions=completions)
    assert short == pytest.approx(1 - 2 / BREVITY_BUDGET_WORDS)
    assert long == pytest.approx(1 - 11 / BREVITY_BUDGET_WORDS) and short > long
    assert brevity_reward(completions=[" w" * 30]) == [0.0]
    messages = [[{"role": "assistant", "content": " great ."}]]
    assert brevity_reward(completions=messages) == [short]


# ----------------------------------------------------------------------------- parsing
def test_entries_parse_as_services_and_functions() -> None:
    specs = parse_reward_sources(
        [
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8001, http://127.0.0.1:8002",
            ["http://127.0.0.1:8003", "http://127.0.0.1:8004/"],
            "tests.reward_funcs:answer_check",
            "tests.reward_funcs.word_count",  # TRL's grpo.py form
            funcs.async_has_period,
        ]
    )
    assert specs[:3] == [
        ServiceSpec(("http://127.0.0.1:8000",)),
        ServiceSpec(("http://127.0.0.1:8001", "http://127.0.0.1:8002")),
        ServiceSpec(("http://127.0.0.1:8003", "http://127.0.0.1:8004")),
    ]
    assert [(s.func, s.name, s.is_async) for s in specs[3:]] == [
        (funcs.answer_check, "answer_check", False),
        (funcs.word_count, "word_count", False),
        (funcs.async_has_period, "async_has_period", True),
    ]
    assert parse_reward_sources(None, "http://h:1, http://h:2") == [
        ServiceSpec(("http://h:1", "http://h:2"))
    ]
    assert resolve_weights(None, 3) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("entries", "url", "message"),
    [
        (["tests.no_such_module:f"], None,
         r"'tests.no_such_module:f': cannot import module 'tests.no_such_module': "
         r"ModuleNotFoundError"),
        (["tests.reward_funcs:nope"], None, r"'tests.reward_funcs' has no attribute 'nope'"),
        (["tests.reward_funcs:NOT_CALLABLE"], None, r"is a int, not a callable"),
        (["tests.reward_funcs:no_kwargs"], None,
         r"no_kwargs' with signature \(prompts, completions\) cannot be called as "
         r"fn\(prompts=, completions=, completion_ids=, trainer_state=\): got an unexpected "
         r"keyword argument 'completion_ids'"),
        ([max], None, r"signature cannot be inspected"),
        (["length_penalty"], None,
         r"reward_funcs\[0\] \('length_penalty'\) is neither a reward service URL"),
        (["127.0.0.1:8000"], None, r"is neither a reward service URL \(http://HOST:PORT"),
        (["ftp://h:1"], None, r"reward_funcs\[0\].*must look like http://HOST:PORT"),
        ([["http://h:1", "pkg:f"]], None, r"a list entry holds the replica URLs"),
        ([3], None, r"reward_funcs\[0\] \(3\) must be a URL, .* not int"),
        (["http://h:1"], "http://h:2", r"give reward_url or reward_funcs, not both"),
        ([], None, r"no reward source"),
    ],
)  # fmt: skip
def test_bad_entries_fail_at_start_with_what_is_wrong(
    entries: list[Any], url: str | None, message: str
) -> None:
    with pytest.raises(RewardConfigError, match=message):
        parse_reward_sources(entries, url)


def test_weights_must_match_the_sources() -> None:
    with pytest.raises(RewardConfigError, match=r"reward_weights has 1 value\(s\) but there are 2"):
        resolve_weights([1.0], 2)
    with pytest.raises(RewardConfigError, match=r"reward_weights\[1\] must be a finite number"):
        resolve_weights([1.0, math.nan], 2)


def test_signatures_are_checked_against_the_dataset_columns() -> None:
    specs = parse_reward_sources(
        ["http://h:1", "tests.reward_funcs:answer_check", "tests.reward_funcs:word_count"]
    )
    # `prompt` is never passed (TRL); every other column is, by name.
    assert check_columns(specs, ["prompt", "answer", "id"]) == ["answer", "id"]
    with pytest.raises(RewardConfigError, match=r"missing a required argument: 'answer'"):
        check_columns(specs, ["prompt", "id"])
    needs_label = parse_reward_sources(["tests.reward_funcs:needs_label"])
    with pytest.raises(RewardConfigError, match=r"missing a required argument: 'label'"):
        check_columns(needs_label, ["prompt"])
    strict = [
        FunctionSpec(
            lambda prompts, completions, completion_ids, trainer_state: [], "f", "f", False
        )
    ]
    with pytest.raises(RewardConfigError, match=r"unexpected keyword argument 'answer'"):
        check_columns(strict, ["prompt", "answer"])
    with pytest.raises(RewardConfigError, match=r"column\(s\) \['completions'\] have the names"):
        check_columns(specs, ["prompt", "completions"])
    with pytest.raises(RewardConfigError, match=r"column\(s\) \['log_metric'\] have the names"):
        check_columns(specs, ["prompt", "log_metric"])
    # TRL's logging callbacks: given to a function that names them or takes **kwargs.
    assert logging_arguments(funcs.logs_one_value_too_few) == ("log_extra", "log_metric")
    assert logging_arguments(funcs.without_kwargs) == ()
    assert check_columns(parse_reward_sources([funcs.without_kwargs]), ["prompt"]) == []


# ----------------------------------------------------------------------------- config + CLI
BASE_ARGS = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl"]


def test_config_takes_the_fields_from_flags_and_yaml(tmp_path: Path) -> None:
    _, _, args = parse_train_args(
        [
            *BASE_ARGS, "--output_dir", str(tmp_path),
            "--reward_funcs", "http://127.0.0.1:1,http://127.0.0.1:2",
            "trainer.rules:brevity_reward",
            "--reward_weights", "1", "0.5", "--reward_model_change", "stop",
            "--log_completions", "true", "--num_completions_to_print", "4",
        ]
    )  # fmt: skip
    assert args.reward_funcs == [
        "http://127.0.0.1:1,http://127.0.0.1:2",
        "trainer.rules:brevity_reward",
    ]
    assert args.reward_weights == [1.0, 0.5]
    assert (args.reward_model_change, args.log_completions, args.num_completions_to_print) == (
        "stop", True, 4,
    )  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path),
                "reward_funcs": [
                    ["http://127.0.0.1:1", "http://127.0.0.1:2"],  # replicas of one service
                    "tests.reward_funcs:answer_check",
                ],
                "reward_weights": [1.0, 2.0],
                "log_completions": True,
            }
        )
    )
    _, _, args = parse_train_args([*BASE_ARGS, "--config", str(config)])
    specs = parse_reward_sources(args.reward_funcs)
    assert specs[0] == ServiceSpec(("http://127.0.0.1:1", "http://127.0.0.1:2"))
    assert specs[1].func is funcs.answer_check
    _, _, args = parse_train_args(
        [*BASE_ARGS, "--config", str(config), "--reward_weights", "3", "4"]
    )
    assert args.reward_weights == [3.0, 4.0]  # flags override the YAML


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reward_funcs", "tests.reward_funcs:nope"], "has no attribute 'nope'"),
        (["--reward_funcs", "http://h:1", "--reward_weights", "1", "2"], "reward_weights has 2"),
        (["--reward_funcs", "http://h:1", "--reward_url", "http://h:2"], "not both"),
        (["--reward_url", "http://h:1", "--reward_model_change", "later"], "invalid choice"),
        (["--reward_url", "http://h:1", "--num_completions_to_print", "0"], "num_completions"),
    ],
)
def test_config_errors_are_one_line_cli_errors(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    with pytest.raises(CliError, match=message):
        parse_train_args([*BASE_ARGS, "--output_dir", str(tmp_path), *flags])


def test_callables_in_the_config_are_saved_as_import_paths(tmp_path: Path) -> None:
    args = OnlineDPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True,
        reward_funcs=["http://h:1", funcs.word_count, lambda **kw: []], reward_weights=[1, 1, 1],
    )  # fmt: skip
    saved = args.to_dict()["reward_funcs"]
    assert saved[:2] == ["http://h:1", "tests.reward_funcs:word_count"]
    assert saved[2].endswith("<lambda>")
    assert pickle.loads(pickle.dumps(args)).reward_funcs == saved  # training_args.bin
    assert args.reward_funcs[1] is funcs.word_count  # the run itself keeps the callables


# ----------------------------------------------------------------------------- model changes
def test_model_change_policy_warns_or_stops_and_names_the_source() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    change = {"old_hash": "a", "new_hash": "b", "model_id": "m", "url": "http://h:1"}
    warn = ModelChangePolicy("warn", lambda n, p: events.append((n, p)))
    hook = warn.hook(lambda: "reward_alt")
    hook("reward_retry", {"url": "http://h:1"})
    hook("reward_model_changed", change)
    warn.raise_if_stopped()  # warn never stops
    assert warn.changes == {"reward_alt": 1}
    assert events == [
        ("reward_retry", {"url": "http://h:1", "source": "reward_alt"}),
        ("reward_model_changed", {**change, "source": "reward_alt"}),
    ]
    stop = ModelChangePolicy("stop")
    stop.raise_if_stopped()
    stop.hook(lambda: "reward")("reward_model_changed", change)
    with pytest.raises(RewardModelChanged, match=r"source 'reward' changed .*weights a -> b"):
        stop.raise_if_stopped()
    with pytest.raises(RewardConfigError):
        ModelChangePolicy("ignore")


# ----------------------------------------------------------------------------- real services
@pytest.fixture(scope="module")
def services(demo_models: DemoModels) -> Iterator[tuple[str, str]]:
    with running_service(demo_models.reward) as a, running_service(demo_models.reward_alt) as b:
        yield a, b


def direct_scores(url: str, prompts: list[Any], completions: list[str]) -> list[float]:
    with RewardClient(url) as client:
        return client.score(score_items(prompts, completions)).scores


def test_two_services_and_functions_with_weights_k4(services: tuple[str, str]) -> None:
    a, b = services
    specs = parse_reward_sources(
        [
            a,
            b,
            "tests.reward_funcs:word_count",
            funcs.async_has_period,
            "trainer.rules:brevity_reward",
        ]
    )
    weights = [1.0, 0.5, -0.1, 0.25, 2.0]
    with RewardSources(specs, weights) as sources:
        infos = sources.check()
        assert sources.names == [
            "reward",
            "reward_alt",
            "word_count",
            "async_has_period",
            "brevity_reward",
        ]
        assert set(infos) == {"reward", "reward_alt"}
        prompts, completions, ids = samples()
        state = TrainerState(global_step=5)
        batch = sources.submit(prompts, completions, ids, trainer_state=state, step=6).result(60)
    expected = torch.tensor(
        [
            direct_scores(a, prompts, completions),
            direct_scores(b, prompts, completions),
            funcs.word_count(completions),
            [float("." in c) for c in completions],
            brevity_reward(completions),
        ]
    ).T
    assert batch.per_source.shape == (K * len(PROMPTS), 5)
    assert torch.allclose(batch.per_source, expected, atol=1e-6)
    assert torch.allclose(batch.combined, expected @ torch.tensor(weights), atol=1e-5)
    assert set(batch.metrics()) == {
        f"rewards/{n}/{s}" for n in sources.names for s in ("mean", "std")
    }
    assert batch.metrics()["rewards/word_count/mean"] == pytest.approx(
        statistics.mean(funcs.word_count(completions))
    )
    assert set(batch.seconds) == set(sources.names)
    # The pair of each prompt is chosen on the combined reward, and logged with every source.
    pairs = select_pairs(batch.combined, K)
    records = completion_records(
        6, PROMPTS, completions, batch.by_source(), batch.combined.tolist(),
        pairs.chosen.tolist(), pairs.rejected.tolist(),
    )  # fmt: skip
    for i, record in enumerate(records):
        group = [batch.combined[k * len(PROMPTS) + i].item() for k in range(K)]
        assert record["chosen"] == group.index(max(group))
        assert record["rejected"] == K - 1 - group[::-1].index(min(group))
        assert record["rewards"]["reward_alt"] == pytest.approx(
            [expected[k * len(PROMPTS) + i, 1].item() for k in range(K)]
        )


def test_functions_get_trl_arguments_and_columns_per_sample(services: tuple[str, str]) -> None:
    a, _ = services
    answers = ["great", None, "superb"]  # prompt 1 has no answer: the check does not apply
    specs = parse_reward_sources([a, "tests.reward_funcs:answer_check", funcs.recording])
    with RewardSources(specs, [1.0, 10.0, 1.0]) as sources:
        sources.check()
        assert sources.check_columns(["prompt", "answer"]) == ["answer"]
        prompts, completions, ids = samples()
        columns = {"answer": repeat_per_sample(answers, K)}
        state = TrainerState(global_step=2)
        with pytest.raises(ValueError, match=r"columns \[\] are not the ones checked"):
            sources.submit(prompts, completions, ids)
        batch = sources.submit(
            prompts, completions, ids, columns=columns, trainer_state=state, step=3
        ).result(60)
    call = funcs.LAST_CALL
    assert set(call) == {
        "prompts", "completions", "completion_ids", "trainer_state", "answer", "log_extra",
        "log_metric",
    }  # fmt: skip
    assert call["prompts"] == prompts and call["completions"] == completions
    assert call["completion_ids"] == ids and call["trainer_state"] is state
    assert call["answer"] == columns["answer"]
    check = batch.per_source[:, 1]
    expected = [
        None if x is None else float(x in c)
        for c, x in zip(completions, columns["answer"], strict=True)
    ]
    assert [None if math.isnan(v) else v for v in check.tolist()] == expected
    # Prompt 1's samples: only the service and `recording` apply.
    service = torch.tensor(direct_scores(a, prompts, completions))
    assert torch.allclose(batch.combined, service + 10 * check.nan_to_num(0.0), atol=1e-5)
    assert "rewards/answer_check/mean" in batch.metrics()


def test_conversational_prompts_pass_messages(services: tuple[str, str]) -> None:
    a, _ = services
    specs = parse_reward_sources([a, funcs.recording])
    prompts = repeat_per_sample([[{"role": "user", "content": p}] for p in PROMPTS], K)
    with RewardSources(specs) as sources:
        sources.check()
        batch = sources.submit(prompts, COMPLETIONS, [[1]] * len(COMPLETIONS)).result(60)
    assert funcs.LAST_CALL["prompts"] == prompts
    # TRL: one assistant message per completion, the decoded text as it is.
    assert funcs.LAST_CALL["completions"] == [
        [{"role": "assistant", "content": c}] for c in COMPLETIONS
    ]
    assert torch.allclose(
        batch.per_source[:, 0], torch.tensor(direct_scores(a, prompts, COMPLETIONS))
    )


def test_none_everywhere_is_an_error_naming_step_and_prompt() -> None:
    specs = parse_reward_sources([funcs.none_for_all, "tests.reward_funcs:answer_check"])
    with RewardSources(specs) as sources:
        sources.check()
        prompts, completions, ids = samples()
        columns = {"answer": [None] * len(completions)}
        future = sources.submit(prompts, completions, ids, columns=columns, step=11)
        with pytest.raises(NoApplicableRewardError, match=r"step 11: .* prompt 'the movie was'"):
            future.result(60)


@pytest.mark.parametrize(
    ("func", "message"),
    [
        (funcs.one_too_few, r"'one_too_few' returned 11 rewards at step 9, but 12 were expected"),
        (funcs.returns_text, r"'returns_text' returned 'good' for completion 0 at step 9"),
        (funcs.returns_nan, r"'returns_nan' returned nan for completion 0 at step 9"),
        (funcs.raises, r"'raises' \(.*\) raised at step 9: KeyError: 'missing field'"),
    ],
)
def test_a_bad_function_answer_stops_naming_function_and_step(
    services: tuple[str, str], func: Any, message: str
) -> None:
    a, _ = services
    with RewardSources(parse_reward_sources([a, func])) as sources:
        sources.check()
        future = sources.submit(*samples(), step=9)
        with pytest.raises(RewardFunctionError, match=message):
            future.result(60)


def test_functions_log_metrics_and_table_columns_with_trls_callbacks(
    services: tuple[str, str],
) -> None:
    """TRL's ``log_metric`` and ``log_extra`` (grpo_trainer.py ``_log_metric``,
    ``_log_completion_extra``): a metric's mean per batch, a column with one value per
    sample; a function that takes neither is called without them; a column of the wrong
    length stops naming it and the step."""
    a, _ = services
    specs = parse_reward_sources([a, funcs.logs_words, funcs.without_kwargs])
    with RewardSources(specs) as sources:
        sources.check()
        batch = sources.submit(*samples(), step=5).result(60)
    words = [len(c.split()) for c in COMPLETIONS]
    assert batch.logged_extra == {"words": words}
    assert batch.logged_metrics == {"words/mean": pytest.approx(sum(words) / len(words))}
    assert batch.per_source[:, 2].tolist() == [1.0] * len(COMPLETIONS)
    with RewardSources(parse_reward_sources([funcs.logs_one_value_too_few])) as sources:
        sources.check()
        future = sources.submit(*samples(), step=5)
        with pytest.raises(RewardFunctionError, match=r"column 'words' got 11 values at step 5"):
            future.result(60)


@pytest.mark.slow
def test_a_dead_service_is_an_error_never_a_reward(
    services: tuple[str, str], demo_models: DemoModels, tmp_path: Path
) -> None:
    a, _ = services
    dead = f"http://127.0.0.1:{free_port()}"
    with RewardSources(parse_reward_sources([[a, dead], funcs.word_count]), max_retries=0) as s:
        s.check()  # the dead replica is skipped with a warning
        batch = s.submit(*samples(), step=1).result(60)  # and requests fail over to the live one
        assert not batch.per_source.isnan().any()
    with (
        RewardSources(parse_reward_sources([dead]), max_retries=0) as s,
        pytest.raises(RewardServiceUnavailable, match="none of 1 reward service URLs answered"),
    ):
        s.check()
    # A service that goes away after the start-up check.
    service = ServiceProcess(demo_models.reward, log_path=tmp_path / "service.log")
    url = service.start()
    try:
        with RewardSources(parse_reward_sources([url, funcs.word_count]), max_retries=1) as s:
            s.check()
            service.stop()
            with pytest.raises(RewardServiceUnavailable, match=r"reward source 'reward', step 4\)"):
                s.submit(*samples(), step=4).result(60)
    finally:
        service.stop()


def test_a_slow_function_runs_beside_the_service(services: tuple[str, str]) -> None:
    """A 10 ms sync function and a /score request at once: their time spans overlap in every
    batch, so the batch takes about the longer of the two, not their sum (the medians are
    printed for the record: on a loaded machine, the thread hand-offs add a few ms)."""
    a, _ = services
    prompts, completions, ids = samples()
    runs = 15
    alone, together, added = [], [], []
    with (
        RewardSources(parse_reward_sources([a])) as only_service,
        RewardSources(parse_reward_sources([a, funcs.sleep_10ms])) as both,
    ):
        only_service.check()
        both.check()
        for sources in (only_service, both):  # warm the connections
            sources.submit(prompts, completions, ids).result(60)
        for _ in range(runs):  # interleaved: a change in machine load hits both alike
            start = time.perf_counter()
            only_service.submit(prompts, completions, ids).result(60)
            alone.append(time.perf_counter() - start)
            start = time.perf_counter()
            batch = both.submit(prompts, completions, ids).result(60)
            done = time.perf_counter()
            together.append(done - start)
            added.append(together[-1] - batch.seconds["reward"])
            (service_start, service_end), (fn_start, fn_end) = batch.spans.values()
            assert fn_start < service_end and service_start < fn_end  # they overlap
            assert fn_end - fn_start >= 0.010
    ms = [statistics.median(x) * 1e3 for x in (alone, together, added)]
    print(
        f"\n/score of {len(completions)} samples alone {ms[0]:.1f} ms; with a 10 ms function "
        f"beside it {ms[1]:.1f} ms (batch minus its /score: {ms[2]:.1f} ms); medians of {runs}"
    )


@pytest.mark.slow
def test_a_redeployed_reward_model_warns_or_stops(demo_models: DemoModels, tmp_path: Path) -> None:
    port = free_port()
    events: list[tuple[str, dict[str, Any]]] = []
    first = ServiceProcess(demo_models.reward, port=port, log_path=tmp_path / "first.log")
    url = first.start()
    warn = RewardSources(parse_reward_sources([url]), on_event=lambda n, p: events.append((n, p)))
    stop = RewardSources(parse_reward_sources([url]), model_change="stop")
    second = ServiceProcess(demo_models.reward_alt, port=port, log_path=tmp_path / "second.log")
    try:
        for sources in (warn, stop):
            sources.check()
            sources.submit(*samples(), step=1).result(60)
        first.stop()
        second.start()  # another model at the same URL: a redeploy
        batch = warn.submit(*samples(), step=2).result(60)
        assert batch.names == ("reward",) and warn.policy.changes == {"reward": 1}
        changed = [p for n, p in events if n == "reward_model_changed"]
        assert len(changed) == 1 and changed[0]["source"] == "reward"
        assert changed[0]["old_hash"] != changed[0]["new_hash"]
        with pytest.raises(RewardModelChanged, match=r"source 'reward' changed during training"):
            stop.submit(*samples(), step=2).result(60)
        with pytest.raises(RewardModelChanged):  # and every batch after it
            stop.submit(*samples(), step=3).result(60)
    finally:
        warn.close()
        stop.close()
        first.stop()
        second.stop()


def test_close_cancels_what_is_in_flight() -> None:
    async def slow(completions: list[str], **kwargs: Any) -> list[float]:
        import asyncio

        await asyncio.sleep(30)
        return [0.0] * len(completions)

    sources = RewardSources(parse_reward_sources([slow]))
    sources.check()
    future = sources.submit(*samples())
    start = time.perf_counter()
    sources.close()
    assert future.cancelled() and time.perf_counter() - start < 5
    with (
        RewardSources(parse_reward_sources([slow])) as unchecked,
        pytest.raises(RuntimeError, match=r"call RewardSources.check\(\) before submit"),
    ):
        unchecked.submit(*samples())


def test_replicas_serving_different_models(services: tuple[str, str]) -> None:
    """Two replicas of one source with different weights: ``stop`` refuses to start, ``warn``
    starts (the client warns) without counting a change during training."""
    a, b = services
    with (
        RewardSources(parse_reward_sources([[a, b]]), model_change="stop") as stop,
        pytest.raises(RewardConfigError, match=r"serve different weights .* needs one model"),
    ):
        stop.check()
    with RewardSources(parse_reward_sources([[a, b]])) as warn:
        warn.check()
        assert warn.policy.total_changes == 0
