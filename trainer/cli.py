"""The ``online-dpo`` command: ``train``, ``demo`` and ``build-demo-models``.

``online-dpo train --config run.yaml [--field value ...]`` parses :class:`ScriptArguments`,
:class:`ModelArguments` and :class:`~trainer.config.OnlineDPOConfig` with
``transformers.HfArgumentParser``. As in TRL's ``TrlParser``, the YAML file's values replace
the dataclass defaults and command-line flags override both; an ``env:`` mapping in the YAML
sets environment variables. Also runs as ``python -m trainer`` and under
``accelerate launch -m trainer.cli train ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from transformers import HfArgumentParser

from trainer.config import OnlineDPOConfig

PROG = "online-dpo"
DEFAULT_POLICY_STEPS = 500


class CliError(Exception):
    """A bad command-line or config value: reported as one line, exit code 2."""


@dataclass
class ScriptArguments:
    """Which prompts to train and evaluate on (names as in TRL's ``ScriptArguments``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompt dataset with a 'prompt' column: a Hub name, or a local "
            "json/jsonl/parquet/csv file or directory (splits from file names)."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration name."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Evaluation split, used when eval_strategy != 'no'."}
    )


@dataclass
class ModelArguments:
    """The policy, optional reference and LoRA settings (names as in TRL's ``ModelConfig``)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy model: a local directory or a Hub name."}
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model; default: a frozen copy of the policy."},
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Weights dtype."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter (needs peft)."})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt; default: peft's per-model choice."}
    )


class _ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are one line, not the usage of ~200 fields."""

    def error(self, message: str) -> NoReturn:
        raise CliError(message)


def build_parser() -> HfArgumentParser:
    return _ArgumentParser((ScriptArguments, ModelArguments, OnlineDPOConfig), prog=f"{PROG} train")


def _pop_config_path(argv: list[str]) -> str | None:
    """Remove ``--config PATH`` / ``--config=PATH`` from ``argv`` and return PATH."""
    paths = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise CliError("argument --config: expected a YAML file path")
            paths.append(argv[i + 1])
            del argv[i : i + 2]
        elif argv[i].startswith("--config="):
            paths.append(argv.pop(i).split("=", 1)[1])
        else:
            i += 1
    if len(paths) > 1:
        raise CliError(f"argument --config: given {len(paths)} times; merge the YAML files")
    return paths[0] if paths else None


def apply_yaml_defaults(parser: argparse.ArgumentParser, config_path: str) -> None:
    """Make the YAML file's values the parser's defaults (so flags still override them)."""
    try:
        config = yaml.safe_load(Path(config_path).read_text())
    except OSError as e:
        raise CliError(f"--config {config_path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise CliError(f"--config {config_path}: invalid YAML: {e}") from e
    if config is None:
        return
    if not isinstance(config, dict):
        raise CliError(f"--config {config_path}: must be a YAML mapping of field: value")
    env = config.pop("env", {}) or {}
    if not isinstance(env, dict):
        raise CliError(f"--config {config_path}: 'env' must be a mapping of NAME: value")
    for name, value in env.items():
        os.environ[str(name)] = str(value)
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    unknown = sorted(set(config) - set(actions))
    if unknown:
        raise CliError(f"--config {config_path}: unknown field(s): {', '.join(unknown)}")
    for name, value in config.items():
        action = actions[name]
        # A single YAML value for a list field (e.g. `beta: 0.1`) means a one-item list.
        if action.nargs == "+" and value is not None and not isinstance(value, list):
            value = [value]
        # argparse converts string defaults with the field's type, so "2e-4" becomes a float
        # and a bad string fails with the field's name, as a flag would.
        action.default = value
        action.required = False


def parse_train_args(
    argv: Sequence[str],
) -> tuple[ScriptArguments, ModelArguments, OnlineDPOConfig]:
    """Parse ``train`` arguments: YAML (``--config``) defaults, then command-line flags."""
    argv = list(argv)
    parser = build_parser()
    config_path = _pop_config_path(argv)
    if config_path is not None:
        apply_yaml_defaults(parser, config_path)
    try:
        script_args, model_args, training_args, unknown = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as e:
        # Raised by the dataclasses' __post_init__ validation (TrainingArguments, OnlineDPOConfig).
        raise CliError(str(e)) from e
    if unknown:
        raise CliError(f"unrecognized arguments: {' '.join(unknown)}")
    if not model_args.model_name_or_path:
        raise CliError("model_name_or_path is required (in the YAML or as --model_name_or_path)")
    if not script_args.dataset_name:
        raise CliError("dataset_name is required (in the YAML or as --dataset_name)")
    return script_args, model_args, training_args


def _peft_config(model_args: ModelArguments) -> Any:
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise CliError("use_peft needs peft: pip install 'online-dpo-service[peft]'") from e
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        task_type="CAUSAL_LM",
    )


def run_train(argv: Sequence[str]) -> int:
    """``online-dpo train``: build the trainer from the parsed config, train, save, evaluate."""
    # Parse first: a bad value fails in a second, before the heavy imports.
    script_args, model_args, training_args = parse_train_args(argv)
    _configure_logging()
    from transformers import AutoTokenizer
    from transformers.trainer_utils import IntervalStrategy

    from common.client import RewardServiceError
    from trainer.callbacks import MetricsJsonlCallback, RewardCurveCallback
    from trainer.data import load_prompt_dataset
    from trainer.trainer import OnlineDPOTrainer

    evaluating = training_args.eval_strategy != IntervalStrategy.NO
    try:
        train_dataset = load_prompt_dataset(
            script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config
        )
        eval_dataset = (
            load_prompt_dataset(
                script_args.dataset_name,
                script_args.dataset_test_split,
                script_args.dataset_config,
            )
            if evaluating
            else None
        )
    except ValueError as e:
        raise CliError(f"dataset_name: {e}") from e
    # The models are loaded by the trainer, by name, with ModelArguments' revision and dtype
    # unless model_init_kwargs sets them.
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    # Prompts are left-padded for generation, as TRL's scripts set it.
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            revision=training_args.model_init_kwargs["revision"],
            trust_remote_code=training_args.trust_remote_code,
            padding_side="left",
        )
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CliError(
            f"model_name_or_path {model_args.model_name_or_path!r}: cannot load the tokenizer: "
            f"{reason}"
        ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        trainer = OnlineDPOTrainer(
            model=model_args.model_name_or_path,
            ref_model=model_args.ref_model_name_or_path,
            args=training_args,
            processing_class=tokenizer,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=_peft_config(model_args) if model_args.use_peft else None,
            callbacks=[MetricsJsonlCallback(), RewardCurveCallback()],
        )
    except ValueError as e:
        raise CliError(str(e)) from e
    except RewardServiceError as e:  # checked at start: not reachable, wrong key, ...
        raise CliError(f"reward_url: {e}") from e
    resume = training_args.resume_from_checkpoint
    with trainer:
        # "true"/"last" resume from the newest checkpoint in output_dir, as Trainer.train(True).
        trainer.train(resume_from_checkpoint=True if resume in ("true", "last") else resume)
        trainer.save_model(training_args.output_dir)
        # Trainer has already evaluated the final weights when eval_steps divides the run.
        step = trainer.state.global_step
        evaluated = any(
            "eval_reward_mean" in log and log.get("step") == step
            for log in trainer.state.log_history
        )
        if evaluating and not evaluated:
            trainer.evaluate()
    return 0


def _demo_parser(sub: Any) -> None:
    from trainer.demo import add_demo_arguments

    add_demo_arguments(
        sub.add_parser(
            "demo",
            help="train the built-in tiny policy against a local reward service and show "
            "the reward before/after",
        )
    )


def _configure_logging() -> None:
    """Our loggers (reward model identity, redeploy events, retries) at INFO on stderr; the
    per-request lines of httpx stay quiet."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("trainer", "common"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _demo_models_into(out: Path, policy_steps: int) -> Any:
    """The demo models in ``out``: copied from the cache when built with the default steps."""
    import shutil

    from common.demo_models import DemoModels, build_demo_models, ensure_demo_models

    if policy_steps != DEFAULT_POLICY_STEPS:
        return build_demo_models(out, policy_steps=policy_steps)
    cached = ensure_demo_models()
    shutil.copytree(cached.root, out, dirs_exist_ok=True)
    return DemoModels.at(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``online-dpo`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:
            return run_train(argv[1:])
        parser = argparse.ArgumentParser(
            prog=PROG, description="Online DPO with the reward model behind an HTTP service."
        )
        sub = parser.add_subparsers(dest="command", required=True)
        sub.add_parser(
            "train",
            add_help=False,
            help="train from a YAML config plus flag overrides "
            "(`online-dpo train --help` lists every field)",
        )
        _demo_parser(sub)
        build = sub.add_parser(
            "build-demo-models", help="build the built-in tiny policy/reward models and prompts"
        )
        build.add_argument("--out", required=True, type=Path, help="output directory")
        build.add_argument(
            "--policy-steps",
            type=int,
            default=DEFAULT_POLICY_STEPS,
            help="policy pre-training steps (fewer: faster build, less fluent policy)",
        )
        args = parser.parse_args(argv)
        if args.command == "build-demo-models":
            if args.policy_steps < 1:
                raise CliError(f"--policy-steps must be >= 1, got {args.policy_steps}")
            paths = _demo_models_into(args.out, args.policy_steps)
            print(f"policy:        {paths.policy}")
            print(f"reward:        {paths.reward}")
            print(f"reward_alt:    {paths.reward_alt}")
            print(f"train prompts: {paths.train_prompts}")
            print(f"eval prompts:  {paths.eval_prompts}")
            return 0
        from trainer.demo import options_from_args, run_demo

        options = options_from_args(args)
        try:
            options.validate()
        except ValueError as e:
            raise CliError(str(e)) from e
        run_demo(options)
        return 0
    except CliError as e:
        # One line, however the underlying library formatted its message.
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
