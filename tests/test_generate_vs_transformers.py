"""Greedy decoding of the zoo's models, with weights imported from transformers, writes the same tokens as transformers'
own `generate` (its KV caches and recurrent caches, on its plain-PyTorch paths): Mamba (MambaForCausalLM), Mixtral
(MixtralForCausalLM) and Qwen3-Next (Qwen3NextForCausalLM: gated delta net layers with their conv and recurrent
state, gated attention layers with a KV cache).

Both sides run in float64 but for transformers' own float32 casts (RMSNorm, eager softmax, router softmax; see the
zoo tests). The weights are moved off their init so that every step's logits have a clear argmax: the tokens are
compared exactly, and each step's logits to 1e-4 (float32's casts compound over the steps). `gatedsl.generate` takes
prompts of different lengths in one batch; transformers generates each alone (its left padding is not exact for
every model), and each row's tokens are the same.
"""

from __future__ import annotations

import pytest
import torch

import gatedsl
from gatedsl.interop.mapping import load_state_dict

transformers = pytest.importorskip("transformers")

import test_zoo_mamba as mamba  # noqa: E402
import test_zoo_mixtral as mixtral  # noqa: E402
import test_zoo_qwen3_next as qwen3_next  # noqa: E402
from test_mamba_vs_transformers import torch_path as mamba_torch_path  # noqa: E402,F401 (autouse)
from test_zoo_qwen3_next import torch_path as qwen3_next_torch_path  # noqa: E402,F401 (autouse)

NEW = 12


def perturbed(ref):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn(p.shape).double()).copy_(p.float().double())
    return ref


REFERENCES = {  # each built only when its test runs
    "mamba": (lambda: perturbed(transformers.MambaForCausalLM(mamba.tiny()).double().eval()), mamba),
    "mixtral": (lambda: mixtral.reference(mixtral.tiny(window=6)), mixtral),  # a window shorter than the text
    "qwen3_next": (lambda: qwen3_next.reference(qwen3_next.config()), qwen3_next),
}


def ours(ref, family, opt_level):
    model = gatedsl.compile(family.SPEC, family.params_of(ref.config), opt_level=opt_level).double().eval()
    load_state_dict(model, ref, family.mapping_of(ref.config))
    return model


def their_tokens(ref, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = ref.generate(prompt, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW, output_logits=True,
                       return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return out.sequences[:, prompt.shape[1]:], torch.stack(out.logits, dim=1)


def our_tokens(decoder: gatedsl.Decoder, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, state = decoder.prefill(prompt)
    tokens, steps = [], []
    for i in range(NEW):
        steps.append(logits[:, -1])
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
        if i + 1 < NEW:
            logits, state = decoder.step(tokens[-1], state=state)
    return torch.cat(tokens, dim=1), torch.stack(steps, dim=1)


@pytest.mark.parametrize("name", ["mamba", "mixtral", "qwen3_next"])
def test_greedy_tokens_equal_transformers_generate(name, opt_level=2):  # -O0 in the test below
    build, family = REFERENCES[name]
    ref = build()
    decoder = gatedsl.Decoder(ours(ref, family, opt_level))
    prompts = torch.randint(1, ref.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs, their_logits = their_tokens(ref, prompts)
        mine, my_logits = our_tokens(decoder, prompts)
    assert torch.equal(mine, theirs), (mine, theirs)
    torch.testing.assert_close(my_logits, their_logits.to(my_logits.dtype), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("name", ["mamba", "mixtral", "qwen3_next"])
def test_generate_of_prompts_of_different_lengths_equals_transformers(name, opt_level):
    build, family = REFERENCES[name]
    ref = build()
    model = ours(ref, family, opt_level)
    rows = torch.randint(1, ref.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(4))
    prompts = [rows[0, :6].tolist(), rows[1, :2].tolist(), rows[2, :4].tolist()]
    got = gatedsl.generate(model, prompts, NEW)
    with torch.no_grad():
        expected = [their_tokens(ref, torch.tensor([p]))[0][0].tolist() for p in prompts]
    assert got.tokens == expected and got.finished == ["length"] * 3
