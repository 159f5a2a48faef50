"""Policies the trainer benchmarks train: the demo's, and random-init Llamas of realistic size.

The demo policy (0.93 M parameters) is so small that per-op overhead dominates its step; the
``4m`` and ``25m`` policies are Llama configs with the demo tokenizer and random weights, built
at run time (seconds), so that the step's cost is the model's arithmetic as it is for real
policies. Their shape follows common small Llamas: MLP width 4x the hidden size, 64-dimensional
heads, tied embeddings. Each size has the batch shape it is benchmarked with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PolicySize:
    """A benchmarked policy: its shape (``None``: the trained demo policy) and batch."""

    hidden: int | None
    layers: int | None
    batch_size: int  # prompts per step (2 samples each)
    max_new_tokens: int
    about: str


POLICIES: dict[str, PolicySize] = {
    "demo": PolicySize(None, None, 16, 16, "the demo policy: h128 x 4 layers, 0.92 M"),
    "4m": PolicySize(256, 4, 8, 32, "random init: h256 x 4 layers, MLP 1024, 4 heads, 4.3 M"),
    "25m": PolicySize(512, 6, 8, 32, "random init: h512 x 6 layers, MLP 2048, 8 heads, 25.4 M"),
}
HEAD_DIM = 64


def build_policy(name: str, demo_policy: Path, out: Path) -> Path:
    """The policy ``name`` as a directory ``from_pretrained`` loads: the demo policy itself,
    or a random-init Llama (seed 0) with the demo tokenizer, saved under ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    size = POLICIES[name]
    if size.hidden is None or size.layers is None:
        return demo_policy
    config = AutoConfig.from_pretrained(demo_policy)
    config.hidden_size, config.intermediate_size = size.hidden, 4 * size.hidden
    config.num_hidden_layers = size.layers
    config.num_attention_heads = config.num_key_value_heads = size.hidden // HEAD_DIM
    config.head_dim = HEAD_DIM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig.from_pretrained(demo_policy)
    path = out / f"policy-{name}"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(demo_policy).save_pretrained(path)
    return path


def num_parameters(path: Path) -> int:
    """Parameters of the causal LM saved at ``path`` (tied weights counted once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())
