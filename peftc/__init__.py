"""peftc: a compiler-style graph rewriter for parameter-efficient fine-tuning."""

from passes.adapters.registry import methods as _registered
from peftc import distributed
from peftc.adapted import AdaptedModel, DeadAdapterWarning
from peftc.api import compile, from_peft
from peftc.optimizers import create_loraplus_optimizer
from rewrite.spec import SpecError
from rewrite.trace import TraceError

__all__ = [
    "AdaptedModel",
    "DeadAdapterWarning",
    "SpecError",
    "TraceError",
    "compile",
    "create_loraplus_optimizer",
    "distributed",
    "from_peft",
    "methods",
]
__version__ = "0.1.0"


def methods() -> list[str]:
    """The spec names of the registered adapter methods, sorted."""
    return list(_registered())
