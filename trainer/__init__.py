"""Online DPO trainer that scores samples with a reward model served over HTTP.

``from trainer import OnlineDPOTrainer, OnlineDPOConfig``. The names are imported on first
use, so ``import trainer`` (and the ``online-dpo`` command's argument parsing) stays quick.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.config import OnlineDPOConfig
    from trainer.trainer import OnlineDPOTrainer

__all__ = ["OnlineDPOConfig", "OnlineDPOTrainer"]
_MODULES = {"OnlineDPOConfig": "trainer.config", "OnlineDPOTrainer": "trainer.trainer"}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
