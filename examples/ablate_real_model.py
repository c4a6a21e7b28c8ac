"""Switch off a gate of a real architecture and fine-tune both versions: Qwen3-Next with and without its attention
output gate.

Qwen3-Next (transformers' Qwen3NextForCausalLM) multiplies each attention head's output by a sigmoid gate of the
layer input before o_proj (Qiu et al. 2025, "Gated Attention for LLMs"). specs/zoo/qwen3_next.gate is that model,
with the gate as a parameter. We build a tiny Qwen3-Next with transformers (random init, seeded: nothing is
downloaded), import its weights into the spec twice: as it is, and with attention_gate="none", which drops the gate's
half of each q_proj on import (gatedsl/interop/qwen3_next.py says so: the mapping drops those rows on purpose).
Both fine-tune on the same batches of the shipped text (examples/data/corpus.txt, character level); the two loss
curves are printed side by side and drawn to examples/ablate_real_model.png. Then the gated model's fine-tuned
weights go back into a Qwen3NextForCausalLM (transformers has no Qwen3-Next without the gate, so the changed
model cannot go back there), which loads them strictly and computes the same logits.

    python examples/ablate_real_model.py            # under 3 minutes of CPU time (one thread)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed: the figure only goes to a file
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402

import gatedsl  # noqa: E402
from gatedsl.interop import export_state_dict, load_state_dict  # noqa: E402
from gatedsl.interop.qwen3_next import qwen3_next_from_transformers  # noqa: E402

HERE = Path(__file__).resolve().parent
SPEC = HERE.parent / "specs" / "zoo" / "qwen3_next.gate"
sys.path.insert(0, str(HERE))  # the text and its helpers, shared by the language-model examples, beside this file
from text_data import CORPUS, encode, every_window, load_text, random_windows, split_text  # noqa: E402

# A tiny Qwen3-Next: its layer schedule (3 gated delta nets, then gated attention), its shared-expert mixture.
SIZES = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, linear_num_key_heads=2, linear_key_head_dim=16, linear_num_value_heads=4,
             linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=48, shared_expert_intermediate_size=48)


def main(steps: int = 300, window: int = 64, batch: int = 16, lr: float = 3e-3, log_every: int = 25,
         eval_chars: int = 20_000, plot: str | Path | None = HERE / "ablate_real_model.png",
         seed: int = 0) -> dict[str, float]:
    """Fine-tune both versions `steps` AdamW steps; print the curves, save the plot, return the final losses."""
    # The matrices here are small: one thread is fastest, and it leaves the other core free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(steps, window, batch, lr, log_every, eval_chars, plot, seed)
    finally:
        torch.set_num_threads(threads)


def run(steps: int, window: int, batch: int, lr: float, log_every: int, eval_chars: int, plot: str | Path | None,
        seed: int) -> dict[str, float]:
    text, source = load_text(CORPUS)
    ids, alphabet = encode(text)
    train_ids, eval_ids = split_text(ids)
    eval_windows = every_window(eval_ids[:eval_chars], window)
    print(f"{source}: {len(ids):,} characters, an alphabet of {len(alphabet)}")

    # The "real model": transformers' own, as a Qwen3-Next checkpoint would come.
    torch.manual_seed(seed)
    config = Qwen3NextConfig(vocab_size=len(alphabet), **SIZES)
    reference = Qwen3NextForCausalLM(config).eval()
    print(f"transformers' Qwen3NextForCausalLM: {sum(p.numel() for p in reference.parameters()):,} parameters, "
          f"layers {config.layer_types}")
    params = {"vocab_size": len(alphabet), **SIZES}
    models, mappings = {}, {}
    for gate in ("elementwise", "none"):
        mappings[gate] = qwen3_next_from_transformers(
            config.num_hidden_layers, heads=config.num_attention_heads, head_dim=config.head_dim,
            linear_key_heads=config.linear_num_key_heads, linear_key_head_dim=config.linear_key_head_dim,
            linear_value_heads=config.linear_num_value_heads, linear_value_head_dim=config.linear_value_head_dim,
            experts=config.num_experts, attention_gate=gate)
        models[gate] = gatedsl.compile(SPEC, params={**params, "attention_gate": gate})
        load_state_dict(models[gate], reference, mappings[gate])  # "none": q_proj's gate rows dropped, on purpose
        report = models[gate].meta["gatedsl_report"]
        print(f"attention_gate={gate!r}: {report.params:,} parameters imported")
    with torch.no_grad():
        probe = eval_windows[:4, :-1]
        gap = (models["elementwise"](probe) - reference(probe).logits).abs().max().item()
    print(f"imported as it is, the spec's logits equal transformers': largest difference {gap:.1e}")

    names = {"elementwise": "gated (Qwen3-Next)", "none": "attention gate off"}
    curves = {gate: [] for gate in models}
    optimizers = {gate: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01) for gate, m in models.items()}
    evaluated = {gate: [evaluate(m, eval_windows)] for gate, m in models.items()}
    print(f"eval loss before fine-tuning: gated {evaluated['elementwise'][0]:.3f}, "
          f"gate off {evaluated['none'][0]:.3f} (uniform guessing: {math.log(len(alphabet)):.3f})")
    print(f"{'step':>5}  {names['elementwise']:>20}  {names['none']:>20}   (train loss, mean of the last "
          f"{log_every} steps)")
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(1, steps + 1):
        windows = random_windows(train_ids, batch, window, gen)  # the same batch for both
        for gate, model in models.items():
            logits = model(windows[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
            optimizers[gate].zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizers[gate].step()
            curves[gate].append(loss.item())
        if step % log_every == 0 or step == steps:
            recent = {gate: sum(c[-log_every:]) / len(c[-log_every:]) for gate, c in curves.items()}
            print(f"{step:5d}  {recent['elementwise']:20.3f}  {recent['none']:20.3f}")
    final = {gate: evaluate(m, eval_windows) for gate, m in models.items()}
    print(f"eval loss after {steps} steps: gated {final['elementwise']:.3f} "
          f"({final['elementwise'] / math.log(2):.2f} bits per character), gate off {final['none']:.3f} "
          f"({final['none'] / math.log(2):.2f})")
    if plot:
        draw(curves, names, log_every, Path(plot))
        print(f"plot: {Path(plot).name}")

    # Back out: the fine-tuned gated model in transformers' layout, loaded strictly by a fresh Qwen3NextForCausalLM.
    back = Qwen3NextForCausalLM(config).eval()
    back.load_state_dict(export_state_dict(models["elementwise"], mappings["elementwise"]), strict=True)
    with torch.no_grad():
        out_gap = (back(probe).logits - models["elementwise"].eval()(probe)).abs().max().item()
    print(f"exported the fine-tuned gated model: Qwen3NextForCausalLM.load_state_dict(strict=True) took it, logits "
          f"equal to {out_gap:.1e}")
    return {"gated": final["elementwise"], "gate_off": final["none"], "initial_gated": evaluated["elementwise"][0],
            "initial_gate_off": evaluated["none"][0], "import_gap": gap, "export_gap": out_gap}


@torch.no_grad()
def evaluate(model, windows: torch.Tensor) -> float:
    model.eval()
    logits = model(windows[:, :-1])
    model.train()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()


def draw(curves: dict[str, list[float]], names: dict[str, str], every: int, path: Path) -> None:
    """Both training curves, each averaged over windows of `every` steps."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for gate, losses in curves.items():
        smooth = [sum(losses[max(0, i - every + 1):i + 1]) / len(losses[max(0, i - every + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=names[gate])
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"train loss, nats/char (mean of {every} steps)")
    ax.set_title("Qwen3-Next with and without its attention output gate", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
