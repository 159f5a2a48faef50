"""Where the model runs: in the server process, or in a child process of its own (the default).

The server's event loop (HTTP, JSON, tokenizing) and a forward pass both need the GIL: a small
model's forward is mostly Python, a large one's launches its kernels from Python. With the model
in a spawned child, neither waits for the other; token ids go to it over a pipe and head logits
come back. Both runners answer ``forward`` the same way and report the same :class:`ModelInfo`.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import pickle
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import cached_file
from transformers.utils.logging import disable_progress_bar

from reward_service.settings import ServiceSettings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about the loaded model."""

    device: str
    dtype: str
    weights_hash: str
    num_labels: int
    id2label: dict[int, str]
    pad_id: int
    max_positions: int | None


# Called with a batch's index in a round and its head logits, or the error its forward raised.
Deliver = Callable[[int, "torch.Tensor | Exception"], None]

# A round's batches all go down the pipe before the first result is read (so the model process
# never waits for the server between two) when the round's results together are at most this
# many floats: they then fit in the pipe's buffer while the server is still sending, so neither
# side can block on a full pipe while the other does.
_AHEAD_MAX_FLOATS = 4096


class Runner(Protocol):
    """A loaded model that scores padded batches of token ids."""

    info: ModelInfo

    def failure(self) -> str | None:
        """Why the model can no longer run; None while it can."""
        ...

    def forward(self, seqs: Sequence[list[int]]) -> torch.Tensor: ...

    def forward_each(self, batches: Sequence[Sequence[list[int]]], deliver: Deliver) -> None:
        """Run ``batches`` in order, calling ``deliver(k, logits)`` as each one is scored, or
        ``deliver(k, error)`` with what its forward raised; ModelProcessExited is raised."""
        ...

    def close(self) -> None: ...


class ModelProcessExited(RuntimeError):
    """The child process holding the model is gone (killed, or crashed in native code)."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(f"the model process exited (exit code {exitcode})")
        self.exitcode = exitcode


def start_runner(settings: ServiceSettings, pad_fallback: int | None) -> Runner:
    """Load the model as configured: in a child process unless ``forward_process`` is off."""
    if settings.forward_process:
        return ProcessRunner.start(settings, pad_fallback)
    return LocalRunner.load(settings, pad_fallback)


def one_by_one(
    forward: Callable[[Sequence[list[int]]], torch.Tensor],
    batches: Sequence[Sequence[list[int]]],
    deliver: Deliver,
) -> None:
    """:meth:`Runner.forward_each` from a plain forward: each batch in turn, and an error in
    one batch delivered as that batch's result."""
    for k, seqs in enumerate(batches):
        try:
            logits = forward(seqs)
        except Exception as exc:
            deliver(k, exc)
        else:
            deliver(k, logits)


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


class LocalRunner:
    """The model in this process; ``forward`` runs in the calling thread."""

    def __init__(self, model: PreTrainedModel, info: ModelInfo) -> None:
        self.model = model
        self.info = info

    @classmethod
    def load(cls, settings: ServiceSettings, pad_fallback: int | None) -> LocalRunner:
        """Load the model (local path or hub id) on the configured device and dtype.

        ``pad_fallback`` (the tokenizer's pad, else EOS) is used when the config names no pad
        token: the head reads the score at the last token that is not ``pad_token_id``.
        """
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        disable_progress_bar()  # a progress bar per load is noise in a service log
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "auto" if settings.dtype == "auto" else _DTYPES[settings.dtype]
        model = AutoModelForSequenceClassification.from_pretrained(settings.model, dtype=dtype)
        model.to(device).eval()
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is None:
            if pad_fallback is None:
                raise ValueError("neither the model config nor the tokenizer defines a pad token")
            text_config.pad_token_id = pad_fallback
        # Scoring never decodes: left on, a causal backbone fills a KV cache of the whole batch
        # in every forward only to drop it (Llama-2-7B, 64 x 2048 tokens in bf16: 64 GiB).
        text_config.use_cache = False
        first = next(model.parameters())
        info = ModelInfo(
            device=str(first.device),
            dtype=str(first.dtype).removeprefix("torch."),
            weights_hash=weights_hash(model, settings.model),
            num_labels=model.config.num_labels,
            id2label={int(k): v for k, v in model.config.id2label.items()},
            pad_id=text_config.pad_token_id,
            max_positions=getattr(text_config, "max_position_embeddings", None),
        )
        return cls(model, info)

    def failure(self) -> str | None:
        return None

    @torch.inference_mode()
    def forward(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """Head logits ``[len(seqs), num_labels]`` (float32, CPU) of one padded batch."""
        input_ids, attention_mask = pad_right(seqs, self.info.pad_id)
        device = self.model.device
        out = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        return out.logits.float().cpu()

    def forward_each(self, batches: Sequence[Sequence[list[int]]], deliver: Deliver) -> None:
        one_by_one(self.forward, batches, deliver)

    def close(self) -> None:
        """Nothing to release: the model goes with this object."""


class ProcessRunner:
    """The model in a spawned child process; each ``forward`` is one request over a pipe.

    Spawned, not forked: the parent runs threads, and a forked CUDA context is unusable. The
    child ignores SIGINT (a Ctrl-C reaches the whole process group; the server drains first, then
    closes the pipe) and exits when the pipe closes, which also happens if the server is killed.
    """

    def __init__(self, process: mp.process.BaseProcess, conn: Connection, info: ModelInfo) -> None:
        self.info = info
        self._process = process
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def start(cls, settings: ServiceSettings, pad_fallback: int | None) -> ProcessRunner:
        """Spawn the child and wait until it has loaded the model; re-raises its load error."""
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        process = ctx.Process(
            target=_serve, args=(child_conn, settings, pad_fallback), name="reward-model"
        )
        process.start()
        child_conn.close()  # only the child holds that end now: its exit is our EOF
        try:
            info = _receive(conn, process)
        except BaseException:
            conn.close()
            _stop(process, timeout_s=10.0)
            raise
        logger.info("model process %d loaded the model", process.pid)
        return cls(process, conn, info)

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    def failure(self) -> str | None:
        if self._process.is_alive():
            return None
        return str(ModelProcessExited(self._process.exitcode))

    def forward(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """Head logits ``[len(seqs), num_labels]`` (float32), computed in the child."""
        with self._lock:
            self._send(seqs)
            return self._logits()

    def forward_each(self, batches: Sequence[Sequence[list[int]]], deliver: Deliver) -> None:
        """Like :meth:`forward` for each batch, but all batches are sent before the first result
        is read when results are small, so the child runs them back to back."""
        ahead = sum(map(len, batches)) * self.info.num_labels <= _AHEAD_MAX_FLOATS
        window = len(batches) if ahead else 1
        with self._lock:
            sent = 0
            for k in range(len(batches)):
                while sent < len(batches) and sent - k < window:
                    self._send(batches[sent])
                    sent += 1
                try:
                    logits = self._logits()
                except ModelProcessExited:
                    raise
                except Exception as exc:  # the child's error for this batch; it goes on
                    deliver(k, exc)
                else:
                    deliver(k, logits)

    def _send(self, seqs: Sequence[list[int]]) -> None:
        try:
            self._conn.send(seqs)
        except OSError as exc:  # a broken pipe: the child is gone
            self._process.join(1.0)
            raise ModelProcessExited(self._process.exitcode) from exc

    def _logits(self) -> torch.Tensor:
        return torch.tensor(_receive(self._conn, self._process), dtype=torch.float32)

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the pipe (the child exits when it sees that) and wait for the child."""
        self._conn.close()
        _stop(self._process, timeout_s)


def _receive(conn: Connection, process: mp.process.BaseProcess) -> Any:
    """The child's next answer; re-raises the error it sent, or ModelProcessExited."""
    try:
        kind, payload = conn.recv()
    except (EOFError, OSError) as exc:
        process.join(1.0)  # it is exiting: collect its exit code
        raise ModelProcessExited(process.exitcode) from exc
    if kind == "error":
        raise payload
    return payload


def _stop(process: mp.process.BaseProcess, timeout_s: float) -> None:
    """Wait ``timeout_s`` for the child to exit on its own, then kill it."""
    process.join(timeout_s)
    if process.is_alive():
        logger.error("model process %d did not exit; killing it", process.pid)
        process.kill()
        process.join()


def _serve(conn: Connection, settings: ServiceSettings, pad_fallback: int | None) -> None:
    """The child: load the model, then answer forward requests until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        runner = LocalRunner.load(settings, pad_fallback)
    except Exception as exc:
        conn.send(("error", _portable(exc)))
        return
    conn.send(("ready", runner.info))
    while True:
        try:
            seqs = conn.recv()
        except EOFError:
            return
        try:
            reply: tuple[str, Any] = ("ok", runner.forward(seqs).tolist())
        except Exception as exc:
            reply = ("error", _portable(exc))
        conn.send(reply)


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
