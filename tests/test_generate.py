"""gatedsl.generate: greedy decoding equals the argmax continuation of repeated full forwards of the compiled model,
for batches of prompts of different lengths (an attention LM and two recurrent LMs, -O0 and -O2); the sampling
filters equal transformers' logits warpers; seeds, stop tokens, padded tensor prompts and bad arguments.

Greedy tokens are compared exactly: the models run in float64, where the decoded and the full forward's logits agree
to ~1e-12, far below the gap between a row's two best scores on random weights (checked: above 1e-6 at every step,
else the test would compare ties).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import gatedsl
from gatedsl.generation import Generation, generate, top_k_filter, top_p_filter, warp

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,  # noqa: E402
                                                     TopKLogitsWarper, TopPLogitsWarper)

ROOT = Path(__file__).resolve().parent.parent
MIXTRAL = ROOT / "specs" / "zoo" / "mixtral.gate"
MAMBA = ROOT / "specs" / "zoo" / "mamba.gate"
GLA_LM = ROOT / "examples" / "gla_lm.gate"
VOCAB = 23
MODELS = {  # tiny configurations: two layers, a vocabulary of 23
    "mixtral": (MIXTRAL, dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "mamba": (MAMBA, dict(vocab_size=VOCAB, hidden_size=20, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3)),
    "gla_lm": (GLA_LM, dict(vocab=VOCAB, d=16, layers=2, heads=2)),
}
PROMPTS = [[3, 1, 4, 1, 5], [9], [2, 6, 5], [3, 5, 8, 9, 7, 9, 3], [2, 6, 5]]  # different lengths, one repeated


@functools.cache  # shared by the tests, which leave it as they found it (generate restores the training flag)
def compiled(name: str, opt_level: int = 2):
    spec, params = MODELS[name]
    torch.manual_seed(0)
    return gatedsl.compile(spec, params, opt_level=opt_level).double()


def argmax_continuation(model, prompt: list[int], count: int) -> list[int]:
    """The greedy continuation by a full forward over the whole sequence for every new token (no decoder)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            scores = model(torch.tensor([ids]))[0, -1]
            best, second = scores.topk(2).values
            assert best - second > 1e-6, "a near tie: the comparison would depend on rounding"
            ids.append(int(scores.argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------- greedy decoding against full forwards
@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_the_argmax_of_repeated_full_forwards(name, opt_level):
    model = compiled(name, opt_level)
    result = generate(model, PROMPTS, 6)
    assert result.tokens == [argmax_continuation(model, p, 6) for p in PROMPTS]
    assert result.prompts == PROMPTS and result.finished == ["length"] * len(PROMPTS)
    assert result.sequences == [p + t for p, t in zip(PROMPTS, result.tokens)]
    assert model.training  # compile returns a module in training mode; generate restores it


def test_a_batch_gives_each_row_what_it_gets_alone():
    model = compiled("mixtral")
    together = generate(model, PROMPTS, 5, temperature=0).tokens
    assert together == [generate(model, [p], 5).tokens[0] for p in PROMPTS]


def test_left_and_right_padded_tensors_with_lengths_give_the_list_form():
    model = compiled("mamba", opt_level=0)
    expected = generate(model, PROMPTS, 4)
    width = max(map(len, PROMPTS))
    lengths = torch.tensor([len(p) for p in PROMPTS])
    left = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    right = torch.tensor([p + [VOCAB - 1] * (width - len(p)) for p in PROMPTS])
    assert generate(model, left, 4, lengths=lengths) == expected  # padding="left", as transformers pads
    assert generate(model, right, 4, lengths=lengths.tolist(), padding="right") == expected
    same = torch.tensor([[1, 2, 3], [4, 5, 6]])  # no lengths: every row is a whole prompt
    assert generate(model, same, 3) == generate(model, same.tolist(), 3)


def test_a_decoder_may_be_passed_instead_of_the_model():
    model = compiled("gla_lm")
    decoder = gatedsl.Decoder(model, seq="T")
    assert generate(decoder, PROMPTS, 4) == generate(model, PROMPTS, 4)


STYLED = """\
model Styled(vocab: int = 13) {
  input style: [B, 4]
  input ids: int[B, T]
  input scale: [8]
  h = (embedding(ids, vocab, 8) + unsqueeze(linear(style, 8), 1)) * scale
  output logits = linear(cumsum(tanh(h), dim=1), vocab)
}
"""


def test_the_models_other_inputs_come_from_context():
    torch.manual_seed(0)
    model = gatedsl.compile(STYLED).double()
    style, scale = torch.randn(len(PROMPTS), 4, dtype=torch.float64), torch.rand(8, dtype=torch.float64) + 0.5
    result = generate(model, PROMPTS, 4, input="ids", context={"style": style, "scale": scale})
    assert result.tokens == [argmax_continuation(lambda ids: model(style[i:i + 1], ids, scale), p, 4)
                             for i, p in enumerate(PROMPTS)]
    assert result.tokens != generate(model, PROMPTS, 4, input="ids", context={"style": -style, "scale": scale}).tokens
    for context, error, match in [
        ({"style": style}, ValueError, "input scale must be given with context="),
        ({"style": style, "scale": scale, "other": scale}, ValueError, "context names 'other'"),
        ({"style": style[:2], "scale": scale}, ValueError, "context style needs a row for each of the 5 prompts"),
        ({"style": style, "scale": [1.0] * 8}, TypeError, "each a tensor"),
    ]:
        with pytest.raises(error, match=match):
            generate(model, PROMPTS, 4, input="ids", context=context)
    along = gatedsl.compile("model A() {\n  input a: int[B, T]\n  input b: [B, T, 2]\n"
                            "  output y = linear(embedding(a, 9, 2) + b, 9)\n}")
    with pytest.raises(ValueError, match="input b runs along T, but generate feeds along T only the token ids"):
        generate(along, [[1]], 1, input="a", context={"b": torch.zeros(1, 1, 2)})


# ---------------------------------------------------------------- sampling
def test_the_same_seed_gives_the_same_tokens_and_other_seeds_other_ones():
    model = compiled("gla_lm")
    first = generate(model, PROMPTS, 8, temperature=1.5, seed=7)
    assert generate(model, PROMPTS, 8, temperature=1.5, seed=7) == first
    generator = torch.Generator().manual_seed(7)  # a generator seeded alike draws alike
    assert generate(model, PROMPTS, 8, temperature=1.5, seed=generator) == first
    others = [generate(model, PROMPTS, 8, temperature=1.5, seed=s).tokens for s in (8, 9)]
    assert all(tokens != first.tokens for tokens in others)


def test_top_k_of_one_is_greedy():
    model = compiled("mamba")
    greedy = generate(model, PROMPTS, 6)
    assert generate(model, PROMPTS, 6, temperature=2.0, top_k=1, seed=3).tokens == greedy.tokens
    assert generate(model, PROMPTS, 6, temperature=2.0, top_p=1e-9, seed=3).tokens == greedy.tokens


def test_sampled_tokens_stay_inside_the_top_k():
    model = compiled("gla_lm")
    result = generate(model, [[1, 2]], 12, temperature=3.0, top_k=2, seed=0)
    ids = [1, 2]
    with torch.no_grad():
        for token in result.tokens[0]:
            allowed = model(torch.tensor([ids]))[0, -1].topk(2).indices.tolist()
            assert token in allowed
            ids.append(token)


@pytest.mark.parametrize("seed", range(3))
def test_filters_equal_transformers_warpers(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 50, generator=gen, dtype=torch.float64) * 3
    logits[0, :10] = logits[0, 10]  # ties at the cut
    logits[1] = 0  # a flat row
    ids = torch.zeros(6, 1, dtype=torch.long)
    for k in (1, 2, 7, 50, 80):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits))
    for p in (1e-6, 0.1, 0.5, 0.9, 0.999, 1.0):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits))
    for temperature, k, p in [(0.7, 5, 0.8), (1.3, None, 0.6), (2.0, 3, None), (1.0, None, None), (0.5, 40, 1.0)]:
        # transformers' order (GenerationMixin._get_logits_processor): temperature, then top-k, then top-p
        reference = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(k)] if k else [])
                                        + ([TopPLogitsWarper(p)] if p else []))
        assert torch.equal(warp(logits, temperature, k, p), reference(ids, logits))


def test_top_p_keeps_the_smallest_set_reaching_p_and_at_least_one_token():
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.98, 0.01, 0.01]]).log()
    kept = top_p_filter(logits, 0.75).isfinite()
    assert kept.tolist() == [[True, True, False], [True, False, False]]
    assert top_p_filter(logits, 0.8).isfinite()[0].tolist() == [True, True, False]  # 0.5 + 0.3 reaches 0.8
    assert top_p_filter(logits, 1e-9).isfinite().sum(-1).tolist() == [1, 1]


# ---------------------------------------------------------------- stop tokens and the result
def test_a_row_that_emits_a_stop_token_stops_and_the_others_go_on():
    model = compiled("mixtral")
    free = generate(model, PROMPTS, 8).tokens
    stop = max(free[0], key=free[0].index)  # the token of row 0 that comes first the latest
    result = generate(model, PROMPTS, 8, stop=stop)
    for free_row, row, finished in zip(free, result.tokens, result.finished):
        cut = free_row.index(stop) + 1 if stop in free_row else len(free_row)
        assert row == free_row[:cut]
        assert finished == ("stop" if stop in free_row else "length")
    assert result.finished[0] == "stop" and 1 < len(result.tokens[0]) < 8 > min(map(len, result.tokens))
    assert "length" in result.finished  # some row went on to the end
    several = generate(model, PROMPTS, 8, stop=[free[0][0], free[1][0]])
    assert several.tokens[:2] == [free[0][:1], free[1][:1]] and several.finished[:2] == ["stop", "stop"]


def test_every_row_stopping_ends_the_loop():
    model = compiled("gla_lm")
    free = generate(model, [[1], [2]], 5).tokens
    calls = []
    result = generate(model, [[1], [2]], 50, stop=[free[0][0], free[1][0]], progress=lambda *a: calls.append(a))
    assert result.tokens == [free[0][:1], free[1][:1]] and calls == [(1, 50)]


def test_padded_tensor_and_progress():
    result = Generation(prompts=[[1], [2]], tokens=[[5, 6, 7], [8]], finished=["length", "stop"])
    assert result.padded(-1).tolist() == [[5, 6, 7], [8, -1, -1]]
    model = compiled("gla_lm")
    calls = []
    generate(model, [[1, 2]], 3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    nothing = generate(model, [[1, 2], [3]], 0)
    assert nothing.tokens == [[], []] and nothing.padded().shape == (2, 0)


def test_the_model_returns_to_its_mode_and_runs_without_gradients():
    model = gatedsl.compile(GLA_LM, MODELS["gla_lm"][1]).eval()
    generate(model, [[1, 2]], 2)
    assert not model.training
    model.train()
    generate(model, [[1, 2]], 2, temperature=1.0)
    assert model.training and all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=1.0, top_p=0.0), ValueError, "top_p"),
    (dict(temperature=1.0, top_p=1.5), ValueError, "top_p"),
    (dict(temperature=1.0, top_k=0), ValueError, "top_k"),
    (dict(top_k=3), ValueError, "temperature 0"),
    (dict(seed="7"), TypeError, "seed"),
    (dict(stop=VOCAB), ValueError, "stop token"),
    (dict(stop="1"), TypeError, "stop"),
    (dict(prompts=[1, 2, 3]), TypeError, r"\[\[1, 2, 3\]\]"),
    (dict(prompts=[torch.tensor(1)]), TypeError, "each a list of token ids"),
    (dict(prompts=[]), ValueError, "no prompts"),
    (dict(prompts=[[1], []]), ValueError, "prompt 1 is empty"),
    (dict(prompts=[[1, VOCAB]]), ValueError, f"0 to {VOCAB - 1}"),
    (dict(prompts=[[1, -2]]), ValueError, "prompt 0 holds -2"),
    (dict(prompts=torch.ones(2, 3)), ValueError, "token ids"),
    (dict(prompts=torch.ones(2, 3, dtype=torch.long), lengths=[3, 0]), ValueError, "lengths"),
    (dict(prompts=torch.ones(2, 3, dtype=torch.long), lengths=[3]), ValueError, "lengths"),
    (dict(lengths=[1]), ValueError, "padded tensor"),
    (dict(prompts=torch.ones(1, 3, dtype=torch.long), padding="middle"), ValueError, "padding"),
    (dict(input="x"), ValueError, "inputs are input_ids"),
    (dict(output="y"), ValueError, "outputs are logits"),
    (dict(progress=3), TypeError, "progress"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    model = compiled("mamba")
    call = dict(prompts=[[1, 2]], max_new_tokens=2) | kwargs
    with pytest.raises(error, match=match):
        generate(model, call.pop("prompts"), call.pop("max_new_tokens"), **call)


def test_a_model_that_is_not_a_language_model_is_refused_at_its_declaration():
    with pytest.raises(TypeError, match="compiled by gatedsl.compile"):
        generate(torch.nn.Linear(2, 2), [[1]], 1)
    floats = gatedsl.compile("model F() {\n  input x: [B, T, 3]\n  output y = linear(x, 5)\n}")
    with pytest.raises(gatedsl.SpecError, match=r"input x: \[B, T, 3\] is not token ids int\[B, T\]") as caught:
        generate(floats, [[1]], 1)
    assert (caught.value.span.line, caught.value.span.column) == (2, 3)
    pooled = gatedsl.compile("model P() {\n  input ids: int[B, T]\n  output y = linear(mean(embedding(ids, 9, 4), dim=1), 9)\n}")
    with pytest.raises(gatedsl.SpecError, match=r"output y: \[B, 9\] is not next-token scores \[B, T, V\]"):
        generate(pooled, [[1]], 1)
    pointwise = gatedsl.compile("model E() {\n  input ids: int[B, T]\n  output y = linear(embedding(ids, 9, 4), 9)\n}")
    with pytest.raises(ValueError, match="the decoder runs along B, but the model's token ids ids run along T"):
        generate(gatedsl.Decoder(pointwise, seq="B"), [[1]], 1)
    two = gatedsl.compile("model Two() {\n  input a: int[B, T]\n  input b: int[B, T]\n"
                          "  output y = linear(embedding(a, 9, 4) + embedding(b, 9, 4), 9)\n}")
    with pytest.raises(ValueError, match=r"2 inputs \(a, b\): name its token ids with input= \(and give the others"):
        generate(two, [[1]], 1)
