"""Configuration of :class:`~trainer.trainer.OnlineDPOTrainer` (TRL's field names and defaults)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from common.client import DEFAULT_MAX_RETRIES, split_urls
from trainer.reward_specs import MODEL_CHANGE_POLICIES, check_reward_config, import_path_of

API_KEY_ENV = "REWARD_API_KEY"
_REDACTED = "<REWARD_API_KEY>"


@dataclass
class OnlineDPOConfig(TrainingArguments):
    r"""Configuration of :class:`~trainer.trainer.OnlineDPOTrainer`.

    Subclasses :class:`transformers.TrainingArguments`, so every training argument (batch size,
    schedule, checkpoints, ``report_to``, ...) is set here too. Fields shared with TRL's
    ``OnlineDPOConfig`` keep TRL's names and defaults; the ``reward_*`` fields replace TRL's
    in-process reward model with the reward service.

    Parameters:
        max_new_tokens (`int`, defaults to `64`):
            Maximum number of tokens to generate per completion.
        max_length (`int`, defaults to `512`):
            Maximum length of prompt + completion in the log-prob forward pass; longer prompts
            lose their leftmost tokens. Must exceed ``max_new_tokens`` so at least one prompt
            token always stays (TRL misaligns log-probs when none does).
        temperature (`float`, defaults to `0.9`):
            Sampling temperature. Log-probs for the loss are taken at temperature 1, as in TRL.
        top_p (`float`, defaults to `1.0`):
            Nucleus sampling threshold, in (0, 1].
        top_k (`int`, defaults to `0`):
            Top-k filtering; 0 disables it.
        min_p (`float`, *optional*):
            Minimum token probability relative to the most likely token, in [0, 1].
        repetition_penalty (`float`, defaults to `1.0`):
            Penalty on tokens already in the prompt or the completion (> 0; 1.0 is none).
        generation_kwargs (`dict`, *optional*):
            Extra :class:`transformers.GenerationConfig` arguments; they override the above.
        missing_eos_penalty (`float`, *optional*):
            Subtracted from the reward of completions that end without EOS, before pairing.
        beta (`float` or `list[float]`, defaults to `0.1`):
            KL strength (τ for IPO). A list gives one value per epoch; the last one holds after
            the list ends.
        loss_type (`str`, defaults to `"sigmoid"`):
            ``"sigmoid"`` (DPO) or ``"ipo"``.
        disable_dropout (`bool`, defaults to `True`):
            Set every dropout probability of the policy and reference to 0.
        num_samples_per_prompt (`int`, defaults to `2`):
            Completions sampled per prompt. The pair is the best and the worst of them; with 2
            this is TRL's rule (the higher reward is chosen, ties go to the first sample).
        skip_tied_pairs (`bool`, defaults to `False`):
            Leave pairs whose two rewards are equal out of the loss (they carry no preference).
        padding_free (`bool`, *optional*):
            Run the log-prob forward passes without padding: the batch packed into one row,
            each prompt once for its ``num_samples_per_prompt`` completions, with an attention
            mask that lets each completion see only its prompt and itself. The same log-probs
            for less compute and memory. Attention then spans the packed row (its cost is the
            square of the batch's token count), and the model must take a custom mask (sdpa
            or eager attention; not flash attention). ``None`` turns it on for CPU training.
            A model that does not keep packed sequences apart is caught at start: packing
            stays off (with a warning), or ``True`` is refused.
        async_generation (`bool`, defaults to `False`):
            Generate and score the next batch with the weights of the step before while this
            batch is trained ("Asynchronous RLHF", Noukhovitch et al. 2024): at most one step
            off-policy; the staleness is logged as ``async/staleness``. The thread backend
            holds one extra copy of the policy for sampling; the process backend none.
        async_generation_backend (`str`, defaults to `"auto"`):
            Where async sampling runs: ``"process"`` (a process forked from the trainer that
            samples with the trainer's weights, moved into shared memory; CPU training on
            Linux only; it samples on one intra-op thread), ``"thread"`` (a thread of the
            trainer with its own copy of the policy: shares the trainer's GIL, so on CPU the
            two mostly take turns), or ``"auto"`` (process on Linux CPU without
            DeepSpeed/FSDP, thread otherwise).
        async_trainer_num_threads (`int`, *optional*):
            Intra-op threads of the trainer while the rollout process (``"process"`` backend)
            samples beside it on its one thread. ``None``: torch's threads
            (``torch.get_num_threads()``, one per core by default) less one, at least one,
            so that the two use each core once. The trainer gets its threads back after
            ``train()``.
        reward_url (`list[str]`):
            Base URL of the reward service; several (a list, or comma-separated) are used with
            least-outstanding-requests routing and failover.
        reward_api_key (`str`, *optional*):
            API key of the reward service; defaults to the ``REWARD_API_KEY`` environment
            variable. Never saved with the arguments (checkpoints, logs).
        reward_timeout (`float`, defaults to `30.0`):
            Seconds one ``/score`` attempt may take.
        reward_max_retries (`int`, defaults to `12`):
            Retries of a request on connection errors, 429 and 5xx (with exponential backoff
            and jitter, about 80 s in all, enough for a redeploy). 4xx answers fail at once.
        model_init_kwargs (`dict`, *optional*):
            Keyword arguments of ``AutoModelForCausalLM.from_pretrained`` for a policy or
            reference given by name or path, e.g. ``{"dtype": "bfloat16", "attn_implementation":
            "sdpa", "revision": "main"}``. A JSON string on the command line. Refused with a
            model object (it would not apply).
        trust_remote_code (`bool`, defaults to `False`):
            Allow a model given by name or path to run the Python code it ships (``auto_map``).
        reward_funcs (`list`, *optional*):
            Several reward sources, combined per sample (TRL's name). Each entry is a reward
            service URL (replicas of one service as a list, or comma-separated), the import
            path of a reward function (``package.module:function``), or, from Python, a
            callable. Functions take TRL's arguments ``prompts``, ``completions``,
            ``completion_ids``, ``trainer_state`` and every dataset column but ``prompt`` by
            name, and return one ``float`` or ``None`` ("does not apply") per completion;
            ``async def`` works too. Give either this or ``reward_url``.
        reward_weights (`list[float]`, *optional*):
            One weight per reward source; the reward is the weighted sum over the sources
            that apply (all 1.0 by default).
        reward_model_change (`str`, defaults to `"warn"`):
            What a reward service that starts serving other weights mid-run does: ``"warn"``
            logs and counts it, ``"stop"`` saves a checkpoint and stops the run.
        log_completions (`bool`, defaults to `False`):
            At each logging step, append the step's prompts, completions, rewards and pairs
            to ``OUTPUT_DIR/completions.jsonl``, print a table, and log it to W&B / Trackio
            when they are in ``report_to``.
        num_completions_to_print (`int`, *optional*):
            Completions in the printed table (all when unset).
    """

    learning_rate: float = field(
        default=5e-7, metadata={"help": "The initial learning rate for AdamW."}
    )
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every X updates steps (an integer, or a ratio of the total)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep dataset columns: prompts are tokenized by the trainer."},
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "Maximum number of tokens to generate per completion."}
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Maximum prompt + completion length in the log-prob forward pass."},
    )
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold, (0, 1]."})
    top_k: int = field(default=0, metadata={"help": "Top-k filtering (0: off)."})
    min_p: float | None = field(
        default=None, metadata={"help": "Minimum token probability relative to the top token."}
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Repetition penalty (1.0: none)."}
    )
    generation_kwargs: dict | None = field(
        default=None, metadata={"help": "Extra GenerationConfig arguments (override the above)."}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the reward of completions without EOS."}
    )
    beta: list[float] = field(
        default_factory=lambda: [0.1],
        metadata={"help": "KL strength; a list gives one value per epoch (the last one holds)."},
    )
    loss_type: str = field(
        default="sigmoid", metadata={"help": "Loss type.", "choices": ["sigmoid", "ipo"]}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Disable dropout in the policy and reference."}
    )
    num_samples_per_prompt: int = field(
        default=2, metadata={"help": "Completions per prompt; the pair is best vs worst."}
    )
    skip_tied_pairs: bool = field(
        default=False, metadata={"help": "Leave pairs with equal rewards out of the loss."}
    )
    padding_free: bool | None = field(
        default=None,
        metadata={"help": "Log-prob passes without padding, prompts shared (default: on for CPU)."},
    )
    async_generation: bool = field(
        default=False,
        metadata={"help": "Generate/score the next batch while this one trains (1 step stale)."},
    )
    async_generation_backend: str = field(
        default="auto",
        metadata={
            "help": "Async sampling in a 'process' (Linux CPU), a 'thread', or 'auto'.",
            "choices": ["auto", "process", "thread"],
        },
    )
    async_trainer_num_threads: int | None = field(
        default=None,
        metadata={
            "help": "Trainer's intra-op threads beside the rollout process (default: torch's - 1)."
        },
    )
    reward_url: list[str] | None = field(
        default=None,
        metadata={"help": "Reward service base URL(s); several for replicas (comma-separated)."},
    )
    reward_api_key: str | None = field(
        default=None, metadata={"help": f"Reward service API key (default: ${API_KEY_ENV})."}
    )
    reward_timeout: float = field(
        default=30.0, metadata={"help": "Seconds one /score attempt may take."}
    )
    reward_max_retries: int = field(
        default=DEFAULT_MAX_RETRIES,
        metadata={"help": "Retries on connection errors, 429 and 5xx."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "from_pretrained keyword arguments for a policy/reference given by name, "
            'as JSON, e.g. \'{"dtype": "bfloat16", "attn_implementation": "sdpa"}\'.'
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow a model given by name to run the code it ships (auto_map)."},
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward sources: service URLs (replicas comma-separated) and/or reward "
            "function import paths (package.module:function)."
        },
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward source (default: all 1.0)."}
    )
    reward_model_change: str = field(
        default="warn",
        metadata={
            "help": "When a reward model is redeployed mid-run: 'warn' or 'stop' (checkpoint).",
            "choices": ["warn", "stop"],
        },
    )
    log_completions: bool = field(
        default=False,
        metadata={"help": "Log prompts, completions and rewards at each logging step."},
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Completions in the printed table (default: all)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.beta, int | float):
            self.beta = [float(self.beta)]
        if self.reward_url is not None:
            urls = self.reward_url
            try:
                self.reward_url = split_urls(urls if isinstance(urls, str) else " ".join(urls))
            except ValueError as e:
                raise ValueError(f"reward_url: {e}") from e
        if self.reward_api_key is None:
            self.reward_api_key = os.environ.get(API_KEY_ENV) or None
        if isinstance(self.model_init_kwargs, str):
            try:
                self.model_init_kwargs = json.loads(self.model_init_kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"model_init_kwargs must be a JSON object, got {self.model_init_kwargs!r} ({e})"
                ) from e
        if isinstance(self.reward_funcs, str) or callable(self.reward_funcs):
            self.reward_funcs = [self.reward_funcs]
        if self.reward_funcs or self.reward_weights is not None:
            # Imports the functions and checks their signatures: fails before models load.
            check_reward_config(
                self.reward_funcs, self.reward_url, self.reward_weights, self.reward_model_change
            )
        self._validate()
        super().__post_init__()
        if len(self.beta) == 1:
            self.beta = self.beta[0]

    def _validate(self) -> None:
        def require(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        if self.max_new_tokens >= self.max_length:
            raise ValueError(
                f"max_length ({self.max_length}) must be greater than max_new_tokens "
                f"({self.max_new_tokens}): the log-prob pass must keep at least one prompt token"
            )
        require(self.temperature > 0 and math.isfinite(self.temperature), "temperature", "> 0")
        require(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        require(self.top_k >= 0, "top_k", ">= 0")
        require(self.min_p is None or 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        require(self.repetition_penalty > 0, "repetition_penalty", "> 0")
        require(
            self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
            "missing_eos_penalty",
            ">= 0",
        )
        require(
            len(self.beta) > 0 and all(b > 0 and math.isfinite(b) for b in self.beta),
            "beta",
            "> 0 (one value, or one per epoch)",
        )
        require(self.loss_type in ("sigmoid", "ipo"), "loss_type", "'sigmoid' or 'ipo'")
        require(self.num_samples_per_prompt >= 2, "num_samples_per_prompt", ">= 2")
        require(
            self.padding_free is None or isinstance(self.padding_free, bool),
            "padding_free",
            "true, false or unset",
        )
        require(
            self.async_generation_backend in ("auto", "process", "thread"),
            "async_generation_backend",
            "'auto', 'process' or 'thread'",
        )
        require(
            self.async_trainer_num_threads is None or self.async_trainer_num_threads >= 1,
            "async_trainer_num_threads",
            ">= 1 (or unset)",
        )
        require(self.reward_timeout > 0, "reward_timeout", "> 0")
        require(self.reward_max_retries >= 0, "reward_max_retries", ">= 0")
        require(
            self.reward_model_change in MODEL_CHANGE_POLICIES,
            "reward_model_change",
            "'warn' or 'stop'",
        )
        require(
            self.num_completions_to_print is None or self.num_completions_to_print >= 1,
            "num_completions_to_print",
            ">= 1 or unset",
        )
        require(
            self.model_init_kwargs is None or isinstance(self.model_init_kwargs, dict),
            "model_init_kwargs",
            "a mapping of from_pretrained arguments",
        )

    def to_dict(self) -> dict[str, Any]:
        """As ``TrainingArguments.to_dict``, with the API key redacted (logs, ``report_to``)."""
        d = super().to_dict()
        if d.get("reward_funcs"):
            d["reward_funcs"] = _importable(d["reward_funcs"])
        if d.get("reward_api_key"):
            d["reward_api_key"] = _REDACTED
        return d

    def __str__(self) -> str:
        fields = "".join(f"{k}={v},\n" for k, v in sorted(self.to_dict().items()))
        return f"{type(self).__name__}(\n{fields})"

    __repr__ = __str__

    def __getstate__(self) -> dict[str, Any]:
        # Trainer pickles the arguments into every checkpoint (training_args.bin): no secret.
        state = self.__dict__.copy()
        state["reward_api_key"] = None
        if state.get("reward_funcs"):  # callables as their import paths (a lambda has none)
            state["reward_funcs"] = _importable(state["reward_funcs"])
        return state


def _importable(entries: list[Any]) -> list[Any]:
    """``reward_funcs`` with callables written as ``module:qualname`` (JSON, pickle)."""
    return [import_path_of(e) if callable(e) else e for e in entries]
