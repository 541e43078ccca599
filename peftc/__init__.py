"""peftc: a compiler-style graph rewriter for parameter-efficient fine-tuning."""

from peftc.adapted import AdaptedModel
from peftc.api import compile, from_peft
from peftc.optimizers import create_loraplus_optimizer
from rewrite.spec import SpecError
from rewrite.trace import TraceError

__all__ = [
    "AdaptedModel",
    "SpecError",
    "TraceError",
    "compile",
    "create_loraplus_optimizer",
    "from_peft",
]
__version__ = "0.1.0"
