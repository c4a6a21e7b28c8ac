"""What the tests that compare gatedsl with transformers' (and fla's) modules share: their plain-PyTorch paths, the
gradients of a compiled spec in the reference's layout, and a distance between two samples' distributions."""

from __future__ import annotations

import copy

import torch

from gatedsl.interop.mapping import Mapping, export_state_dict


def torch_function(fn):
    """The plain-PyTorch function behind transformers' kernel wrappers: the `kernels` package's Func module (its
    forward closes over the function), around use_kernel_func_from_hub_with_fallback's functools.wraps wrapper."""
    forward = getattr(type(fn), "forward", None)
    if forward is not None and forward.__closure__:
        fn = dict(zip(forward.__code__.co_freevars, (c.cell_contents for c in forward.__closure__)))["func"]
    return getattr(fn, "__wrapped__", fn)


def use_torch_paths(monkeypatch, module, names) -> None:
    """Point each kernel entry point `names` of a transformers modeling `module` at its own plain-PyTorch function,
    so that no installed kernel (fla, mamba_ssm, causal_conv1d) runs."""
    for name in names:
        fn = torch_function(getattr(module, name))
        # The module's own function, with no kernel to dispatch to.
        assert fn.__code__.co_filename == module.__file__ and not fn.__code__.co_freevars, name
        monkeypatch.setattr(module, name, fn)


def grads_in_ref_layout(model: torch.nn.Module, mapping: Mapping) -> dict[str, torch.Tensor]:
    """Our parameters' gradients, laid out as the reference's state dict (through the mapping's export)."""
    grads = copy.deepcopy(model)
    with torch.no_grad():
        for g, p in zip(grads.parameters(), model.parameters()):
            g.copy_(p.grad)
    return export_state_dict(grads, mapping)


def assert_same_grads(ours: torch.nn.Module, ref: torch.nn.Module, mapping: Mapping, **tol) -> None:
    """Every reference parameter's gradient equals ours, exported through the mapping (a tied table once: the sum of
    its embedding's and head's gradients); none is zero, so each comparison tests something."""
    got = grads_in_ref_layout(ours, mapping)
    for name, p in ref.named_parameters():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], p.grad, **tol, msg=lambda m, name=name: f"{name}: {m}")


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov–Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.flatten().double().sort().values, b.flatten().double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / a.numel()
    cdf_b = torch.searchsorted(b, points, right=True) / b.numel()
    return float((cdf_a - cdf_b).abs().max())
