"""The model side of the service: render items to text, tokenize, truncate, run forward passes.

Everything here is synchronous and usable in-process (tests and benchmarks call it directly);
the batcher runs :meth:`Scorer.forward` in a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jinja2 import TemplateError
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import cached_file
from transformers.utils.logging import disable_progress_bar

from common.schemas import ScoreItem
from reward_service.settings import ServiceSettings

logger = logging.getLogger(__name__)

TruncationSide = Literal["left", "right", "error"]
# Requests with fewer texts are tokenized one by one: handing a few short texts to the Rust
# thread pool took ~10x longer than encoding them in place while a forward pass ran.
_PARALLEL_MIN = 16
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ItemError(ValueError):
    """An item that cannot be scored; ``index`` is its position in the request."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"items[{index}]: {message}")
        self.index = index


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


def pad_right(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` right-padded with ``pad_id`` and the matching ``attention_mask``.

    Right padding keeps every item's positions 0..n-1, exactly as in a single-item forward, and
    under the causal mask real tokens never attend to the padding after them.
    """
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return input_ids, attention_mask


def weights_hash(model: PreTrainedModel, name_or_path: str) -> str:
    """Short sha256 of the weight files (safetensors, else .bin) the model was loaded from.

    Falls back to hashing the in-memory state dict when no weight files can be found.
    """
    folder: Path | None = Path(name_or_path)
    if not folder.is_dir():
        try:  # a hub id: the snapshot folder it was downloaded to
            folder = Path(cached_file(name_or_path, "config.json")).parent
        except OSError:
            folder = None
    files = []
    if folder is not None:
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digest = hashlib.sha256()
    if files:
        for path in files:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    else:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:16]


def _messages(item: ScoreItem) -> list[dict[str, str]]:
    if item.messages is not None:
        return [m.model_dump() for m in item.messages]
    assert isinstance(item.prompt, list) and item.completion is not None
    # Decoded completions usually start with a space; templates add their own separator.
    completion = {"role": "assistant", "content": item.completion.strip()}
    return [m.model_dump() for m in item.prompt] + [completion]


class Scorer:
    """A loaded sequence-classification model with its tokenizer and input rules."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        *,
        model_id: str,
        weights_hash: str,
        max_length: int,
        truncation_side: TruncationSide,
        score_label: int | str = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.weights_hash = weights_hash
        self.max_length = max_length
        self.truncation_side = truncation_side
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is None:
            pad = tokenizer.pad_token_id
            pad = tokenizer.eos_token_id if pad is None else pad
            if pad is None:
                raise ValueError("neither the model config nor the tokenizer defines a pad token")
            # The head reads the score at the last token that is not pad_token_id.
            text_config.pad_token_id = pad
        self.pad_id: int = text_config.pad_token_id
        # Scoring never decodes: left on, a causal backbone fills a KV cache of the whole batch
        # in every forward only to drop it (Llama-2-7B, 64 x 2048 tokens in bf16: 64 GiB).
        text_config.use_cache = False
        if self.pad_id == tokenizer.eos_token_id:
            logger.warning("pad token == EOS: items ending in EOS are scored at the token before")
        self.num_labels: int = model.config.num_labels
        self.id2label: dict[int, str] = {int(k): v for k, v in model.config.id2label.items()}
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
        self._special_head, self._special_tail = self._special_edges()

    @classmethod
    def load(cls, settings: ServiceSettings) -> Scorer:
        """Load model and tokenizer as configured (local path or hub id)."""
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        disable_progress_bar()  # a progress bar per load is noise in a service log
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "auto" if settings.dtype == "auto" else _DTYPES[settings.dtype]
        tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer or settings.model)
        model = AutoModelForSequenceClassification.from_pretrained(settings.model, dtype=dtype)
        model.to(device).eval()
        limits = [getattr(model.config.get_text_config(), "max_position_embeddings", None)]
        if tokenizer.model_max_length and tokenizer.model_max_length < 10**9:
            limits.append(tokenizer.model_max_length)
        model_limit = min((x for x in limits if x), default=None)
        max_length = settings.max_length or model_limit
        if max_length is None:
            raise ValueError("cannot infer max_length from the model; set --max-length")
        if model_limit is not None and max_length > model_limit:
            raise ValueError(f"max_length {max_length} exceeds the model's limit {model_limit}")
        return cls(
            model,
            tokenizer,
            model_id=settings.model,
            weights_hash=weights_hash(model, settings.model),
            max_length=max_length,
            truncation_side=settings.truncation_side,
            score_label=settings.score_label,
        )

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
        if not self.has_chat_template:
            raise ValueError("the reward tokenizer has no chat template; send text instead")
        return self.tokenizer.apply_chat_template(_messages(item), tokenize=False)

    def render_all(self, items: Sequence[ScoreItem]) -> list[str]:
        """Render every item; :class:`ItemError` names the first one that fails."""
        texts = []
        for index, item in enumerate(items):
            try:
                texts.append(self.render(item))
            except (ValueError, TemplateError) as exc:
                raise ItemError(index, str(exc)) from None
        return texts

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Tokenize and truncate. Texts that already start with BOS (chat templates usually add
        it) are tokenized without special tokens, so no item ever gets a double BOS."""
        has_bos = [self._starts_with_bos(t) for t in texts]
        ids: list[list[int]] = [[] for _ in texts]
        for add_special in (True, False):
            indices = [i for i, b in enumerate(has_bos) if b != add_special]
            if indices:
                encoded = self._tokenize([texts[i] for i in indices], add_special)
                for i, seq in zip(indices, encoded, strict=True):
                    ids[i] = seq
        truncated = [False] * len(texts)
        for i, seq in enumerate(ids):
            if len(seq) <= self.max_length:
                continue
            if self.truncation_side == "error":
                raise ItemError(
                    i, f"{len(seq)} tokens exceed max_length {self.max_length} "
                    "(truncation_side=error)",
                )  # fmt: skip
            if has_bos[i]:  # keep the template's BOS; nothing was added after the content
                head, tail = int(seq[0] == self.bos_id), 0
            else:
                head, tail = self._special_head, self._special_tail
            ids[i] = truncate(seq, self.max_length, self.truncation_side, head, tail)
            truncated[i] = True
        return Encoded(ids=ids, truncated=truncated)

    @torch.inference_mode()
    def forward(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """Head logits ``[len(seqs), num_labels]`` (float32, CPU) of one padded batch."""
        input_ids, attention_mask = pad_right(seqs, self.pad_id)
        out = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        )
        return out.logits.float().cpu()

    def warmup(self) -> None:
        """One padded forward, so the first request does not pay one-time setup costs."""
        ids = self._tokenize(["a slightly longer warm-up text"], True)[0][: self.max_length]
        self.forward([ids[:2], ids])  # two lengths: the padded path runs too

    def _starts_with_bos(self, text: str) -> bool:
        return bool(self.bos_token) and text.startswith(self.bos_token)

    def _tokenize(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if self._fast is not None:
            if len(texts) < _PARALLEL_MIN:  # a thread pool costs more than it saves here
                return [
                    self._fast.encode(t, add_special_tokens=add_special_tokens).ids for t in texts
                ]
            encodings = self._fast.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
            return [e.ids for e in encodings]
        return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]

    def _special_edges(self) -> tuple[int, int]:
        """How many ids the tokenizer's post-processor puts before and after the content."""
        probe = "a"
        content = self._tokenize([probe], False)[0]
        full = self._tokenize([probe], True)[0]
        for start in range(len(full) - len(content) + 1):
            if full[start : start + len(content)] == content:
                return start, len(full) - start - len(content)
        return 0, 0
