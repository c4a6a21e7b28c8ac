"""gatedsl: a declarative language and optimizing compiler for gated neural architectures."""

from gatedsl.api import GateInfo, Report, check, compile, example_inputs
from gatedsl.errors import SpecError

__version__ = "0.1.0"
__all__ = ["SpecError", "Report", "GateInfo", "check", "compile", "example_inputs", "__version__"]
