"""Hand-written PyTorch baselines for `gatedsl bench`: what a researcher writes without gatedsl.

Each module computes exactly what its gatedsl spec (benchmarks/specs/*.gate, specs/*.gate)
computes, written the ordinary eager way: `nn.Linear` layers, a Python loop over time for
the recurrences, a loop over experts for the mixture. `load_gatedsl(state_dict)` copies a
compiled gatedsl model's weights in, so both sides compute the same function on the same
weights (tests/test_bench.py checks that they agree on tiny sizes).

torch's own fused layers (torch.nn.GRU / torch.nn.LSTM) are the baselines of the standard
cells; their weights go the other way, into the gatedsl model, with gatedsl.load_torch_rnn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _copy(linear: nn.Linear, state: dict[str, torch.Tensor], prefix: str) -> None:
    with torch.no_grad():
        linear.weight.copy_(state[prefix + ".weight"])
        if linear.bias is not None:
            linear.bias.copy_(state[prefix + ".bias"])


class EagerMGU(nn.Module):
    """Minimal gated unit: f = σ(W_f x + U_f h), n = tanh(W x + U (f ⊙ h)), h' = (1 − f) ⊙ h + f ⊙ n."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.f_x, self.f_h = nn.Linear(d, hidden), nn.Linear(hidden, hidden, bias=False)
        self.n_x, self.n_h = nn.Linear(d, hidden), nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, d] -> [B, T, hidden]
        h = x.new_zeros(x.shape[0], self.hidden)
        outs = []
        for x_t in x.unbind(1):
            f = torch.sigmoid(self.f_x(x_t) + self.f_h(h))
            n = torch.tanh(self.n_x(x_t) + self.n_h(f * h))
            h = (1 - f) * h + f * n
            outs.append(h)
        return torch.stack(outs, 1)

    def load_gatedsl(self, state: dict[str, torch.Tensor]) -> None:
        for mine, theirs in (("f_x", "f.x_proj"), ("f_h", "f.h_proj"), ("n_x", "n.x_proj"), ("n_h", "n.proj")):
            _copy(getattr(self, mine), state, "MGU." + theirs)


class EagerRHN(nn.Module):
    """Recurrent highway network, coupled carry gate: per micro-step l, h_l = tanh(W_H x·[l=1] + R_H s + b_H),
    t_l = σ(W_T x·[l=1] + R_T s + b_T), s ← h_l ⊙ t_l + s ⊙ (1 − t_l)."""

    def __init__(self, d: int, hidden: int, depth: int = 2):
        super().__init__()
        self.hidden = hidden
        self.h_x, self.t_x = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.h_s = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.t_s = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.new_zeros(x.shape[0], self.hidden)
        outs = []
        for x_t in x.unbind(1):
            for layer, (h_s, t_s) in enumerate(zip(self.h_s, self.t_s)):
                if layer == 0:
                    hl = torch.tanh(self.h_x(x_t) + h_s(s))
                    t = torch.sigmoid(self.t_x(x_t) + t_s(s))
                else:
                    hl = torch.tanh(h_s(s))
                    t = torch.sigmoid(t_s(s))
                s = hl * t + s * (1 - t)
            outs.append(s)
        return torch.stack(outs, 1)

    def load_gatedsl(self, state: dict[str, torch.Tensor]) -> None:
        _copy(self.h_x, state, "RHN.micro.0.hl.x_proj")
        _copy(self.t_x, state, "RHN.micro.0.t.x_proj")
        for layer, (h_s, t_s) in enumerate(zip(self.h_s, self.t_s)):
            _copy(h_s, state, f"RHN.micro.{layer}.hl.s_proj")
            _copy(t_s, state, f"RHN.micro.{layer}.t.s_proj")


class EagerGatedGRU(nn.Module):
    """torch's GRU with an extra output gate o = σ(W_o x + U_o h): h' = o ⊙ ((1 − z) ⊙ n + z ⊙ h)."""

    GATES = ("r", "z", "o", "n")

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.x_proj = nn.ModuleDict({g: nn.Linear(d, hidden) for g in self.GATES})
        self.h_proj = nn.ModuleDict({g: nn.Linear(hidden, hidden) for g in self.GATES})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        wx, wh = self.x_proj, self.h_proj
        outs = []
        for x_t in x.unbind(1):
            r = torch.sigmoid(wx["r"](x_t) + wh["r"](h))
            z = torch.sigmoid(wx["z"](x_t) + wh["z"](h))
            o = torch.sigmoid(wx["o"](x_t) + wh["o"](h))
            n = torch.tanh(wx["n"](x_t) + r * wh["n"](h))
            h = o * ((1 - z) * n + z * h)
            outs.append(h)
        return torch.stack(outs, 1)

    def load_gatedsl(self, state: dict[str, torch.Tensor]) -> None:
        for g in self.GATES:
            _copy(self.x_proj[g], state, f"GatedGRU.{g}.x_proj")
            _copy(self.h_proj[g], state, f"GatedGRU.{g}.h_proj")


class EagerGLA(nn.Module):
    """Gated linear attention (Yang et al. 2024), step by step: α_t = σ(x W¹ W² + b)^{1/τ},
    S_t = diag(α_t) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t; y = (LayerNorm_head(o) ⊙ SiLU(x W_r + b_r)) W_O."""

    def __init__(self, d: int, heads: int, key_dim: int, rank: int = 16, tau: float = 16.0):
        super().__init__()
        self.heads, self.tau = heads, tau
        self.q = nn.Linear(d, key_dim, bias=False)
        self.k = nn.Linear(d, key_dim, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.alpha_low = nn.Linear(d, rank, bias=False)
        self.alpha_up = nn.Linear(rank, key_dim)
        self.norm = nn.LayerNorm(d // heads, eps=1e-5)
        self.r = nn.Linear(d, d)
        self.out = nn.Linear(d, d, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, T, n·h] -> [B, n, T, h]
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        alpha = self._heads(torch.exp(F.logsigmoid(self.alpha_up(self.alpha_low(x))) / self.tau))
        state = x.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])  # [B, heads, dk, dv]
        outs = []
        # unbind, not q[:, :, t]: indexing each step would make backward build a full-size zero
        # gradient per step (quadratic in T), which no careful hand-written loop does.
        for q_t, k_t, v_t, a_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), alpha.unbind(2)):
            state = a_t[..., None] * state + k_t[..., None] * v_t[..., None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q_t, state))
        o = self.norm(torch.stack(outs, 2))                  # [B, heads, T, dv]
        o = o.transpose(1, 2).flatten(-2)                    # [B, T, d]
        return self.out(o * F.silu(self.r(x)))

    def load_gatedsl(self, state: dict[str, torch.Tensor]) -> None:
        for mine, theirs in (("q", "q.x_proj"), ("k", "k.x_proj"), ("v", "v.x_proj"), ("alpha_low", "alpha.x_proj"),
                             ("alpha_up", "alpha.proj"), ("r", "g.x_proj"), ("out", "y.proj")):
            _copy(getattr(self, mine), state, "GLA." + theirs)
        with torch.no_grad():
            self.norm.weight.copy_(state["GLA.o_norm.norm.weight"])
            self.norm.bias.copy_(state["GLA.o_norm.norm.bias"])


class EagerSwiGLU(nn.Module):
    """SwiGLU MLP without biases: y = W_down (SiLU(x W) ⊙ x V)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def load_gatedsl(self, state: dict[str, torch.Tensor]) -> None:
        for mine, theirs in (("gate", "g.x_proj"), ("up", "v.x_proj"), ("down", "y.proj")):
            _copy(getattr(self, mine), state, "SwiGLU." + theirs)


class EagerTopKMoE(nn.Module):
    """Top-k mixture of ReLU experts, the usual eager loop: route each token to its k best experts
    (G = softmax of the top-k router logits), run each expert on the tokens routed to it, scatter back."""

    def __init__(self, d: int, experts: int, k: int, hidden: int):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, d]
        top, chosen = self.router(x).topk(self.k, dim=-1)
        weights = torch.softmax(top, dim=-1)                 # [N, k]
        y = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == i)
            if token.numel():
                y = y.index_add(0, token, weights[token, slot, None] * expert(x[token]))
        return y

    def load_gatedsl(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.router.weight.copy_(state["NoisyTopKMoE.clean.x_proj.weight"])
        for i, expert in enumerate(self.experts):
            _copy(expert[0], state, f"NoisyTopKMoE.experts.{i}.expert.h.x_proj")
            _copy(expert[2], state, f"NoisyTopKMoE.experts.{i}.expert.y.h_proj")
