"""Builder of the small offline demo models (no model hub needed).

A generated corpus of short reviews teaches a tiny Llama policy to write review-like sentences,
and a tiny Llama sequence-classification reward model to score the learnable property
``(positive - negative) / opinion words``. The two use different tokenizers, each with its own
chat template, as real policy / reward pairs do. Everything is seeded and saved with
``save_pretrained``, so it is loaded back through the same ``from_pretrained(path)`` code path
as a real model. Builds are cached under a key derived from this file's source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

logger = logging.getLogger(__name__)

POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "superb",
    "charming",
    "brilliant",
    "lovely",
    "amazing",
    "fantastic",
    "gripping",
    "moving",
]
NEGATIVE = [
    "awful",
    "terrible",
    "boring",
    "dreadful",
    "bad",
    "dull",
    "horrible",
    "poor",
    "weak",
    "painful",
    "clumsy",
    "tedious",
]
NEUTRAL = [
    "long",
    "short",
    "quiet",
    "loud",
    "simple",
    "old",
    "new",
    "typical",
    "average",
    "slow",
    "fast",
    "unusual",
]
NOUNS = [
    "movie",
    "film",
    "book",
    "story",
    "acting",
    "plot",
    "music",
    "ending",
    "dialogue",
    "soundtrack",
    "cast",
    "direction",
    "pacing",
    "script",
    "finale",
    "camera",
]
TEMPLATES = (
    "the {n1} was {a1} .",
    "the {n1} was {a1} and the {n2} was {a2} .",
    "i thought the {n1} was {a1} , but the {n2} felt {a2} .",
    "this {n1} is {a1} , really {a2} .",
    "overall a {a1} {n1} with a {a2} {n2} .",
    "honestly the {n1} felt {a1} and {a2} .",
    "the {n1} is {a1} , the {n2} is {a2} and the {n3} is {a3} .",
    "my friends found the {n1} {a1} .",
    "what a {a1} {n1} , and such a {a2} {n2} .",
    "in the end the {n1} seemed {a1} .",
)
OPINION_WORDS = frozenset(POSITIVE + NEGATIVE + NEUTRAL)

POLICY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
REWARD_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}### {{ message['role'] | capitalize }}: "
    "{{ message['content'] }}\n{% endfor %}"
)

SEED = 1234
BUILDER_VERSION = 1


@dataclass(frozen=True)
class DemoModels:
    """Paths of one built set of demo models and prompt files."""

    root: Path
    policy: Path
    reward: Path
    reward_alt: Path
    train_prompts: Path
    eval_prompts: Path

    @classmethod
    def at(cls, root: Path) -> DemoModels:
        root = Path(root)
        return cls(
            root=root,
            policy=root / "policy",
            reward=root / "reward",
            reward_alt=root / "reward_alt",
            train_prompts=root / "data" / "train_prompts.jsonl",
            eval_prompts=root / "data" / "eval_prompts.jsonl",
        )


def true_score(text: str) -> float:
    """The ground-truth property the reward model learns: (pos - neg) / opinion words."""
    words = text.lower().split()
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    opinions = sum(w in OPINION_WORDS for w in words)
    return (pos - neg) / opinions if opinions else 0.0


def _sentence(rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    pools = (POSITIVE, NEGATIVE, NEUTRAL)
    fill = {}
    for i in (1, 2, 3):
        fill[f"n{i}"] = rng.choice(NOUNS)
        fill[f"a{i}"] = rng.choice(rng.choice(pools))
    return template.format(**fill)


def generate_corpus(n: int, seed: int = SEED) -> list[str]:
    """``n`` generated review sentences."""
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n)]


def _prompt_of(sentence: str) -> str:
    """The review's opening words, up to (not including) its first opinion word."""
    words = sentence.split()
    cut = next(i for i, w in enumerate(words) if w in OPINION_WORDS)
    return " ".join(words[:cut])


def make_prompts(corpus: Sequence[str], eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Distinct review openings, split into train and held-out eval prompts."""
    prompts = sorted({_prompt_of(s) for s in corpus})
    random.Random(SEED).shuffle(prompts)
    n_eval = max(1, int(len(prompts) * eval_fraction))
    return prompts[n_eval:], prompts[:n_eval]


def _train_tokenizer(
    corpus: Sequence[str],
    *,
    vocab_size: int,
    pad: str,
    bos: str,
    eos: str,
    chat_template: str,
    add_bos: bool,
) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[pad, bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        chat_template=chat_template,
        model_max_length=512,
    )


def _chat_corpus(corpus: Sequence[str]) -> list[str]:
    """Chat-formatted variants, so the tokenizers see the role markup."""
    out = []
    for s in corpus[:500]:
        p = _prompt_of(s)
        out.append(f"<|user|> {p}\n<|assistant|> {s[len(p) :].strip()}\n")
        out.append(f"### User: {p}\n### Assistant: {s[len(p) :].strip()}\n")
    return out


def _llama_config(
    tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, **kw
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **kw,
    )


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_policy(
    tokenizer: PreTrainedTokenizerFast,
    corpus: Sequence[str],
    *,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = SEED,
) -> LlamaForCausalLM:
    """Pre-train the tiny causal LM on corpus sentences, each ending with EOS."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, hidden=128, layers=4))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    texts = [s + tokenizer.eos_token for s in corpus]
    model.train()
    for step in range(steps):
        batch = tokenizer(
            rng.sample(texts, batch_size),
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            logger.info("policy step %d loss %.3f", step, loss.item())
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _reward_example(sentence: str, rng: random.Random, tokenizer: PreTrainedTokenizerFast) -> str:
    """A full review, a cut-off prefix of one, or either rendered as a chat."""
    words = sentence.split()
    if rng.random() < 0.4:
        words = words[: rng.randint(1, len(words))]
    text = " ".join(words)
    if rng.random() < 0.3:
        prompt = _prompt_of(sentence)
        if text.startswith(prompt) and len(text) > len(prompt):
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": text[len(prompt) :].strip()},
            ]
            return tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer.bos_token + text


def train_reward(
    tokenizer: PreTrainedTokenizerFast,
    corpus: Sequence[str],
    *,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = SEED,
) -> LlamaForSequenceClassification:
    """Regress the tiny classifier (num_labels=1) onto :func:`true_score`."""
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(
        _llama_config(tokenizer, hidden=64, layers=2, num_labels=1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        texts = [_reward_example(s, rng, tokenizer) for s in rng.sample(list(corpus), batch_size)]
        targets = torch.tensor([true_score(t) for t in texts])
        # Every text starts with BOS (chat templates render it), so add no second one.
        batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        logits = model(**batch).logits.squeeze(-1)
        loss = torch.nn.functional.mse_loss(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            logger.info("reward step %d mse %.4f", step, loss.item())
    model.eval()
    return model


def _write_jsonl(path: Path, prompts: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")


def build_demo_models(out_dir: str | Path, *, policy_steps: int = 500) -> DemoModels:
    """Build the policy, both reward models and the prompt files into ``out_dir``."""
    start = time.perf_counter()
    paths = DemoModels.at(Path(out_dir))
    torch.manual_seed(SEED)
    corpus = generate_corpus(6000)
    tok_corpus = corpus + _chat_corpus(corpus)

    policy_tok = _train_tokenizer(
        tok_corpus,
        vocab_size=1024,
        pad="<pad>",
        bos="<s>",
        eos="</s>",
        chat_template=POLICY_CHAT_TEMPLATE,
        add_bos=False,
    )
    policy_tok.padding_side = "left"
    policy = train_policy(policy_tok, corpus, steps=policy_steps)
    policy.save_pretrained(paths.policy)
    policy_tok.save_pretrained(paths.policy)

    reward_tok = _train_tokenizer(
        tok_corpus,
        vocab_size=800,
        pad="[PAD]",
        bos="[BOS]",
        eos="[EOS]",
        chat_template=REWARD_CHAT_TEMPLATE,
        add_bos=True,
    )
    for path, seed, steps in ((paths.reward, SEED, 400), (paths.reward_alt, SEED + 1, 300)):
        reward = train_reward(reward_tok, corpus, steps=steps, seed=seed)
        reward.save_pretrained(path)
        reward_tok.save_pretrained(path)

    train_prompts, eval_prompts = make_prompts(corpus)
    _write_jsonl(paths.train_prompts, train_prompts)
    _write_jsonl(paths.eval_prompts, eval_prompts)
    logger.info("built demo models in %s in %.1f s", paths.root, time.perf_counter() - start)
    return paths


def builder_key() -> str:
    """Changes whenever this builder (or the library versions it depends on) changes."""
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{BUILDER_VERSION}|{torch.__version__}|{transformers.__version__}".encode())
    return digest.hexdigest()[:12]


def default_cache_dir() -> Path:
    env = os.environ.get("ONLINE_DPO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "online-dpo"


def ensure_demo_models(cache_dir: str | Path | None = None) -> DemoModels:
    """The cached demo models, built first if this builder's version is not cached yet.

    Safe for concurrent callers: one builds under a file lock, the others wait and reuse.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"demo-{builder_key()}"
    with FileLock(str(final) + ".lock"):
        if (final / "BUILD_OK").exists():
            return DemoModels.at(final)
        tmp = Path(tempfile.mkdtemp(prefix="building-", dir=cache))
        try:
            build_demo_models(tmp)
            (tmp / "BUILD_OK").write_text(builder_key())
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return DemoModels.at(final)
