"""Word-memoized encoding for byte-level BPE tokenizers (GPT-2, Llama 3 and Qwen 2 style).

Such a tokenizer cuts a text into words with a regex, maps each word's UTF-8 bytes to printable
characters and runs BPE on each word on its own, so a text's ids are its words' ids in order and
a word's ids can be remembered. The `tokenizers` pre-tokenizer takes most of the time that
``encode`` spends on a short text; the same regex in Python, with the ids of words seen before,
takes a fraction of it (measured in the commit that added this module). This runs on the event
loop for every request, where a single-item request spends more on tokenizing than on anything
else of its own.

Only two pipeline shapes are taken (anything else keeps the full tokenizer): no normalizer, a
BPE model without dropout, and as pre-tokenizer either ``ByteLevel(use_regex=True)`` or
``Sequence([Split(Regex, "Isolated"), ByteLevel(use_regex=False)])``, neither adding a prefix
space. At load, the cache must reproduce the full tokenizer on a probe set, and a text holding
an added token's content (a chat template's markers, say) goes the full way.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import regex
from transformers.convert_slow_tokenizer import bytes_to_unicode

logger = logging.getLogger(__name__)

# The GPT-2 pattern that `tokenizers`' ByteLevel pre-tokenizer applies when use_regex is on.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Words remembered at most; the cache starts over beyond this (a few MB).
_MAX_WORDS = 1 << 16
# Texts the cache must encode exactly as the full tokenizer does before it is used.
_PROBES = (
    "",
    "a",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n\n  indented",
    "I'm sure they'll say it's fine; we've done it, don't you think? YOU'LL SEE.",
    "Numbers 12345 and 3.14159, dates 2026-11-30, $1,000,000 (and 50%)!",
    "Accents: café, naïve, Zürich; 中文字符; Ελληνικά; emoji 😀👍🏽 and ZWJ 👩‍💻.",
    "punctuation!!! ... ??? --- *** ### @user #tag https://example.com/a?b=c&d=e",
    "mixedCASE camelCase snake_case kebab-case CONSTANT_CASE",
    "   ",
    "\n\n\n",
    "end with space ",
    "repeated repeated repeated words words",
)


# GPT-2's map from bytes to printable characters (what ByteLevel applies to each word).
_BYTE_CHARS = bytes_to_unicode()


def special_edges(content: list[int], full: list[int]) -> tuple[list[int], list[int]] | None:
    """The ids a post-processor put before and after ``content`` to make ``full`` (the same
    text encoded without and with special tokens), or None if ``full`` does not contain it."""
    n = len(content)
    for start in range(len(full) - n + 1):
        if full[start : start + n] == content:
            return full[:start], full[start + n :]
    return None


def _split_pattern(pre_tokenizer: dict[str, Any] | None) -> str | None:
    """The word regex of a supported pre-tokenizer config, else None."""
    if pre_tokenizer is None:
        return None
    if pre_tokenizer.get("type") == "ByteLevel":
        if pre_tokenizer.get("add_prefix_space") or not pre_tokenizer.get("use_regex", True):
            return None
        return _GPT2_PATTERN
    if pre_tokenizer.get("type") != "Sequence":
        return None
    steps = pre_tokenizer.get("pretokenizers") or []
    if len(steps) != 2:
        return None
    split, byte_level = steps
    pattern = (split.get("pattern") or {}).get("Regex")
    if (
        split.get("type") != "Split"
        or pattern is None
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("add_prefix_space")
        or byte_level.get("use_regex")
    ):
        return None
    return pattern


class WordCache:
    """Encodes texts as a byte-level BPE tokenizer does, remembering each word's ids."""

    def __init__(self, tokenizer: Any, pattern: str) -> None:
        self._model = tokenizer.model
        self._split = regex.compile(pattern)
        # findall returns whole matches only for a pattern without groups.
        self._findall = self._split.findall if self._split.groups == 0 else None
        added = [token.content for token in tokenizer.get_added_tokens_decoder().values()]
        self._added = regex.compile("|".join(map(regex.escape, added))) if added else None
        self._words: dict[str, list[int]] = {}
        edges = special_edges(
            tokenizer.encode("a", add_special_tokens=False).ids,
            tokenizer.encode("a", add_special_tokens=True).ids,
        )
        if edges is None:
            raise ValueError("the special tokens do not wrap the content")
        self._head, self._tail = edges

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> WordCache | None:
        """A cache for ``tokenizer`` (a ``tokenizers.Tokenizer``), or None when its pipeline is
        not one of the supported shapes or the cache does not reproduce it on the probes."""
        config = json.loads(tokenizer.to_str())
        model = config.get("model") or {}
        pattern = _split_pattern(config.get("pre_tokenizer"))
        if (
            pattern is None
            or config.get("normalizer") is not None
            or model.get("type") != "BPE"
            or model.get("dropout")
        ):
            return None
        try:
            cache = cls(tokenizer, pattern)
        except (ValueError, regex.error):
            return None
        for text in _PROBES:
            for add_special in (True, False):
                if (
                    cache.encode(text, add_special)
                    != tokenizer.encode(text, add_special_tokens=add_special).ids
                ):
                    logger.info("word cache off: it differs from the tokenizer on %r", text)
                    return None
        return cache

    def encode(self, text: str, add_special_tokens: bool) -> list[int] | None:
        """The ids of ``text``, or None when it holds an added token (use the full tokenizer)."""
        if self._added is not None and self._added.search(text):
            return None
        words = self._findall(text) if self._findall is not None else None
        if words is None or sum(map(len, words)) != len(text):  # the pattern skipped some text
            words = self._pieces(text)
        ids = list(self._head) if add_special_tokens else []
        known = self._words.get
        for word in words:
            ids += known(word) or self._word(word)
        if add_special_tokens:
            ids += self._tail
        return ids

    def _pieces(self, text: str) -> list[str]:
        """The pattern's matches and, as words of their own, the text between them
        (the pre-tokenizer's "Isolated" split)."""
        pieces = []
        last = 0
        for match in self._split.finditer(text):
            if match.start() > last:
                pieces.append(text[last : match.start()])
            pieces.append(match.group())
            last = match.end()
        if last < len(text):
            pieces.append(text[last:])
        return [piece for piece in pieces if piece]

    def _word(self, word: str) -> list[int]:
        ids = self._words.get(word)
        if ids is None:
            if len(self._words) >= _MAX_WORDS:
                self._words.clear()
            mapped = "".join(_BYTE_CHARS[b] for b in word.encode("utf-8"))
            ids = self._words[word] = [token.id for token in self._model.tokenize(mapped)]
        return ids
