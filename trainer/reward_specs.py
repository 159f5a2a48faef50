"""Reward sources as configured: ``reward_funcs`` / ``reward_url`` / ``reward_weights`` parsed and
checked at start-up, before any model loads (no network, no torch work).

An entry of ``reward_funcs`` is one reward source:

- a reward-service URL (``http://HOST:PORT``); one entry may name several replicas of the same
  service, as a list or as one comma-separated string;
- a Python reward function given as an import path, ``package.module:function`` (or TRL's
  script form ``package.module.function``); the current directory is importable, as in TRL's
  ``grpo.py``;
- a callable itself (Python API).

Functions are called the way TRL's GRPO trainer calls them:
``fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)``, where
``columns`` are the dataset's columns other than ``prompt`` (``completion`` and
``completion_ids`` are not passed as columns either, as in TRL).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from common.client import split_urls

# The keyword arguments of every reward-function call (TRL's names).
CALL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")
# TRL's logging callbacks, passed to the functions that take them (by name or **kwargs).
LOGGING_ARGUMENTS = ("log_extra", "log_metric")
# Dataset columns TRL does not pass to reward functions.
NOT_COLUMNS = frozenset({"prompt", "completion", "completion_ids"})
MODEL_CHANGE_POLICIES = ("warn", "stop")

_IDENT = r"[A-Za-z_]\w*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
_IMPORT_PATH = re.compile(rf"^(?P<module>{_DOTTED})(?::(?P<attr>{_DOTTED}))?$")

RewardFunction = Callable[..., Any]
RewardFuncEntry = str | Sequence[str] | RewardFunction


class RewardConfigError(ValueError):
    """A reward source, weight or policy that cannot work; found before training starts."""


@dataclass(frozen=True)
class ServiceSpec:
    """A reward service: its replica URLs (validated, normalised)."""

    urls: tuple[str, ...]


@dataclass(frozen=True)
class FunctionSpec:
    """A reward function: the callable, where it came from (for messages), its display name
    (``__name__``, as TRL names it) and whether it is ``async``."""

    func: RewardFunction
    label: str
    name: str
    is_async: bool


SourceSpec = ServiceSpec | FunctionSpec


def callable_name(func: Callable[..., Any]) -> str:
    """Display name of a callable, as TRL's ``get_callable_name``: a function's ``__name__``,
    the wrapped function's for a ``functools.partial``, else the class name."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def is_async_callable(func: Callable[..., Any]) -> bool:
    """Whether calling ``func`` returns a coroutine (functions, partials, and callable objects
    whose ``__call__`` is ``async``), as TRL's ``is_async_callable``."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(func.__call__)


def import_path_of(func: Callable[..., Any]) -> str:
    """``module:qualname`` of a callable (how it is written into saved arguments and logs)."""
    target = func.func if isinstance(func, functools.partial) else func
    module = getattr(target, "__module__", None) or "?"
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{qualname}"


def load_import_path(path: str) -> RewardFunction:
    """The callable at ``package.module:attr`` (``attr`` may be dotted) or at TRL's
    ``package.module.attr``. Raises :class:`RewardConfigError` naming what failed."""
    match = _IMPORT_PATH.match(path)
    if match is None:
        raise RewardConfigError(f"{path!r} is not an import path (package.module:function)")
    module_name, attr = match["module"], match["attr"]
    if attr is None:  # TRL's form: the last dotted part is the attribute
        if "." not in module_name:
            raise RewardConfigError(f"{path!r} names no function: write package.module:function")
        module_name, attr = module_name.rsplit(".", 1)
    cwd = os.getcwd()
    if cwd not in sys.path:  # TRL's grpo.py makes the working directory importable too
        sys.path.append(cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raised while importing
        raise RewardConfigError(
            f"reward function {path!r}: cannot import module {module_name!r}: "
            f"{type(e).__name__}: {e}"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardConfigError(
                f"reward function {path!r}: {getattr(obj, '__name__', obj)!r} has no "
                f"attribute {part!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardConfigError(
            f"reward function {path!r} is a {type(obj).__name__}, not a callable"
        )
    return obj


def check_call_signature(spec: FunctionSpec, columns: Collection[str] | None = None) -> None:
    """Raise :class:`RewardConfigError` unless ``spec.func`` accepts TRL's call.

    With ``columns`` (the dataset's columns passed to functions) the whole call is checked:
    every argument must be accepted and every required parameter supplied. Without them
    (start-up, before the dataset is known) only the four call arguments are checked, and a
    required parameter of another name is taken for a column.
    """
    try:
        signature = inspect.signature(spec.func)
    except (TypeError, ValueError) as e:
        raise RewardConfigError(
            f"reward function {spec.label}: its signature cannot be inspected ({e}); wrap it "
            "in a def taking prompts, completions, completion_ids, trainer_state, **kwargs"
        ) from e
    arguments = dict.fromkeys(CALL_ARGUMENTS + logging_arguments(spec.func))
    if columns is not None:
        arguments.update(dict.fromkeys(columns))
    try:
        if columns is None:
            signature.bind_partial(**arguments)
        else:
            signature.bind(**arguments)
    except TypeError as e:
        called = "prompts=, completions=, completion_ids=, trainer_state="
        if columns:
            called += ", " + ", ".join(f"{c}=" for c in sorted(columns))
        raise RewardConfigError(
            f"reward function {spec.label} with signature {_bare(signature)} cannot be called as "
            f"fn({called}): {e} "
            "(take the arguments by these names, or add **kwargs)"
        ) from e


def logging_arguments(func: RewardFunction) -> tuple[str, ...]:
    """Which of TRL's logging callbacks ``func`` is given: both if it takes ``**kwargs``,
    else those it names (TRL passes both always; a function without them is still called)."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return LOGGING_ARGUMENTS
    return tuple(name for name in LOGGING_ARGUMENTS if name in parameters)


def _bare(signature: inspect.Signature) -> inspect.Signature:
    """The signature without annotations (shorter in messages)."""
    empty = inspect.Parameter.empty
    return signature.replace(
        parameters=[p.replace(annotation=empty) for p in signature.parameters.values()],
        return_annotation=empty,
    )


def check_columns(specs: Sequence[SourceSpec], columns: Collection[str]) -> list[str]:
    """The dataset columns passed to reward functions (all but TRL's excluded ones), after
    checking every function's signature against them and that none shadows a call argument."""
    passed = sorted(c for c in columns if c not in NOT_COLUMNS)
    clashing = sorted(set(passed) & set(CALL_ARGUMENTS + LOGGING_ARGUMENTS))
    if clashing and any(isinstance(s, FunctionSpec) for s in specs):
        raise RewardConfigError(
            f"dataset column(s) {clashing} have the names of reward-function arguments; rename them"
        )
    for spec in specs:
        if isinstance(spec, FunctionSpec):
            check_call_signature(spec, passed)
    return passed


def _entry_label(index: int, entry: Any) -> str:
    return f"reward_funcs[{index}] ({entry!r})"


def _looks_like_url(entry: str) -> bool:
    return "://" in entry


def parse_entry(index: int, entry: Any) -> SourceSpec:
    """One ``reward_funcs`` entry as a source; raises :class:`RewardConfigError`."""
    label = _entry_label(index, entry)
    if callable(entry):
        spec = FunctionSpec(
            entry, f"{callable_name(entry)!r} ({import_path_of(entry)})", callable_name(entry),
            is_async_callable(entry),
        )  # fmt: skip
        check_call_signature(spec)
        return spec
    if isinstance(entry, str):
        text = entry.strip()
        if _looks_like_url(text):
            try:
                return ServiceSpec(tuple(split_urls(text)))
            except ValueError as e:
                raise RewardConfigError(f"{label}: {e}") from e
        if _IMPORT_PATH.match(text) and (":" in text or "." in text):
            func = load_import_path(text)
            spec = FunctionSpec(func, repr(text), callable_name(func), is_async_callable(func))
            check_call_signature(spec)
            return spec
        raise RewardConfigError(
            f"{label} is neither a reward service URL (http://HOST:PORT; replicas "
            "comma-separated) nor an import path of a reward function (package.module:function)"
        )
    if isinstance(entry, Sequence) and entry and all(isinstance(u, str) for u in entry):
        if not all(_looks_like_url(u) for u in entry):
            raise RewardConfigError(
                f"{label}: a list entry holds the replica URLs of one reward service "
                "(http://HOST:PORT each)"
            )
        try:
            return ServiceSpec(tuple(split_urls(" ".join(entry))))
        except ValueError as e:
            raise RewardConfigError(f"{label}: {e}") from e
    raise RewardConfigError(
        f"{label} must be a URL, a list of replica URLs, an import path or a callable, "
        f"not {type(entry).__name__}"
    )


def parse_reward_sources(
    reward_funcs: Sequence[RewardFuncEntry] | RewardFuncEntry | None,
    reward_url: str | Sequence[str] | None = None,
) -> list[SourceSpec]:
    """The configured reward sources, in order. ``reward_url`` is the one-service shorthand;
    giving it together with ``reward_funcs`` is an error (as TRL refuses ambiguous reward
    configuration): the URL then belongs in ``reward_funcs``."""
    if reward_funcs is not None and (isinstance(reward_funcs, str) or callable(reward_funcs)):
        reward_funcs = [reward_funcs]
    if reward_funcs is not None and len(reward_funcs) > 0 and reward_url:
        raise RewardConfigError(
            "give reward_url or reward_funcs, not both: list the reward service URL as an "
            "entry of reward_funcs (e.g. reward_funcs: [http://HOST:PORT, package.module:fn])"
        )
    if reward_funcs:
        return [parse_entry(i, entry) for i, entry in enumerate(reward_funcs)]
    if reward_url:
        urls = reward_url if isinstance(reward_url, str) else " ".join(reward_url)
        try:
            return [ServiceSpec(tuple(split_urls(urls)))]
        except ValueError as e:
            raise RewardConfigError(f"reward_url: {e}") from e
    raise RewardConfigError(
        "no reward source: set reward_url (the reward service) or reward_funcs (services "
        "and/or reward functions)"
    )


def resolve_weights(weights: Sequence[float] | None, num_sources: int) -> list[float]:
    """``reward_weights`` checked against the sources (default: 1.0 each)."""
    if weights is None:
        return [1.0] * num_sources
    weights = list(weights)
    if len(weights) != num_sources:
        raise RewardConfigError(
            f"reward_weights has {len(weights)} value(s) but there are {num_sources} reward "
            f"source(s): give one weight per entry of reward_funcs (or per reward_url)"
        )
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise RewardConfigError(f"reward_weights[{i}] must be a finite number, got {w!r}")
    return [float(w) for w in weights]


def check_reward_config(
    reward_funcs: Sequence[RewardFuncEntry] | RewardFuncEntry | None,
    reward_url: str | Sequence[str] | None,
    reward_weights: Sequence[float] | None,
    reward_model_change: str = "warn",
) -> list[SourceSpec]:
    """Every start-up check of the reward configuration (imports the functions, inspects
    their signatures, counts the weights); returns the sources."""
    if reward_model_change not in MODEL_CHANGE_POLICIES:
        raise RewardConfigError(
            f"reward_model_change must be 'warn' or 'stop', got {reward_model_change!r}"
        )
    specs = parse_reward_sources(reward_funcs, reward_url)
    resolve_weights(reward_weights, len(specs))
    return specs
