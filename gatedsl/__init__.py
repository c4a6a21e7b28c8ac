"""gatedsl: a declarative language and optimizing compiler for gated neural architectures."""

from gatedsl.api import GateInfo, Report, Target, aux_outputs, check, compile, example_inputs
from gatedsl.errors import SpecError

__version__ = "0.1.0"
__all__ = ["SpecError", "Report", "GateInfo", "Target", "check", "compile", "example_inputs", "load_torch_rnn",
           "aux_outputs", "load_balancing_loss", "Space", "Decoder", "DecodeState", "generate", "__version__"]


def __getattr__(name: str):
    # Imported on first use: gatedsl.interop needs torch, which `check` never imports.
    if name == "load_torch_rnn":
        from gatedsl.interop import load_torch_rnn

        return load_torch_rnn
    if name == "load_balancing_loss":  # needs torch too
        from gatedsl.losses import load_balancing_loss

        return load_balancing_loss
    if name in ("Decoder", "DecodeState"):  # need torch
        from gatedsl import decoding

        return getattr(decoding, name)
    if name == "generate":  # needs torch too
        from gatedsl.generation import generate

        return generate
    if name == "Space":  # on first use too: `import gatedsl` (and `gatedsl check`) loads nothing of the search
        from gatedsl.search import Space

        return Space
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
