"""Names a spec may use but generated code may not: an instance path segment (a weight's module) must not clash with
torch.nn.Module / fx.GraphModule attributes (`training`, `forward`, `state_dict`, `_modules`, ...) or be a Python
keyword, and an input (an argument of the generated forward) must not shadow what that code reads (`self`, `torch`).

Hard-coded so that `gatedsl.check` never imports torch; tests/test_fuzz.py asserts the sets cover
`dir(torch.nn.Module)`, `dir(torch.fx.GraphModule)` and torch.fx's reserved names for the installed torch.
"""

from __future__ import annotations

import builtins
import functools
import keyword

# Every public attribute of torch.nn.Module and torch.fx.GraphModule (classes and instances), torch 2.4 to 2.13,
# plus a few that recent releases added or that stand next to them. Private names (a leading "_") are all avoided.
MODULE_ATTRIBUTES = frozenset("""
    T_destination add_module add_submodule apply bfloat16 buffers call_super_init children code compile cpu cuda
    delete_all_unused_submodules delete_submodule double dump_patches eval extra_repr float forward get_buffer
    get_extra_state get_parameter get_submodule graph half ipu load_state_dict meta modules mtia named_buffers
    named_children named_modules named_parameters parameters print_readable recompile register_backward_hook
    register_buffer register_forward_hook register_forward_pre_hook register_full_backward_hook
    register_full_backward_pre_hook register_load_state_dict_post_hook register_load_state_dict_pre_hook
    register_module register_parameter register_state_dict_post_hook register_state_dict_pre_hook requires_grad_
    set_extra_state set_submodule shape_env share_memory state_dict to to_empty to_folder train training type xpu
    zero_grad hpu npu xla
    smart_apply
""".split())  # smart_apply: transformers adds it to torch.nn.Module when it is imported

# `aux`: gatedsl's compiled modules read their aux values there (gatedsl.aux_outputs).
RESERVED = MODULE_ATTRIBUTES | frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | {"self", "aux"}


# A model input or a cell parameter becomes an argument of the generated forward(): it must not be a keyword, `self`,
# or a name the generated code reads as a global (Python builtins such as getattr, and what torch.fx imports).
FX_GLOBALS = frozenset({"self", "torch", "inf", "nan", "NoneType", "device", "fx_pytree", "pytree"})
ARGUMENT_RESERVED = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | FX_GLOBALS


def safe_argument_name(name: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """`name` itself where it can be an argument of generated code, else `name_` (`torch` -> `torch_`), unique among
    `taken`."""
    if not name.isidentifier():
        name = "v_" + "".join(c if c.isalnum() else "_" for c in name)
    while name in ARGUMENT_RESERVED or name in taken:
        name += "_"
    return name


def is_reserved(name: str) -> bool:
    return name in RESERVED or name.startswith("_") or not name.isidentifier()


@functools.lru_cache(maxsize=4096)  # elaboration asks for every statement and weight: a few names, many times
def safe_attribute_name(name: str) -> str:
    """`name` itself where it can be a module attribute; otherwise a close name that can (`training` -> `training_`,
    `_x` -> `x_`)."""
    if not is_reserved(name):
        return name
    stripped = "".join(c if c.isalnum() or c == "_" else "_" for c in name).lstrip("_")
    if not stripped or stripped[0].isdigit():
        stripped = "v" + stripped
    name = stripped + "_"
    while name in RESERVED:  # pragma: no cover - no reserved name ends in "_" today
        name += "_"
    return name
