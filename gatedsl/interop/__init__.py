"""Weights in and out: another implementation's state dict to a compiled spec and back, by declared mappings."""

from gatedsl.interop.mapping import (Mapping, MappingError, Rule, export_state_dict, fill, ignore, load_state_dict,
                                     rename, split, tie, transform)
from gatedsl.interop.torch_rnn import load_torch_rnn, scanned_cells, torch_rnn_mapping

__all__ = ["Mapping", "MappingError", "Rule", "rename", "split", "transform", "tie", "fill", "ignore",
           "load_state_dict", "export_state_dict", "load_torch_rnn", "torch_rnn_mapping", "scanned_cells"]
