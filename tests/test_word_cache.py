"""The word cache encodes exactly as the full tokenizer does, or is not used."""

from __future__ import annotations

import random

import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

import reward_service.word_cache as word_cache
from common.demo_models import DemoModels, generate_corpus
from reward_service.word_cache import WordCache

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Whitespace and control characters (where regex engines disagree most), Latin-1, general
# punctuation, CJK, emoji and a joiner.
SPECIAL_CHARS = (0x3000, 0xFEFF, 0x1680, 0x4E2D, 0x1F600, 0x1F44D, 0x1F3FD, 0x200D)
SWEEP = [chr(c) for c in (*range(0x250), *range(0x2000, 0x2070), *SPECIAL_CHARS)]
CONTEXTS = ("a{}b", " {} ", "{}{}x", "x {}\n", "{}", "it's{}", "1234{}5678", "DON'T{}")


def texts() -> list[str]:
    rng = random.Random(0)
    corpus = generate_corpus(400, seed=3)
    joined = [" ".join(rng.sample(corpus, rng.randint(1, 3))) for _ in range(300)]
    swept = [ctx.format(ch, ch) for ch in SWEEP for ctx in CONTEXTS]
    return joined + swept + ["", "   ", "\n\n", " end ", "Ünïcödé — ‘quotes’ … 中文 😀"]


def assert_same(cache: WordCache, tokenizer: Tokenizer) -> None:
    for text in texts():
        for add_special in (True, False):
            expected = tokenizer.encode(text, add_special_tokens=add_special).ids
            assert cache.encode(text, add_special) == expected, (text, add_special)


def assert_cached_and_exact(tokenizer: Tokenizer) -> None:
    cache = WordCache.for_tokenizer(tokenizer)
    assert cache is not None
    assert_same(cache, tokenizer)


def split_byte_level_bpe(
    pattern: str, vocab_size: int, seed: int, specials: list[str] | None = None
) -> Tokenizer:
    """A byte-level BPE whose words come from a Split ``pattern``, trained on generated reviews;
    with ``specials``, the first one is put before every text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials or [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(generate_corpus(1000, seed=seed), trainer)
    if specials:
        bos = tokenizer.token_to_id(specials[0])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)]
        )
    return tokenizer


@pytest.fixture(scope="module")
def llama3_style() -> Tokenizer:
    """Llama 3's split pattern and special tokens."""
    return split_byte_level_bpe(LLAMA3_PATTERN, 800, 5, ["<|begin_of_text|>", "<|eot_id|>"])


@pytest.mark.parametrize("which", ["reward", "policy"])
def test_demo_tokenizers_are_cached_and_exact(demo_models: DemoModels, which: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(getattr(demo_models, which)).backend_tokenizer
    assert_cached_and_exact(tokenizer)


def test_llama3_style_split_is_cached_and_exact(llama3_style: Tokenizer) -> None:
    assert_cached_and_exact(llama3_style)


def test_split_pattern_with_groups_and_gaps_is_exact() -> None:
    """A pattern with a capturing group that leaves text between its matches: the pieces are
    the whole matches and the text between them, as the pre-tokenizer's "Isolated" split."""
    assert_cached_and_exact(split_byte_level_bpe(r"( ?\p{L}+)|\p{N}", 600, 7))


def test_text_with_an_added_token_goes_to_the_full_tokenizer(llama3_style: Tokenizer) -> None:
    cache = WordCache.for_tokenizer(llama3_style)
    assert cache is not None
    assert cache.encode("hi <|eot_id|> there", True) is None
    assert cache.encode("hi there", True) == llama3_style.encode("hi there").ids


def test_other_pipelines_keep_the_full_tokenizer() -> None:
    with_normalizer = Tokenizer(models.BPE())
    with_normalizer.normalizer = normalizers.NFC()
    with_normalizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    prefix_space = Tokenizer(models.BPE())
    prefix_space.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    dropout = Tokenizer(models.BPE(dropout=0.1))
    dropout.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for tokenizer in (with_normalizer, metaspace, prefix_space, dropout):
        assert WordCache.for_tokenizer(tokenizer) is None


def test_a_cache_that_differs_on_the_probes_is_refused(
    demo_models: DemoModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_models.reward).backend_tokenizer
    # Whitespace-separated words: wrong for a GPT-2 style tokenizer (it keeps the space with
    # the word after it), and the probes show it.
    monkeypatch.setattr(word_cache, "_split_pattern", lambda _: r"\S+|\s+")
    assert WordCache.for_tokenizer(tokenizer) is None


def test_cache_stays_bounded_and_exact(
    demo_models: DemoModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_models.reward).backend_tokenizer
    monkeypatch.setattr(word_cache, "_MAX_WORDS", 16)
    cache = WordCache.for_tokenizer(tokenizer)
    assert cache is not None
    assert_same(cache, tokenizer)
    assert len(cache._words) <= 16
