"""mt: a machine-translation training pipeline (prepare, train, translate, evaluate)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Translator", "__version__"]

if TYPE_CHECKING:
    from mt.translate.translator import Translator


def __getattr__(name: str) -> Any:
    # Imported on first use, so `mt prepare` does not pay for loading torch.
    if name == "Translator":
        from mt.translate.translator import Translator

        return Translator
    raise AttributeError(f"module 'mt' has no attribute {name!r}")
