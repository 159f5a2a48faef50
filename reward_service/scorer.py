"""The model side of the service: render items to text, tokenize, truncate, run forward passes.

Everything here is synchronous and usable in-process (tests and benchmarks call it directly).
The model itself sits behind a :class:`~reward_service.runner.Runner`: in a child process by
default, or in this one; :meth:`Scorer.serve` starts the batching loop beside it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jinja2 import TemplateError

from common.schemas import ScoreItem
from reward_service.batch_loop import BatchLimits, ForwardCost
from reward_service.loading import load_tokenizer
from reward_service.runner import Runner, start_runner
from reward_service.settings import ServiceSettings
from reward_service.word_cache import WordCache, special_edges

logger = logging.getLogger(__name__)

TruncationSide = Literal["left", "right", "error"]
# What is tokenized: a text, or a (text, text_pair) pair, encoded with the tokenizer's pair
# template (the TEI /predict route's pairs).
Text = str | tuple[str, str]
# Requests with fewer texts are tokenized one by one: handing a few short texts to the Rust
# thread pool takes far longer than encoding them in place while a forward pass runs.
_PARALLEL_MIN = 16


class ItemError(ValueError):
    """An item that cannot be scored; ``index`` is its position in the request."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"items[{index}]: {reason}")
        self.index = index
        self.reason = reason

    def naming(self, field: str) -> str:
        """The message with the request's own name for the list of items."""
        return f"{field}[{self.index}]: {self.reason}"


class TooLong(ItemError):
    """An item longer than ``max_length`` tokens where truncation is off."""

    def __init__(self, index: int, tokens: int, max_length: int) -> None:
        super().__init__(index, f"{tokens} tokens exceed max_length {max_length} (truncation off)")
        self.tokens = tokens
        self.max_length = max_length


@dataclass(frozen=True)
class Encoded:
    """Token ids ready for the model, one list per item, and whether each was cut."""

    ids: list[list[int]]
    truncated: list[bool]


def truncate(
    ids: list[int], max_length: int, side: Literal["left", "right"], head: int, tail: int
) -> list[int]:
    """Cut ``ids`` to ``max_length``, always keeping the ``head`` first and ``tail`` last ids.

    ``head``/``tail`` protect special tokens (BOS, a trailing EOS/SEP) that the model expects at
    the edges. ``left`` drops content from the start, ``right`` from the end.
    """
    if len(ids) <= max_length:
        return ids
    keep = max_length - head - tail
    if keep <= 0:
        raise ValueError(f"max_length {max_length} leaves no room next to {head + tail} specials")
    content = ids[head : len(ids) - tail]
    content = content[len(content) - keep :] if side == "left" else content[:keep]
    return ids[:head] + content + ids[len(ids) - tail :]


def _messages(item: ScoreItem) -> list[dict[str, str]]:
    if item.messages is not None:
        return [m.model_dump() for m in item.messages]
    assert isinstance(item.prompt, list) and item.completion is not None
    # Decoded completions usually start with a space; templates add their own separator.
    completion = {"role": "assistant", "content": item.completion.strip()}
    return [m.model_dump() for m in item.prompt] + [completion]


class Scorer:
    """A loaded sequence-classification model (behind its runner), its tokenizer and input rules."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Any,
        *,
        model_id: str,
        max_length: int,
        truncation_side: TruncationSide,
        score_label: int | str = 0,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_length = max_length
        self.truncation_side = truncation_side
        info = runner.info
        self.weights_hash = info.weights_hash
        self.device = info.device
        self.dtype = info.dtype
        self.problem_type = info.problem_type
        self.attn_implementation = info.attn_implementation
        self.pad_id = info.pad_id
        if self.pad_id == tokenizer.eos_token_id:
            logger.warning("pad token == EOS: items ending in EOS are scored at the token before")
        self.num_labels = info.num_labels
        self.id2label = info.id2label
        self.score_label = self.label_index(score_label)
        self.bos_token: str | None = tokenizer.bos_token
        self.bos_id: int | None = tokenizer.bos_token_id
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # A private copy of the Rust tokenizer: batch encoding without the Python wrapper's
        # per-call overhead, and no truncation/padding state shared with anyone else.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = None
        if backend is not None:
            self._fast = type(backend).from_str(backend.to_str())
            self._fast.no_truncation()
            self._fast.no_padding()
        # Byte-level BPE tokenizers (most current reward models') encode through a cache of
        # each word's ids, checked against the full tokenizer at load; see word_cache.
        self._words = WordCache.for_tokenizer(self._fast) if self._fast is not None else None
        self._special_head, self._special_tail = self._special_edges()

    @classmethod
    def load(cls, settings: ServiceSettings) -> Scorer:
        """Load tokenizer and model as configured (local path or hub id)."""
        tokenizer = load_tokenizer(settings)
        pad = tokenizer.pad_token_id
        runner = start_runner(settings, tokenizer.eos_token_id if pad is None else pad)
        try:
            limits = [runner.info.max_positions]
            if tokenizer.model_max_length and tokenizer.model_max_length < 10**9:
                limits.append(tokenizer.model_max_length)
            model_limit = min((x for x in limits if x), default=None)
            max_length = settings.max_length or model_limit
            if max_length is None:
                raise ValueError("cannot infer max_length from the model; set --max-length")
            if model_limit is not None and max_length > model_limit:
                raise ValueError(f"max_length {max_length} exceeds the model's limit {model_limit}")
            return cls(
                runner,
                tokenizer,
                model_id=settings.model,
                max_length=max_length,
                truncation_side=settings.truncation_side,
                score_label=settings.score_label,
            )
        except BaseException:
            runner.close()
            raise

    def close(self) -> None:
        """Release the model (stops its process, if it has one)."""
        self.runner.close()

    def failure(self) -> str | None:
        """Why the model can no longer score (its process exited); None while it can."""
        return self.runner.failure()

    def lost(self) -> BaseException:
        """What requests fail with once the batching loop's link broke without being closed."""
        return self.runner.lost()

    def label_index(self, label: int | str | None) -> int:
        """Index of a head output given as index or id2label name (None: the default label)."""
        if label is None:
            return self.score_label
        if isinstance(label, int) and 0 <= label < self.num_labels:
            return label
        if isinstance(label, str):
            for index, name in self.id2label.items():
                if name == label:
                    return index
            if label.isdigit() and int(label) < self.num_labels:  # "1" from a flag or env var
                return int(label)
        raise ValueError(f"label: unknown label {label!r}; the model's labels are {self.id2label}")

    def render(self, item: ScoreItem) -> str:
        """The text the model scores: as is, prompt + completion, or the chat template's output."""
        if item.text is not None:
            return item.text
        if not item.is_conversational:
            assert isinstance(item.prompt, str) and item.completion is not None
            return item.prompt + item.completion  # as TRL does for non-conversational data
        return self.render_chat(_messages(item))

    def render_chat(self, messages: list[dict[str, str]], **template_kwargs: Any) -> str:
        """``messages`` through the reward tokenizer's chat template, as text."""
        if not self.has_chat_template:
            raise ValueError("the reward tokenizer has no chat template; send text instead")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)

    def render_all(self, items: Sequence[ScoreItem]) -> list[str]:
        """Render every item; :class:`ItemError` names the first one that fails."""
        texts = []
        for index, item in enumerate(items):
            try:
                texts.append(self.render(item))
            except (ValueError, TemplateError) as exc:
                raise ItemError(index, str(exc)) from None
        return texts

    def encode(
        self,
        texts: Sequence[Text],
        *,
        side: TruncationSide | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> Encoded:
        """Tokenize, and truncate each item to ``max_length`` tokens (default: the service's)
        on ``side`` (default: the service's; ``error``: :class:`TooLong` instead).

        Texts that already start with BOS (chat templates usually add it) are tokenized
        without special tokens, so no item ever gets a double BOS; ``add_special_tokens=False``
        adds none to any. A pair gets the tokenizer's pair template."""
        side = side or self.truncation_side
        limit = self.max_length if max_length is None else max_length
        plain = [
            not add_special_tokens or self._starts_with_bos(t if isinstance(t, str) else t[0])
            for t in texts
        ]
        ids: list[list[int]] = [[] for _ in texts]
        for add_special in (True, False):
            indices = [i for i, p in enumerate(plain) if p != add_special]
            if indices:
                encoded = self._tokenize([texts[i] for i in indices], add_special)
                for i, seq in zip(indices, encoded, strict=True):
                    ids[i] = seq
        truncated = [False] * len(texts)
        for i, seq in enumerate(ids):
            if len(seq) <= limit:
                continue
            if side == "error":
                raise TooLong(i, len(seq), limit)
            if plain[i]:  # keep a template's BOS; nothing was added after the content
                head, tail = int(seq[0] == self.bos_id), 0
            else:
                head, tail = self._special_head, self._special_tail
            try:
                ids[i] = truncate(seq, limit, side, head, tail)
            except ValueError as exc:
                raise ItemError(i, str(exc)) from None
            truncated[i] = True
        return Encoded(ids=ids, truncated=truncated)

    def forward(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """Head logits ``[len(seqs), num_labels]`` (float32, CPU) of one padded batch."""
        return self.runner.forward(seqs)

    def serve(self, limits: BatchLimits) -> socket.socket:
        """Start the batching loop beside the model; returns the server's end of its link
        (:meth:`forward` is for warm-up and measurements, before this)."""
        return self.runner.serve(limits)

    def warmup(self) -> None:
        """Forward passes of each shape kind (one item or several, one token or more, padded or
        not), so that no request pays a one-time cost (with ``compile``: a compilation)."""
        ids = self._tokenize(["a slightly longer warm-up text"], True)[0][: self.max_length]
        for batch in ([ids[:1]], [ids[:1]] * 2, [ids], [ids] * 2, [ids[:2], ids]):
            self.forward(batch)

    def forward_cost(
        self,
        max_batch_size: int,
        max_batch_tokens: int,
        repeats: int = 5,
        slow_s: float = 0.25,
    ) -> ForwardCost:
        """What a forward pass costs, fitted as fixed + per padded token: the line through the
        fastest timings of one short item (4 x ``repeats``: cheap, and the noisier) and of a
        full batch (``repeats``; ``max_batch_size`` items of 64 ids, within
        ``max_batch_tokens``). Each pass is timed where the model runs, since the batching loop
        runs there too and a round's batches follow each other without crossing the link. The
        fixed part (launches, Python) is what a batch costs whatever its size. The per-token
        part is the full batch's, since on a CPU it grows with the batch and it is the big
        batches' cost that decides whether to cut them. The batch grows 4x at a time from 4
        items, stopping early at one whose forward takes over ``slow_s`` (a large model on a
        CPU)."""
        ids = self._tokenize(["a text of many words " * 32], True)[0][: self.max_length]
        short, long = ids[:16], ids[:64]
        cap = max(1, min(max_batch_size, max_batch_tokens // len(long)))
        size = min(4, cap)
        while size < cap and self._fastest([long] * size, 1) <= slow_s:
            size = min(size * 4, cap)
        small_s = self._fastest([short], 4 * repeats)
        big_s = self._fastest([long] * size, repeats)
        extra_tokens = size * len(long) - len(short)
        per_token_s = max(0.0, (big_s - small_s) / extra_tokens) if extra_tokens > 0 else 0.0
        return ForwardCost(max(0.0, small_s - per_token_s * len(short)), per_token_s)

    def _fastest(self, batch: list[list[int]], repeats: int) -> float:
        """The fastest of ``repeats`` forwards of ``batch``, in seconds."""
        return min(self.runner.time_forward(batch) for _ in range(repeats))

    def _starts_with_bos(self, text: str) -> bool:
        return bool(self.bos_token) and text.startswith(self.bos_token)

    def _tokenize(self, texts: Sequence[Text], add_special_tokens: bool) -> list[list[int]]:
        if any(isinstance(t, tuple) for t in texts):  # pairs: rare, one by one
            return [self._tokenize_one(t, add_special_tokens) for t in texts]
        if self._fast is None:
            return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        if self._words is not None:
            return [self._encode_one(t, add_special_tokens) for t in texts]
        if len(texts) < _PARALLEL_MIN:  # a thread pool costs more than it saves here
            return [self._fast.encode(t, add_special_tokens=add_special_tokens).ids for t in texts]
        encodings = self._fast.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def _tokenize_one(self, text: Text, add_special_tokens: bool) -> list[int]:
        """One text or pair, with the full tokenizer (or the word cache for a text)."""
        if isinstance(text, str):
            return self._tokenize([text], add_special_tokens)[0]
        if self._fast is None:
            return self.tokenizer(*text, add_special_tokens=add_special_tokens)["input_ids"]
        return self._fast.encode(*text, add_special_tokens=add_special_tokens).ids

    def _encode_one(self, text: str, add_special_tokens: bool) -> list[int]:
        """One text through the word cache, or the full tokenizer when the cache declines it."""
        assert self._fast is not None and self._words is not None
        ids = self._words.encode(text, add_special_tokens)
        if ids is None:
            ids = self._fast.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def _special_edges(self) -> tuple[int, int]:
        """How many ids the tokenizer's post-processor puts before and after the content."""
        edges = special_edges(self._tokenize(["a"], False)[0], self._tokenize(["a"], True)[0])
        return (0, 0) if edges is None else (len(edges[0]), len(edges[1]))
