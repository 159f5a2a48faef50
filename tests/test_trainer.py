"""OnlineDPOTrainer runs against a real reward-service subprocess: parity with TRL 1.16, each
TRL defect fixed, the /score request overlapped with the log-prob forwards, end-to-end runs,
checkpoint + resume, conversational prompts, K=4, PEFT, config errors.

Sampling is the only thing replaced, and only where two runs must see the same completions:
the policy's ``generate`` returns fixed token ids, so prompt tokenization, the EOS cut,
decoding, scoring over HTTP, log-probs, pairing and the loss all run for real.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.client import RewardServiceError
from common.demo_models import DemoModels
from tests.support import TIMING_NAMES, TRL_METRIC_NAMES, make_trainer, tiny_config
from trainer.config import OnlineDPOConfig
from trainer.logprobs import (
    LogProbPass,
    TokenRows,
    completion_token_logps,
    join_prompt_rows,
    pack_completions,
    packed_token_logps,
    prompt_rows,
    truncate_after_eos,
)
from trainer.scoring import score_items
from trainer.trainer import OnlineDPOTrainer

PROMPTS = [
    "the movie was",
    "in the end the pacing seemed",
    "my friends found the cast",
    "the dialogue is",
]
# Fixed completions, sample 0 then sample 1 of each prompt (TRL's block layout). "</s>" is the
# policy's EOS: some end early (padding follows), some run to the width without one, a text
# after an EOS is cut off, and prompt 3's two samples are equal (a tied pair).
COMPLETIONS = [
    " great and lovely .</s>",
    " awful .</s> and more",
    " simple and long and old and new",
    " dull .</s>",
    " boring and dull .</s>",
    " wonderful and charming and moving .",
    " bad .</s>",
    " dull .</s>",
]
WIDTH = 8
# Metrics defined the same way as TRL's (KL, entropy, non-score and RLHF reward are not: TRL
# sums them over padding too).
SAME_AS_TRL = (
    "logps/chosen",
    "logps/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "objective/scores",
    "objective/scores_margin",
    "val/contain_eos_token",
    "beta",
)


# ----------------------------------------------------------------------------- helpers


def config(tmp_path: Path, url: str | None, **overrides: Any) -> OnlineDPOConfig:
    small = {
        "per_device_train_batch_size": 2,
        "max_new_tokens": WIDTH,
        "max_steps": 1,
        "reward_timeout": 10.0,
        "reward_max_retries": 2,
    }
    return tiny_config(tmp_path / "out", url, **{**small, **overrides})


def policy(demo_models: DemoModels) -> Any:
    return AutoModelForCausalLM.from_pretrained(demo_models.policy)


def perturbed_policy(demo_models: DemoModels, seed: int = 0, scale: float = 0.02) -> Any:
    """The policy with seeded noise on every weight: a reference that differs from it."""
    model = policy(demo_models)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def tokenizer(demo_models: DemoModels) -> Any:
    return AutoTokenizer.from_pretrained(demo_models.policy)


def completion_ids(tok: Any, texts: list[str], width: int = WIDTH) -> torch.Tensor:
    """Token ids of ``texts`` as ``generate`` would return them: cut at ``width``, padded."""
    rows = [tok(t, add_special_tokens=False)["input_ids"][:width] for t in texts]
    return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])


def fixed_generate(model: Any, completions: torch.Tensor | dict[tuple, torch.Tensor]) -> None:
    """Make ``model.generate`` return the prompt followed by fixed completion ids: one tensor
    for the whole batch, or a row per prompt (its unpadded ids, as a tuple) per sample."""

    def generate(input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        if isinstance(completions, torch.Tensor):
            rows = completions
        else:
            seen: dict[tuple, int] = {}
            picked = []
            for ids, mask in zip(input_ids, attention_mask, strict=True):
                key = tuple(ids[mask.bool()].tolist())
                picked.append(completions[key][seen.get(key, 0)])
                seen[key] = seen.get(key, 0) + 1
            rows = torch.stack(picked)
        assert rows.shape[0] == input_ids.shape[0]
        return torch.cat([input_ids, rows.to(input_ids.device)], dim=1)

    model.generate = generate


class ScoreSpy:
    """Records what the trainer sends to ``/score`` and the rewards that come back (real
    requests; ``futures`` hold each batch's :class:`~trainer.rewards.RewardBatch`)."""

    def __init__(self, trainer: OnlineDPOTrainer) -> None:
        self.items: list[list[dict]] = []
        self.futures: list[Any] = []
        submit = trainer.rewards.submit

        def spy(prompts: list, completions: list[str], *args: Any, **kwargs: Any) -> Any:
            self.items.append(score_items(prompts, completions))
            self.futures.append(submit(prompts, completions, *args, **kwargs))
            return self.futures[-1]

        trainer.rewards.submit = spy  # type: ignore[method-assign]


def train_logs(trainer: OnlineDPOTrainer) -> dict[int, dict[str, float]]:
    return {r["step"]: r for r in trainer.state.log_history if "loss" in r}


def step_means(trainer: OnlineDPOTrainer) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in trainer.stats.items() if v}


# ----------------------------------------------------------------------------- TRL parity


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.slow
def test_loss_and_metrics_equal_trls(
    demo_models: DemoModels, reward_service: str, tmp_path: Path, loss_type: str, padding_free: bool
) -> None:
    """Same policy, prompts, completions and rewards: TRL 1.16's loss, gradients and the
    metrics both define alike, to 1e-6 (relative to the log-prob sums), with and without
    padding in the log-prob passes."""
    from trl.experimental.online_dpo import OnlineDPOConfig as TRLConfig
    from trl.experimental.online_dpo import OnlineDPOTrainer as TRLTrainer

    tok = tokenizer(demo_models)
    raw = completion_ids(tok, COMPLETIONS)
    common = {
        "per_device_train_batch_size": 4,
        "max_new_tokens": WIDTH,
        "beta": 0.3,
        "loss_type": loss_type,
        "missing_eos_penalty": 0.25,
        "report_to": "none",
        "use_cpu": True,
    }

    ours = make_trainer(
        demo_models,
        config(
            tmp_path,
            reward_service,
            **common,
            bf16=False,
            gradient_checkpointing=False,
            padding_free=padding_free,
        ),
        PROMPTS,
        ref_model=perturbed_policy(demo_models),
    )
    assert ours.logprob_pass.padding_free == padding_free
    fixed_generate(ours.model, raw)
    spy = ScoreSpy(ours)
    ours.model.train()
    loss = ours.compute_loss(ours.model, {"prompt": PROMPTS})
    loss.backward()
    mine = step_means(ours)
    (items,) = spy.items
    scores = spy.futures[0].result().combined

    # TRL's custom reward function route, answering with the service's scores.
    seen: dict[str, Any] = {}

    def service_scores(prompts: list, completions: list, **_: Any) -> list[float]:
        seen["texts"] = [p + c for p, c in zip(prompts, completions, strict=True)]
        return scores.tolist()

    theirs = TRLTrainer(
        model=policy(demo_models),
        ref_model=perturbed_policy(demo_models),
        reward_funcs=service_scores,
        args=TRLConfig(
            output_dir=str(tmp_path / "trl"), **common, bf16=False, gradient_checkpointing=False
        ),
        processing_class=tokenizer(demo_models),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    fixed_generate(theirs.model, raw)
    trl_loss = theirs.training_step(theirs.model, {"prompt": PROMPTS})
    # Both decoded the same completions and scored the same texts.
    assert seen["texts"] == [i["prompt"] + i["completion"] for i in items]

    diffs = {"loss": abs(loss.item() - trl_loss.item())}
    trl_stats = {k: sum(v) / len(v) for k, v in theirs.stats.items() if v}
    for name in SAME_AS_TRL:
        diffs[name] = abs(mine[name] - trl_stats[name])
    grads = [
        (a.grad - b.grad).abs().max().item()
        for a, b in zip(ours.model.parameters(), theirs.model.parameters(), strict=True)
    ]
    diffs["grad"] = max(grads)
    grad_scale = max(p.grad.abs().max().item() for p in ours.model.parameters())
    print(f"TRL parity ({loss_type}): loss {loss.item():.6f}, largest gradient {grad_scale:.3g}")
    print(f"TRL parity ({loss_type}): max abs diff", json.dumps(diffs))
    assert mine["rewards/margins"] != 0  # the reference differs from the policy
    if loss_type == "sigmoid":
        assert diffs["loss"] <= 1e-6
    else:
        # IPO's square (loss ≈ 12 here) turns a 1-ulp difference of a float32 sequence log-prob
        # sum (≈ 30: ulp 1.9e-6; TRL passes no position ids and takes a full log_softmax) into
        # ~2e-5 absolute.
        assert diffs["loss"] <= 1e-5 * abs(loss.item())
    assert diffs["grad"] <= 1e-5 * grad_scale  # float32 sums in another order
    logps_size = max(abs(mine["logps/chosen"]), abs(mine["logps/rejected"]))
    for name in SAME_AS_TRL:
        if name == "rewards/accuracies" and padding_free:
            # Prompt 3's two samples are the same tokens: TRL's margin is exactly 0 (not an
            # accurate pair). Packed at two places in one row, the two sums can differ in the
            # last bit, and so can the sign of that margin.
            assert abs(mine[name] - trl_stats[name]) in (0.0, 0.25)
            continue
        # Sequence log-probs are sums of 8 terms of size ~5: relative 1e-6. The rewards are
        # beta times differences of those sums, so their error scales with beta times the sums,
        # not with the rewards (on an AMD EPYC: 1.4e-6 on rewards/chosen of -0.139, from
        # log-probs of -37.7 and beta 0.3).
        sums = common["beta"] * logps_size if name.startswith("rewards/") else 1.0
        tolerance = 1e-6 * max(1.0, sums)
        assert mine[name] == pytest.approx(trl_stats[name], rel=1e-6, abs=tolerance), name
    # The tied prompt (3) pairs sample 0 against sample 1 in both; padding makes TRL's KL differ.
    assert mine["val/tied_pairs"] == 0.25


# ----------------------------------------------------------------------------- TRL defect 1


@pytest.mark.slow
def test_beta_list_gives_each_epoch_its_beta_then_the_last(
    demo_models: DemoModels, reward_service: str, tmp_path: Path
) -> None:
    """TRL indexes the list with the float epoch and crashes at step 2."""
    args = config(tmp_path, reward_service, max_steps=-1, num_train_epochs=3, beta=[0.1, 0.5])
    trainer = make_trainer(demo_models, args, PROMPTS[:2])  # one step per epoch
    trainer.train()
    logs = train_logs(trainer)
    assert [logs[s]["beta"] for s in (1, 2, 3)] == [0.1, 0.5, 0.5]


# ----------------------------------------------------------------------------- TRL defect 2


def per_prompt_completions(tok: Any, prompts: list[str]) -> dict[tuple, torch.Tensor]:
    """``COMPLETIONS`` per prompt (keyed by its token ids): rows sample 0, sample 1."""
    raw = completion_ids(tok, COMPLETIONS)
    b = len(prompts)
    return {
        tuple(tok(p, add_special_tokens=False)["input_ids"]): raw[[i, b + i]]
        for i, p in enumerate(prompts)
    }


def one_update(demo_models: DemoModels, args: OnlineDPOConfig) -> tuple[Any, dict[str, float]]:
    trainer = make_trainer(demo_models, args, PROMPTS, ref_model=perturbed_policy(demo_models))
    fixed_generate(trainer.model, per_prompt_completions(trainer.processing_class, PROMPTS))
    trainer.train()
    return trainer.model, train_logs(trainer)[1]


@pytest.mark.slow
def test_gradient_accumulation_averages(
    demo_models: DemoModels, reward_service: str, tmp_path: Path
) -> None:
    """One SGD update from 4 prompts in one batch equals the one from 2 accumulated batches
    of 2 (TRL sums the accumulated gradients: twice the update)."""
    common = {"optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 1e9}
    start = policy(demo_models)
    full, full_log = one_update(
        demo_models, config(tmp_path / "a", reward_service, per_device_train_batch_size=4, **common)
    )
    accumulated, acc_log = one_update(
        demo_models,
        config(
            tmp_path / "b", reward_service, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, **common,
        ),
    )  # fmt: skip
    step = max(
        (a - s).abs().max().item()
        for a, s in zip(full.parameters(), start.parameters(), strict=True)
    )
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(full.parameters(), accumulated.parameters(), strict=True)
    )
    assert step > 1e-3  # the update is real
    assert diff <= 1e-5 * step
    assert acc_log["grad_norm"] == pytest.approx(full_log["grad_norm"], rel=1e-5)
    assert acc_log["loss"] == pytest.approx(full_log["loss"], abs=1e-4)


# ----------------------------------------------------------------------------- TRL defect 3


def hand_logps(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               completion: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per-token completion log-probs from one plain forward over prompt + completion."""
    ids = torch.cat([prompt_ids, completion], 1)
    attention = torch.cat([prompt_mask, mask], 1)
    with torch.no_grad():
        logits = model(
            ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0)
        ).logits
    p = prompt_ids.shape[1]
    logps = logits[:, p - 1 : -1].log_softmax(-1)
    return logps.gather(-1, completion.unsqueeze(-1)).squeeze(-1)


def test_kl_entropy_and_non_score_reward_leave_padding_out(
    demo_models: DemoModels, reward_service: str, tmp_path: Path
) -> None:
    """KL, entropy, non-score and RLHF reward sum over each completion up to its EOS only
    (TRL sums the padding after it too), checked against a plain forward by hand."""
    tok = tokenizer(demo_models)
    raw = completion_ids(tok, COMPLETIONS)
    eos = tok.eos_token_id
    # By hand: each completion up to and including its first EOS, the rest padding.
    mask = torch.zeros_like(raw)
    cut = raw.clone()
    for r, row in enumerate(raw.tolist()):
        end = row.index(eos) + 1 if eos in row else len(row)
        mask[r, :end] = 1
        cut[r, end:] = tok.pad_token_id
    assert (mask == 0).any()  # padding is there to be left out

    ref = perturbed_policy(demo_models)
    beta, penalty = 0.2, 0.5
    args = config(tmp_path, reward_service, per_device_train_batch_size=4, beta=beta,
                  missing_eos_penalty=penalty)  # fmt: skip
    trainer = make_trainer(demo_models, args, PROMPTS, ref_model=ref)
    fixed_generate(trainer.model, raw)
    spy = ScoreSpy(trainer)
    trainer.compute_loss(trainer.model, {"prompt": PROMPTS})
    got = step_means(trainer)

    batch = tok(PROMPTS, padding=True, padding_side="left", add_special_tokens=False,
                return_tensors="pt")  # fmt: skip
    prompt_ids, prompt_mask = batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1)
    logps = hand_logps(trainer.model, prompt_ids, prompt_mask, cut, mask)
    ref_logps = hand_logps(ref, prompt_ids, prompt_mask, cut, mask)
    kl = ((logps - ref_logps) * mask).sum(-1)
    rewards = spy.futures[0].result().combined - penalty * (~(cut == eos).any(-1)).float()
    want = {
        "objective/kl": kl.mean().item(),
        "objective/entropy": -(logps * mask).sum(-1).mean().item(),
        "objective/non_score_reward": (-beta * kl).mean().item(),
        "objective/rlhf_reward": (rewards - beta * kl).mean().item(),
        "val/completion_length": mask.sum(-1).float().mean().item(),
    }
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-5), name
    # TRL's sums over the padding too: a different number here, so the test can tell.
    unmasked_kl = (logps - ref_logps).sum(-1).mean().item()
    assert abs(unmasked_kl - want["objective/kl"]) > 1e-2
    assert abs(-logps.sum(-1).mean().item() - want["objective/entropy"]) > 1.0


# ----------------------------------------------------------------------------- TRL defect 4


@pytest.mark.slow
def test_generation_keeps_the_kv_cache_under_gradient_checkpointing(
    demo_models: DemoModels, reward_service: str, tmp_path: Path
) -> None:
    args = config(tmp_path, reward_service, gradient_checkpointing=True)
    trainer = make_trainer(demo_models, args, PROMPTS)
    model = trainer.model
    calls: list[tuple[int, int, bool]] = []

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        cached = 0 if cache is None else cache.get_seq_length()
        calls.append((ids.shape[1], cached, module.training))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()
    assert model.is_gradient_checkpointing  # what makes TRL drop the cache
    assert trainer.sampling.generation_config.use_cache is True
    # Decoding steps feed one new token on top of the cached prompt + earlier tokens.
    decoding = [c for c in calls if c[0] == 1 and c[1] > 0]
    assert len(decoding) >= WIDTH - 2, calls
    assert not any(training for *_, training in decoding)
    # The training forward ran with checkpointing (train mode) and no cache.
    assert any(training and cached == 0 for _, cached, training in calls)
    assert math.isfinite(train_logs(trainer)[1]["loss"])


# ----------------------------------------------------------------------------- TRL defect 5


@pytest.mark.slow
def test_evaluate_reports_reward_and_win_rate(
    demo_models: DemoModels, reward_service: str, tmp_path: Path
) -> None:
    eval_prompts = [
        json.loads(line)["prompt"] for line in demo_models.eval_prompts.read_text().splitlines()
    ][:6]
    args = config(tmp_path, reward_service, per_device_eval_batch_size=4)
    trainer = make_trainer(
        demo_models, args, PROMPTS, eval_dataset=Dataset.from_dict({"prompt": eval_prompts})
    )
    metrics = trainer.evaluate()
    assert metrics["eval_samples"] == 6  # two batches, the last one short
    assert 0.0 <= metrics["eval_win_rate"] <= 1.0
    assert -1.5 < metrics["eval_reward_mean"] < 1.5  # the demo reward is in about [-1, 1]
    assert math.isfinite(metrics["eval_ref_reward_mean"])
    assert abs(metrics["eval_kl"]) < 1e-4  # the policy is still the reference
    # Fixed sampling noise: a second evaluation of the same weights says the same.
    again = trainer.evaluate()
    for key in ("eval_reward_mean", "eval_ref_reward_mean", "eval_win_rate"):
        assert again[key] == metrics[key]
    logged = [r for r in trainer.state.log_history if "eval_win_rate" in r]
    assert len(logged) == 2


# ----------------------------------------------------------------------------- TRL defect 6


@pytest.mark.parametrize(("max_new_tokens", "max_length"), [(8, 8), (9, 8), (64, 16)])
@pytest.mark.unit
def test_max_new_tokens_not_below_max_length_is_refused(
    max_new_tokens: int, max_length: int, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"max_length.*max_new_tokens"):
        config(tmp_path, "http://127.0.0.1:1", max_new_tokens=max_new_tokens,
               max_length=max_length)  # fmt: skip


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_left_truncation_keeps_log_probs_aligned(
    demo_models: DemoModels, padding_free: bool
) -> None:
    model, tok = policy(demo_models), tokenizer(demo_models)

    def logps(*args: Any) -> torch.Tensor:
        if padding_free:
            return packed_token_logps(model, pack_completions(*args[:4], 1, args[4]))
        return completion_token_logps(model, *args)

    prompts = ["the movie was", "my friends found the cast"]
    # Three columns of nothing but padding on the left.
    width = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts) + 3
    batch = tok(prompts, padding="max_length", max_length=width, padding_side="left",
                add_special_tokens=False, return_tensors="pt")  # fmt: skip
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    assert (prompt_mask[:, :3] == 0).all()
    completion = completion_ids(tok, COMPLETIONS[:2])
    mask = torch.ones_like(completion)
    mask[0, 5:] = 0  # " great and lovely .</s>" ends at its EOS
    full = logps(prompt_ids, prompt_mask, completion, mask, 512)
    plain = hand_logps(model, prompt_ids, prompt_mask, completion, mask)
    torch.testing.assert_close(full * mask, plain * mask, rtol=0, atol=1e-5)
    # Truncation that removes only the padding columns changes nothing.
    max_length = width + WIDTH - 3
    cut = logps(prompt_ids, prompt_mask, completion, mask, max_length)
    torch.testing.assert_close(cut * mask, full * mask, rtol=0, atol=1e-5)
    # Truncation down to one prompt token: the first completion token is still predicted from
    # that token (TRL's slicing shifts by one when nothing of the prompt is left).
    one = logps(prompt_ids, prompt_mask, completion, mask, WIDTH + 1)
    last = prompt_ids[:, -1:]
    want = hand_logps(model, last, torch.ones_like(last), completion, mask)
    torch.testing.assert_close(one * mask, want * mask, rtol=0, atol=1e-5)
    assert not torch.allclose(one * mask, full * mask, atol=1e-3)  # the context did change


# ----------------------------------------------------------------------------- padding-free


@pytest.mark.parametrize(("num_samples", "attention"), [(1, "sdpa"), (2, "sdpa"), (2, "eager")])
@pytest.mark.slow
def test_padding_free_log_probs_and_gradients_equal_the_padded_pass(
    demo_models: DemoModels, num_samples: int, attention: str
) -> None:
    """One packed row without padding (each prompt once for its ``num_samples`` completions)
    gives every completion the log-probs and gradients of the padded batch: prompts and
    completions of different lengths, EOS at different places; sdpa takes the packed mask as
    booleans, eager attention as additive scores."""
    tok = tokenizer(demo_models)
    batch = tok(PROMPTS * 2, padding=True, padding_side="left", add_special_tokens=False,
                return_tensors="pt")  # fmt: skip
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    assert len(set(prompt_mask.sum(-1).tolist())) > 1
    completion, mask = truncate_after_eos(
        completion_ids(tok, COMPLETIONS), [tok.eos_token_id], tok.pad_token_id
    )
    assert len(set(mask.sum(-1).tolist())) > 1
    packed = pack_completions(prompt_ids, prompt_mask, completion, mask, num_samples, 512)
    prompts_packed = prompt_mask[: 8 // num_samples].sum()  # with 2 samples, each prompt once
    assert packed.input_ids.shape[1] == prompts_packed + mask.sum()
    results = []
    for padding_free in (False, True):
        model = AutoModelForCausalLM.from_pretrained(
            demo_models.policy, attn_implementation=attention
        )
        if padding_free:
            logps = packed_token_logps(model, packed)
        else:
            logps = completion_token_logps(model, prompt_ids, prompt_mask, completion, mask, 512)
        (logps * mask).sum().backward()
        results.append((logps * mask, [p.grad for p in model.parameters()]))
    (padded, padded_grads), (packed_logps, packed_grads) = results
    torch.testing.assert_close(packed_logps, padded, rtol=0, atol=1e-5)
    want = hand_logps(policy(demo_models), prompt_ids, prompt_mask, completion, mask)
    torch.testing.assert_close(packed_logps, want * mask, rtol=0, atol=1e-5)
    scale = max(g.abs().max().item() for g in padded_grads)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_a_reference_pass_split_between_prompts_gives_the_whole_pass(
    demo_models: DemoModels, padding_free: bool
) -> None:
    """The reference's log-probs of the first prompts' samples, computed apart (as the rollout
    process does), completed with the other prompts' (as the trainer does), are those of one
    pass over the whole batch, for every split: none, some, all."""
    tok = tokenizer(demo_models)
    batch = tok(PROMPTS * 2, padding=True, padding_side="left", add_special_tokens=False,
                return_tensors="pt")  # fmt: skip
    completion, mask = truncate_after_eos(
        completion_ids(tok, COMPLETIONS), [tok.eos_token_id], tok.pad_token_id
    )
    samples = TokenRows(batch["input_ids"], batch["attention_mask"], completion, mask)
    passes, model = LogProbPass(padding_free, 512), policy(demo_models)
    whole = passes.reference_logps(model, samples, passes.pack(samples, 2))
    for first in range(len(PROMPTS) + 1):
        done = None
        if first:
            part = TokenRows.of_prompts(samples, 2, range(first))
            assert part.completion_ids.shape[0] == 2 * first
            done = passes.reference_logps(model, part, passes.pack(part, 2))
        split = passes.complete_reference(model, samples, 2, done, passes.pack(samples, 2))
        torch.testing.assert_close(split * mask, whole * mask, rtol=0, atol=1e-5)


@pytest.mark.unit
def test_prompt_rows_are_the_block_layouts_rows_of_those_prompts() -> None:
    """Of 4 prompts x 2 samples (sample k of prompt i at row 4k + i), prompts 1-2 are rows
    1, 2, 5, 6; two consecutive ranges joined give the rows back in place."""
    rows = torch.arange(8).unsqueeze(1) * 10
    assert prompt_rows(rows, 2, range(1, 3)).flatten().tolist() == [10, 20, 50, 60]
    for first in range(5):
        parts = prompt_rows(rows, 2, range(first)), prompt_rows(rows, 2, range(first, 4))
        assert torch.equal(join_prompt_rows(*parts, 2), rows)


@pytest.mark.unit
def test_packing_refuses_completions_that_do_not_share_their_prompt() -> None:
    prompts = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6]])
    completions = torch.ones(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="must share it"):
        pack_completions(prompts, torch.ones_like(prompts), completions, completions, 2, 8)
    with pytest.raises(ValueError, match="not 3 per prompt"):
        pack_completions(prompts, torch.ones_like(prompts), completions, completions, 3, 8)


@pytest.fixture(params=["prompt hidden", "sequences mixed"])
def packing_mask_ignored(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: the model drops the custom attention mask of a packed batch, as flash attention
    or an architecture without custom-mask support would. Without it, transformers builds a
    mask from the restarting position ids (a completion no longer sees its prompt), or, with
    that detection off too, a causal mask over the whole row (sequences see each other)."""
    import transformers.masking_utils
    import transformers.models.llama.modeling_llama as llama

    original = llama.create_causal_mask

    def without_custom_mask(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "attention_mask": None})

    monkeypatch.setattr(llama, "create_causal_mask", without_custom_mask)
    if request.param == "sequences mixed":
        monkeypatch.setattr(
            transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None
        )


@pytest.mark.slow
def test_padding_free_default_is_on_for_cpu_training_and_packs_once_per_step(
    demo_models: DemoModels, reward_service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU padding-free passes are the default; the reference and the policy pass share
    one packed batch per step."""
    import trainer.logprobs as logprobs_module

    packs = []
    pack = logprobs_module.pack_completions

    def counted(*args: Any) -> Any:
        packs.append(args)
        return pack(*args)

    trainer = make_trainer(demo_models, config(tmp_path, reward_service, max_steps=2), PROMPTS)
    assert trainer.logprob_pass.padding_free
    monkeypatch.setattr(logprobs_module, "pack_completions", counted)  # after the start-up check
    trainer.train()
    assert len(packs) == 2
    assert not make_trainer(
        demo_models, config(tmp_path, reward_service, padding_free=False), PROMPTS
    ).logprob_pass.padding_free


@pytest.mark.slow
def test_padding_free_stays_off_for_a_model_that_ignores_the_packed_mask(
    demo_models: DemoModels, reward_service: str, tmp_path: Path, packing_mask_ignored: None,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    with caplog.at_level("WARNING", logger="trainer.logprobs"):
        trainer = make_trainer(demo_models, config(tmp_path, reward_service), PROMPTS)
    assert not trainer.logprob_pass.padding_free
    assert "padding_free off" in caplog.text and "does not keep packed" in caplog.text
    with pytest.raises(ValueError, match="padding_free=True: LlamaForCausalLM with sdpa"):
        make_trainer(demo_models, config(tmp_path, reward_service, padding_free=True), PROMPTS)


# ----------------------------------------------------------------------------- TRL defect 7


def test_reward_service_not_listening_fails_at_start(
    demo_models: DemoModels, tmp_path: Path
) -> None:
    from trainer.service_process import free_port

    args = config(tmp_path, f"http://127.0.0.1:{free_port()}", reward_max_retries=0,
                  reward_timeout=2.0)  # fmt: skip
    with pytest.raises(RewardServiceError):
        make_trainer(demo_models, args, PROMPTS)


class FaultyService:
    """A stand-in reward service on a free loopback port: ``/info`` relays the real service's
    answer, ``/score`` answers ``status`` with the error envelope; :meth:`close` stops it
    (connections are then refused)."""

    def __init__(self, real_url: str, status: int) -> None:
        info = httpx.get(f"{real_url}/info", timeout=10).content
        self.score_requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(200, info)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.score_requests += 1
                error = {"error": {"type": "injected", "message": f"status {status}"}}
                self._answer(status, json.dumps(error).encode())

            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    ("fault", "error_type"),
    [("down", "RewardServiceUnavailable"), (503, "RewardServiceUnavailable"),
     (422, "RewardServiceError")],
)  # fmt: skip
@pytest.mark.slow
def test_failed_reward_requests_raise_instead_of_scoring_zero(
    demo_models: DemoModels, reward_service: str, tmp_path: Path, fault: str | int, error_type: str
) -> None:
    """The service stops after the trainer started, answers 503 (retried, then given up), or
    refuses the request (4xx, not retried): training stops with the error; no step is taken
    and no score is logged."""
    stub = FaultyService(reward_service, 503 if fault == "down" else int(fault))
    try:
        args = config(tmp_path, stub.url, max_steps=2, reward_max_retries=1, reward_timeout=2.0)
        trainer = make_trainer(demo_models, args, PROMPTS)
        if fault == "down":
            stub.close()
        with pytest.raises(RewardServiceError) as error:
            trainer.train()
    finally:
        if fault != "down":
            stub.close()
    assert type(error.value).__name__ == error_type
    assert stub.score_requests == {"down": 0, 503: 2, 422: 1}[fault]  # 1 retry; 4xx: none
    assert trainer.state.global_step == 0
    assert not [r for r in trainer.state.log_history if "objective/scores" in r]
    # The failed run closed the reward sources: nothing more is sent.
    with pytest.raises(RuntimeError, match="closed"):
        trainer.rewards.submit(["a"], ["b"], [[1]])


# ----------------------------------------------------------------------------- overlap


@pytest.mark.slow
def test_score_request_overlaps_the_log_prob_forwards(
    demo_models: DemoModels, reward_service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow reward service (0.3 s per request) and slower log-prob forwards (0.5 s each):
    the request is in flight while the reference and policy forwards run, so the trainer
    barely waits for it."""
    spans: dict[str, list[tuple[float, float]]] = {"score": [], "forward": []}
    forward = LogProbPass.token_logps

    def slow_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(0.5)
        out = forward(*args, **kwargs)
        spans["forward"].append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(LogProbPass, "token_logps", slow_forward)
    trainer = make_trainer(demo_models, config(tmp_path, reward_service, max_steps=2), PROMPTS)
    (client,) = trainer.rewards._clients.values()
    score = client.score

    async def slow_score(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        await asyncio.sleep(0.3)
        out = await score(*args, **kwargs)
        spans["score"].append((start, time.perf_counter()))
        return out

    client.score = slow_score  # type: ignore[method-assign]
    trainer.train()
    assert len(spans["score"]) == 2 and len(spans["forward"]) == 4
    for step, (s0, s1) in enumerate(spans["score"]):
        ref, pol = spans["forward"][2 * step : 2 * step + 2]
        assert ref[0] < s1 and s0 < pol[1]  # both forwards ran while the request was out
    logs = train_logs(trainer)
    for step in (1, 2):
        assert logs[step].keys() >= TIMING_NAMES
        # Without the overlap the trainer would wait the request's 0.3 s or more.
        assert logs[step]["time/score_wait"] < 0.25, logs[step]
        assert logs[step]["time/forward_backward"] >= 1.0


# ----------------------------------------------------------------------------- end to end


def train_prompts(demo_models: DemoModels, n: int) -> list[str]:
    lines = demo_models.train_prompts.read_text().splitlines()[:n]
    return [json.loads(line)["prompt"] for line in lines]


RESUMED = ("loss", "grad_norm", "objective/scores", "objective/kl", "rewards/margins",
           "logps/chosen")  # fmt: skip


@pytest.mark.parametrize("backend", [None, "process", "thread"], ids=["sync", "process", "thread"])
@pytest.mark.slow
def test_end_to_end_run_then_resume_reproduces_it(
    demo_models: DemoModels, reward_service: str, tmp_path: Path, backend: str | None
) -> None:
    """4 steps against the real service with every TRL metric logged; a run resumed from the
    step-2 checkpoint logs the same steps 3 and 4. In async mode the checkpoint also holds
    step 3's rollout, sampled ahead with step 2's weights (which no checkpoint has): the
    resumed run trains on it, one step stale as in the uninterrupted run."""
    prompts = train_prompts(demo_models, 16)
    mode = {"async_generation": backend is not None, "async_generation_backend": backend or "auto"}
    args = config(
        tmp_path / "full", reward_service, max_steps=4, save_strategy="steps", save_steps=2, **mode
    )
    full = make_trainer(demo_models, args, prompts)
    full.train()
    logs = train_logs(full)
    assert sorted(logs) == [1, 2, 3, 4]
    for step, record in logs.items():
        missing = (TRL_METRIC_NAMES | TIMING_NAMES) - record.keys()
        assert not missing, (step, missing)
        assert all(math.isfinite(record[k]) for k in TRL_METRIC_NAMES | {"loss"}), record
        assert -1.5 < record["objective/scores"] < 1.5
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists()
    assert (checkpoint / "async_rollouts-0.pt").exists() == (backend is not None)

    args = config(tmp_path / "resumed", reward_service, max_steps=4, save_strategy="no", **mode)
    resumed = make_trainer(demo_models, args, prompts)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    again = train_logs(resumed)  # steps 1 and 2 come from the checkpoint's state
    assert [r["step"] for r in resumed.state.log_history if "loss" in r] == [1, 2, 3, 4]
    if backend is not None:
        assert [logs[step]["async/staleness"] for step in (1, 2, 3, 4)] == [0, 1, 1, 1]
        assert [again[step]["async/staleness"] for step in (3, 4)] == [1, 1]
    for step in (3, 4):
        for key in RESUMED:
            assert again[step][key] == pytest.approx(logs[step][key], rel=1e-5, abs=1e-5), (
                step, key,
            )  # fmt: skip


@pytest.mark.slow
def test_conversational_prompts(
    demo_models: DemoModels, reward_service: str, tmp_path: Path
) -> None:
    """Message lists go through the policy's chat template for sampling and reach the service
    as messages (it applies the reward tokenizer's own template)."""
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    trainer = make_trainer(demo_models, config(tmp_path, reward_service, max_steps=2), prompts)
    spy = ScoreSpy(trainer)
    trainer.train()
    assert len(spy.items) == 2
    for item in spy.items[0]:
        assert item["prompt"] in prompts
        assert item["completion"] == item["completion"].strip()
    logs = train_logs(trainer)
    assert all(math.isfinite(logs[s]["loss"]) for s in (1, 2))
    # The policy learned to write reviews after "<|assistant|>": the scores are spread.
    scores = torch.cat([f.result().combined for f in spy.futures])
    assert scores.std() > 0


@pytest.mark.slow
def test_four_samples_per_prompt_with_tied_pairs_skipped(
    demo_models: DemoModels, reward_service: str, tmp_path: Path
) -> None:
    args = config(
        tmp_path, reward_service, max_steps=2, num_samples_per_prompt=4, skip_tied_pairs=True
    )
    trainer = make_trainer(demo_models, args, PROMPTS)
    spy = ScoreSpy(trainer)
    trainer.train()
    assert [len(items) for items in spy.items] == [8, 8]  # 4 samples x 2 prompts per step
    for items in spy.items:  # block layout: sample k of prompt i at k·B + i
        assert [i["prompt"] for i in items[:2]] * 4 == [i["prompt"] for i in items]
    logs = train_logs(trainer)
    for step in (1, 2):
        assert math.isfinite(logs[step]["loss"])
        assert 0.0 <= logs[step]["val/tied_pairs"] <= 1.0
        assert logs[step]["objective/scores_margin"] >= 0  # best minus worst


def test_skip_tied_pairs_leaves_tied_pairs_out_of_the_loss(
    demo_models: DemoModels, reward_service: str, tmp_path: Path
) -> None:
    """Prompt 3's two samples are equal (a tie, log-ratio 0, loss log 2): the mean over the
    other 3 pairs when skipped, over all 4 when not."""
    args = config(tmp_path, reward_service, per_device_train_batch_size=4)
    trainer = make_trainer(demo_models, args, PROMPTS, ref_model=perturbed_policy(demo_models))
    fixed_generate(trainer.model, completion_ids(trainer.processing_class, COMPLETIONS))
    with torch.no_grad():
        kept_all = trainer.compute_loss(trainer.model, {"prompt": PROMPTS}).item()
        trainer.args.skip_tied_pairs = True
        skipped = trainer.compute_loss(trainer.model, {"prompt": PROMPTS}).item()
    assert step_means(trainer)["val/tied_pairs"] == 0.25
    assert 4 * kept_all == pytest.approx(3 * skipped + math.log(2), abs=1e-5)


@pytest.mark.parametrize("async_generation", [False, True])
@pytest.mark.slow
def test_peft_reference_is_the_base_with_the_adapter_disabled(
    demo_models: DemoModels, reward_service: str, tmp_path: Path, async_generation: bool
) -> None:
    """Also in async mode, where a copy of the PEFT model samples in the rollout process."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")  # fmt: skip
    args = config(tmp_path, reward_service, max_steps=2, learning_rate=1e-2,
                  async_generation=async_generation)  # fmt: skip
    trainer = make_trainer(demo_models, args, PROMPTS, peft_config=lora)
    assert trainer.ref_model is None  # no second copy of the weights
    base = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora" not in k}
    trainer.train()
    logs = train_logs(trainer)
    # Step 1: the adapter starts as a no-op, so policy == reference: log-ratios 0, loss log 2.
    assert abs(logs[1]["objective/kl"]) < 1e-5
    assert logs[1]["rewards/chosen"] == logs[1]["rewards/rejected"] == 0.0
    assert logs[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # Step 2: the adapter moved, the reference (adapter off) did not: log-ratios are not 0.
    assert abs(logs[2]["rewards/chosen"]) > 1e-6 and abs(logs[2]["rewards/rejected"]) > 1e-6
    for name, param in trainer.model.named_parameters():
        if "lora" not in name:
            assert torch.equal(param, base[name]), name


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": [0.1, -1.0]}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"loss_type": "hinge"}, "loss_type"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty"),
        ({"num_samples_per_prompt": 1}, "num_samples_per_prompt"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"reward_timeout": 0.0}, "reward_timeout"),
        ({"reward_max_retries": -1}, "reward_max_retries"),
        ({"async_generation_backend": "gpu"}, "async_generation_backend"),
        ({"async_trainer_num_threads": 0}, "async_trainer_num_threads"),
        ({"padding_free": "sometimes"}, "padding_free"),
        ({"reward_url": "ftp://example"}, "reward_url"),
    ],
)
@pytest.mark.unit
def test_bad_config_values_name_the_field(
    tmp_path: Path, overrides: dict[str, Any], field: str
) -> None:
    url = overrides.pop("reward_url", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match=field):
        config(tmp_path, url, **overrides)


def test_model_init_kwargs_with_a_model_object_are_refused(
    demo_models: DemoModels, tmp_path: Path
) -> None:
    """As in TRL: the kwargs apply to a model loaded by name, so with a model object they
    would silently do nothing."""
    args = config(tmp_path, "http://127.0.0.1:1", model_init_kwargs={"dtype": "bfloat16"})
    with pytest.raises(ValueError, match="model_init_kwargs apply only when model is a name"):
        make_trainer(demo_models, args, PROMPTS)


def test_model_init_kwargs_reach_from_pretrained(demo_models: DemoModels, tmp_path: Path) -> None:
    from trainer.models import load_causal_lm

    kwargs = {"dtype": "bfloat16", "attn_implementation": "eager"}
    args = config(tmp_path, None, model_init_kwargs=kwargs)
    model = load_causal_lm(str(demo_models.policy), args, "model")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match=r"model '/no/such/model': cannot load the model"):
        load_causal_lm("/no/such/model", config(tmp_path, None), "model")


@pytest.mark.unit
def test_trainer_without_reward_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reward_url"):
        OnlineDPOTrainer("unused/path", args=config(tmp_path, None), processing_class=object(),
                         train_dataset=Dataset.from_dict({"prompt": PROMPTS}))  # fmt: skip


@pytest.mark.unit
def test_async_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` picks the rollout process only for CPU training on Linux without sharded
    weights; asking for the process elsewhere is refused at construction, naming the field."""
    from accelerate.utils import DistributedType

    from trainer.rollouts import resolve_async_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_async_backend("auto", cpu, DistributedType.NO) == "process"
    assert resolve_async_backend("auto", cpu, DistributedType.MULTI_CPU) == "process"
    assert resolve_async_backend("auto", cpu, DistributedType.FSDP) == "thread"
    assert resolve_async_backend("auto", cuda, DistributedType.NO) == "thread"
    assert resolve_async_backend("thread", cuda, DistributedType.NO) == "thread"
    with pytest.raises(ValueError, match="async_generation_backend='process'"):
        resolve_async_backend("process", cuda, DistributedType.NO)
    with pytest.raises(ValueError, match="async_generation_backend='process'"):
        resolve_async_backend("process", cpu, DistributedType.DEEPSPEED)
    monkeypatch.setattr(sys, "platform", "darwin")  # no safe fork: no rollout process
    assert resolve_async_backend("auto", cpu, DistributedType.NO) == "thread"
    with pytest.raises(ValueError, match="darwin"):
        resolve_async_backend("process", cpu, DistributedType.NO)


@pytest.mark.slow
def test_cancelling_the_async_queue_waits_for_a_rollout_being_sampled() -> None:
    """A queued rollout is cancelled; one already being sampled is waited for: with the
    process backend it reads the trainer's weights, which the next optimizer step changes."""
    from concurrent.futures import ThreadPoolExecutor

    from trainer.rollouts import AsyncRollouts

    started, release = threading.Event(), threading.Event()

    def sample() -> str:
        started.set()
        release.wait(5)
        return "rollout"

    with ThreadPoolExecutor(max_workers=1) as pool:
        running, queued = pool.submit(sample), pool.submit(sample)
        assert started.wait(5)
        rollouts = AsyncRollouts("thread", None, 2, None)  # type: ignore[arg-type]
        rollouts._pending.extend([([], running), ([], queued)])  # type: ignore[list-item]
        threading.Timer(0.3, release.set).start()
        rollouts.cancel()
        assert running.done() and running.result() == "rollout"
        assert queued.cancelled()
        assert rollouts.take([]) is None  # nothing left to take


# ----------------------------------------------------------------------------- API surface

# The Trainer methods this trainer overrides, with their parameters in transformers 5.x. The
# private ones carry no stability promise (hence transformers < 6 in pyproject.toml).
OVERRIDDEN = {
    "_save_checkpoint": ["self", "model", "trial"],
    "_get_output_dir": ["self", "trial"],
    "_push_from_checkpoint": ["self", "checkpoint_folder"],
    "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
    "training_step": ["self", "model", "inputs", "num_items_in_batch"],
    "get_batch_samples": ["self", "epoch_iterator", "num_batches", "device"],
    "train": ["self", "resume_from_checkpoint", "trial", "ignore_keys_for_eval"],
    "log": ["self", "logs", "start_time"],
    "evaluate": ["self", "eval_dataset", "ignore_keys", "metric_key_prefix"],
}


@pytest.mark.unit
def test_trainer_methods_we_override_keep_their_shape() -> None:
    """Fails loudly when a transformers release changes a ``Trainer`` method this trainer
    overrides or relies on: its parameters, how ``_save_checkpoint`` finds its folder and
    pushes (the atomic save redirects both), how ``training_step`` hands its inputs to
    ``compute_loss`` (the rollout rides in them), and the loss-scaling switch."""
    import inspect

    from transformers import Trainer

    overridden = {
        name
        for cls in OnlineDPOTrainer.__mro__
        if cls is not Trainer and issubclass(cls, Trainer)
        for name, value in vars(cls).items()
        if callable(value) and hasattr(Trainer, name) and name != "__init__"
    }
    assert overridden == set(OVERRIDDEN), "list a new override here, with its parameters"
    for name, parameters in OVERRIDDEN.items():
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == parameters, name
    save = inspect.getsource(Trainer._save_checkpoint)
    assert "run_dir = self._get_output_dir(trial=trial)" in save
    assert "self._push_from_checkpoint(output_dir)" in save
    step = inspect.getsource(Trainer.training_step)
    assert "inputs = self._prepare_inputs(inputs)" in step
    assert "self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)" in step
    assert "if self.loss_is_scaled_for_ga is not None:" in step


@pytest.mark.slow
def test_package_exports_the_trainer_and_imports_cheaply() -> None:
    """``from trainer import OnlineDPOTrainer, OnlineDPOConfig`` works, and ``import trainer``
    alone loads neither torch nor transformers (the CLI parses its flags first)."""
    code = (
        "import sys, trainer\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from trainer import OnlineDPOConfig, OnlineDPOTrainer\n"
        "from trainer.trainer import OnlineDPOTrainer as T\n"
        "assert OnlineDPOTrainer is T and OnlineDPOConfig.__name__ == 'OnlineDPOConfig'\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
