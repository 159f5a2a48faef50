"""Where the model runs: in the server process, or in a child process of its own (the default).

The server's event loop (HTTP, JSON, tokenizing) and a forward pass both need the GIL: a small
model's forward is mostly Python, a large one's launches its kernels from Python. With the model
in a spawned child, neither waits for the other. The child also runs the batching loop
(:mod:`reward_service.batch_loop`): each request's token ids go to it over a socket, and it
forms the micro-batches and sends head logits back, so a forward pass never waits for the
server. Both runners answer ``forward`` the same way (before serving: warm-up, measurements)
and report the same :class:`ModelInfo`.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel
from transformers.utils import cached_file
from transformers.utils.logging import disable_progress_bar

from reward_service.batch_loop import BatchLimits, BatchLoop, serve_in_thread
from reward_service.link import Link, portable_error
from reward_service.loading import load_model
from reward_service.messages import (
    Message,
    ModelAnswer,
    ModelError,
    ModelLoaded,
    RunForward,
    StartBatchLoop,
    TimeForward,
)
from reward_service.settings import ServiceSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about the loaded model."""

    device: str
    dtype: str
    attn_implementation: str | None
    weights_hash: str
    problem_type: str | None
    num_labels: int
    id2label: dict[int, str]
    pad_id: int
    max_positions: int | None


class Runner(Protocol):
    """A loaded model that scores padded batches of token ids."""

    info: ModelInfo

    def failure(self) -> str | None:
        """Why the model can no longer run; None while it can."""
        ...

    def forward(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """Head logits of one padded batch (warm-up and measurements, before :meth:`serve`)."""
        ...

    def time_forward(self, seqs: Sequence[list[int]]) -> float:
        """Seconds one forward pass of ``seqs`` takes where the model runs (not counting the
        link to it), before :meth:`serve`."""
        ...

    def serve(self, limits: BatchLimits) -> socket.socket:
        """Start the batching loop beside the model; returns the server's end of its link."""
        ...

    def lost(self) -> BaseException:
        """What requests fail with once the loop's link broke without being closed."""
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


def weights_hash(model: PreTrainedModel, name_or_path: str, revision: str | None = None) -> str:
    """Short sha256 of the weight files (safetensors, else .bin) the model was loaded from.

    Falls back to hashing the in-memory state dict when no weight files can be found.
    """
    folder: Path | None = Path(name_or_path)
    if not folder.is_dir():
        try:  # a hub id: the snapshot folder it was downloaded to
            folder = Path(cached_file(name_or_path, "config.json", revision=revision)).parent
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
        """Load the model (local path or hub id) as configured (see :mod:`reward_service.
        loading`): on ``device``, or where ``device_map`` puts it.

        ``pad_fallback`` (the tokenizer's pad, else EOS) is used when the config names no pad
        token: the head reads the score at the last token that is not ``pad_token_id``.
        """
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        disable_progress_bar()  # a progress bar per load is noise in a service log
        model = load_model(settings)
        if settings.device_map is None:
            device = settings.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model.to(device)
        model.eval()
        if settings.compile:
            # Dynamic shapes: one graph for every batch size and length, plus the shapes with a
            # 1 in them, which dynamo specializes (the warm-up runs each kind).
            model.compile(dynamic=True)
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
            attn_implementation=getattr(model.config, "_attn_implementation", None),
            weights_hash=weights_hash(model, settings.model, settings.revision),
            problem_type=model.config.problem_type,
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

    def time_forward(self, seqs: Sequence[list[int]]) -> float:
        start = time.perf_counter()
        self.forward(seqs)
        return time.perf_counter() - start

    def serve(self, limits: BatchLimits) -> socket.socket:
        """The batching loop in a thread of this process (see :func:`serve_in_thread`)."""
        return serve_in_thread(self.forward, limits)

    def lost(self) -> BaseException:
        return RuntimeError("the batching thread stopped; see the log")

    def close(self) -> None:
        """Nothing to release: the model goes with this object (the batching thread stops
        when the server closes its link)."""


class ProcessRunner:
    """The model in a spawned child process, which answers ``forward`` requests over a link
    until :meth:`serve` turns it into the batching loop.

    Spawned, not forked: the parent runs threads, and a forked CUDA context is unusable. The
    child ignores SIGINT (a Ctrl-C reaches the whole process group; the server drains first, then
    closes the link) and exits when the link closes, which also happens if the server is killed.
    """

    def __init__(self, process: mp.process.BaseProcess, link: Link, info: ModelInfo) -> None:
        self.info = info
        self._process = process
        self._link: Link | None = link
        self._lock = threading.Lock()

    @classmethod
    def start(cls, settings: ServiceSettings, pad_fallback: int | None) -> ProcessRunner:
        """Spawn the child and wait until it has loaded the model; re-raises its load error."""
        ctx = mp.get_context("spawn")
        ours, theirs = socket.socketpair()
        process = ctx.Process(
            target=_model_process_main, args=(theirs, settings, pad_fallback), name="reward-model"
        )
        process.start()
        theirs.close()  # only the child holds that end now: its exit is our EOF
        link = Link(ours)
        try:
            info = _reply(link, process)
            if not isinstance(info, ModelInfo):
                raise TypeError(f"expected the model's info, got {info!r}")
        except BaseException:
            link.close()
            _stop(process, timeout_s=10.0)
            raise
        logger.info("model process %d loaded the model", process.pid)
        return cls(process, link, info)

    def failure(self) -> str | None:
        if self._process.is_alive():
            return None
        return str(ModelProcessExited(self._process.exitcode))

    def forward(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """Head logits ``[len(seqs), num_labels]`` (float32), computed in the child."""
        return torch.tensor(self._ask(RunForward(list(seqs))), dtype=torch.float32)

    def time_forward(self, seqs: Sequence[list[int]]) -> float:
        return float(self._ask(TimeForward(list(seqs))))

    def _ask(self, request: RunForward | TimeForward) -> Any:
        """The child's answer to one request (before :meth:`serve`)."""
        with self._lock:
            if self._link is None:
                raise RuntimeError("the model process runs the batching loop; use the batcher")
            try:
                self._link.send(request)
            except OSError as exc:  # a broken pipe: the child is gone
                raise self.lost() from exc
            return _reply(self._link, self._process)

    def serve(self, limits: BatchLimits) -> socket.socket:
        """Turn the child into the batching loop; returns the server's end of its link."""
        with self._lock:
            if self._link is None:
                raise RuntimeError("the batching loop is already running")
            link, self._link = self._link, None
            try:
                link.send(StartBatchLoop(limits))
            except OSError as exc:
                link.close()
                raise self.lost() from exc
            return link.detach()

    def lost(self) -> BaseException:
        return _exited(self._process)

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the link if this runner still holds it (the child exits when it sees that;
        once serving, the batcher closes it) and wait for the child."""
        if self._link is not None:
            self._link.close()
        _stop(self._process, timeout_s)


def _reply(link: Link, process: mp.process.BaseProcess) -> Any:
    """The model process's next answer (its model's info, or what it was asked); re-raises
    the error it sent, or ModelProcessExited."""
    try:
        message = link.recv()
    except (EOFError, OSError) as exc:
        raise _exited(process) from exc
    match message:
        case ModelLoaded(info):
            return info
        case ModelAnswer(value):
            return value
        case ModelError(error):
            raise error
        case _:
            raise TypeError(f"unexpected message from the model process: {message!r}")


def _exited(process: mp.process.BaseProcess) -> ModelProcessExited:
    """The error for a child whose link broke: it is exiting, so wait briefly for its exit code."""
    process.join(1.0)
    return ModelProcessExited(process.exitcode)


def _stop(process: mp.process.BaseProcess, timeout_s: float) -> None:
    """Wait ``timeout_s`` for the child to exit on its own, then kill it."""
    process.join(timeout_s)
    if process.is_alive():
        logger.error("model process %d did not exit; killing it", process.pid)
        process.kill()
        process.join()


def _model_process_main(
    sock: socket.socket, settings: ServiceSettings, pad_fallback: int | None
) -> None:
    """The model process: load the model, answer forward requests, then run the batching loop
    when asked to, until the link closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    link = Link(sock)
    try:
        runner = LocalRunner.load(settings, pad_fallback)
    except Exception as exc:
        link.send(ModelError(portable_error(exc)))
        return
    link.send(ModelLoaded(runner.info))
    while True:
        try:
            message = link.recv()
        except EOFError:
            return
        if isinstance(message, StartBatchLoop):
            BatchLoop(link, runner.forward, message.limits).run()
            return
        link.send(_answer(runner, message))


def _answer(runner: LocalRunner, message: Message) -> ModelAnswer | ModelError:
    """The model process's answer to one request before the batching loop starts."""
    try:
        match message:
            case RunForward(seqs):
                return ModelAnswer(runner.forward(seqs).tolist())
            case TimeForward(seqs):
                return ModelAnswer(runner.time_forward(seqs))
            case _:
                raise TypeError(f"unexpected message for the model process: {message!r}")
    except Exception as exc:
        return ModelError(portable_error(exc))
