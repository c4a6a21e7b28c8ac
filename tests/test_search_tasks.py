"""The built-in search tasks: their data are what they claim (checked against references written here from the
definitions), a small model trained on each beats its untrained self, pruning stops a run, a seed fixes a run,
and bad names, options and models get clear errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gatedsl
from gatedsl.search import TASKS, TaskResult, get_task
from gatedsl.search.tasks import IGNORE, lorenz96_trajectories, mqar_examples, rk4_step

ROOT = Path(__file__).resolve().parent.parent
TOKENS = ROOT / "examples" / "search" / "tokens.gate"
FORECASTER = ROOT / "examples" / "search" / "forecaster.gate"
FORECASTER_8 = ROOT / "specs" / "forecaster.gate"  # the README's model: its 8 channels are written in, not a parameter


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and leaves the other core to the rest
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ Lorenz-96: a reference in plain Python
def l96(x: list[float], forcing: float) -> list[float]:
    """dx_i/dt = (x_{i+1} − x_{i−2}) x_{i−1} − x_i + F, each index taken round the ring by hand."""
    n = len(x)
    return [(x[(i + 1) % n] - x[(i - 2) % n]) * x[(i - 1) % n] - x[i] + forcing for i in range(n)]


def rk4(x: list[float], dt: float, forcing: float) -> list[float]:
    k1 = l96(x, forcing)
    k2 = l96([a + dt / 2 * k for a, k in zip(x, k1)], forcing)
    k3 = l96([a + dt / 2 * k for a, k in zip(x, k2)], forcing)
    k4 = l96([a + dt * k for a, k in zip(x, k3)], forcing)
    return [a + dt / 6 * (p + 2 * q + 2 * r + s) for a, p, q, r, s in zip(x, k1, k2, k3, k4)]


@pytest.mark.parametrize("n, forcing", [(4, 8.0), (5, 8.0), (8, 3.5), (11, 0.0)])
def test_rk4_step_equals_the_reference(n, forcing):
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 3
    expected = torch.tensor([rk4(row.tolist(), 0.01, forcing) for row in x], dtype=torch.float64)
    torch.testing.assert_close(rk4_step(x, 0.01, forcing), expected, rtol=1e-13, atol=1e-13)


def test_lorenz96_without_forcing_loses_energy_at_rate_two_to_fourth_order():
    """With F = 0 the advection term conserves Σx² (its sum telescopes round the ring), so
    Σx²(t) = Σx²(0) e^{−2t} exactly; RK4's error there must fall 16-fold each time dt halves."""
    def worst_relative_error(dt: float, every: int) -> float:
        states = lorenz96_trajectories(3, 20, forcing=0.0, dt=dt, sample_every=every, spinup=0,
                                       gen=torch.Generator().manual_seed(0))
        start = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # as it starts
        t = torch.arange(1, 21, dtype=torch.float64) * every * dt
        expected = (start ** 2).sum(-1, keepdim=True) * torch.exp(-2 * t)
        return ((states ** 2).sum(-1) / expected - 1).abs().max().item()

    coarse, fine, finer = worst_relative_error(0.02, 5), worst_relative_error(0.01, 10), worst_relative_error(0.005, 20)
    assert fine < 1e-8
    assert 12 < coarse / fine < 20 and 12 < fine / finer < 20


def test_lorenz96_forcing_alone_is_a_fixed_point():
    x = torch.full((2, 8), 8.0, dtype=torch.float64)
    torch.testing.assert_close(rk4_step(x, 0.01, 8.0), x, rtol=0, atol=0)


def test_lorenz96_trajectories_are_rk4_steps_kept_every_few():
    states = lorenz96_trajectories(2, 6, variables=6, dt=0.01, sample_every=3, spinup=50,
                                   gen=torch.Generator().manual_seed(1))
    for trajectory in states:
        for now, later in zip(trajectory[:-1], trajectory[1:]):
            x = now.tolist()
            for _ in range(3):
                x = rk4(x, 0.01, 8.0)
            torch.testing.assert_close(later, torch.tensor(x, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_lorenz96_windows_are_normalised_consecutive_states():
    task = get_task("lorenz96", train_trajectories=3, val_trajectories=2, states=40, window=8)
    data = task.data()
    assert data["train_x"].shape == (3 * 32, 8, 8) and data["val_x"].shape == (2 * 32, 8, 8)
    torch.testing.assert_close(data["train_x"][:, 1:], data["train_y"][:, :-1], rtol=0, atol=0)
    # The same trajectories from the same seed; the task scales them by the training part's mean and std.
    raw = lorenz96_trajectories(5, 40, gen=torch.Generator().manual_seed(0))
    mean, std = raw[:3].mean().item(), raw[:3].std().item()
    assert data["train_x"].mean().abs() < 0.05 and abs(data["train_x"].std().item() - 1) < 0.05
    for split, first in (("train", 0), ("val", 3)):
        x, y = (data[f"{split}_{k}"].double() * std + mean for k in "xy")
        torch.testing.assert_close(x[0], raw[first, :8], rtol=1e-6, atol=1e-5)  # window 0 of its first trajectory
        torch.testing.assert_close(x[31], raw[first, 31:39], rtol=1e-6, atol=1e-5)
        for t in (0, 5):  # each target is the state RK4 reaches 5 steps (Δt = 0.05) after its input
            state = x[17, t].tolist()
            for _ in range(5):
                state = rk4(state, 0.01, 8.0)
            torch.testing.assert_close(y[17, t], torch.tensor(state, dtype=torch.float64), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------ MQAR and parity
@pytest.mark.parametrize("vocab, length, pairs", [(32, 32, 4), (16, 28, 6), (64, 64, 8)])
def test_mqar_sequences_are_pairs_then_queries_labelled_with_their_values(vocab, length, pairs):
    tokens, labels = mqar_examples(200, vocab=vocab, length=length, kv_pairs=pairs,
                                   gen=torch.Generator().manual_seed(vocab))
    assert tokens.shape == labels.shape == (200, length)
    assert 0 <= tokens.min() and tokens.max() < vocab
    offsets_seen = set()
    for row, label in zip(tokens.tolist(), labels.tolist()):
        keys, values = row[0:2 * pairs:2], row[1:2 * pairs:2]
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert len(set(values)) == pairs and all(vocab // 2 <= v < vocab for v in values)
        paired = dict(zip(keys, values))
        scored = [t for t in range(length) if label[t] != IGNORE]
        assert sorted(row[t] for t in scored) == sorted(keys)  # every key queried exactly once
        for t in scored:
            assert t >= 2 * pairs and (t - 2 * pairs) % 2 == 0
            assert label[t] == paired[row[t]]
            offsets_seen.add(t)
    assert len(offsets_seen) > pairs  # the queries move about


def test_mqar_query_offsets_follow_zoologys_power_law():
    """p(slot g) ∝ (g + 1)^(a − 1): with a = 0.01 the first slot is (2/1)^0.99 ≈ 2x as likely as the second."""
    _, labels = mqar_examples(20000, vocab=32, length=32, kv_pairs=1, power_a=0.01,
                              gen=torch.Generator().manual_seed(0))
    slot = ((labels != IGNORE).float().argmax(-1) - 2) // 2
    counts = torch.bincount(slot, minlength=15).double()
    p = torch.arange(1, 16, dtype=torch.float64) ** (0.01 - 1)
    torch.testing.assert_close(counts / counts.sum(), p / p.sum(), rtol=0, atol=0.01)


def test_parity_labels_are_the_parity_of_every_prefix():
    task = get_task("parity", length=12, train_size=50, val_size=30)
    data = task.data()
    assert data["train_x"].shape == (50, 12) and data["val_x"].shape == (30, 12)
    for split in ("train", "val"):
        for bits, labels in zip(data[f"{split}_x"].tolist(), data[f"{split}_y"].tolist()):
            assert set(bits) <= {0, 1}
            assert labels == [sum(bits[:t + 1]) % 2 for t in range(12)]
    assert 0.4 < data["train_x"].float().mean() < 0.6


def test_fixed_parameters_name_the_sizes_the_data_fix():
    assert get_task("lorenz96").fixed == {"features": 8}
    assert get_task("lorenz96", variables=6).fixed == {"features": 6}
    assert get_task("mqar", vocab=48).fixed == {"vocab": 48}
    assert get_task("parity").fixed == {"vocab": 2}
    assert set(TASKS) == {"lorenz96", "mqar", "parity"}


# ------------------------------------------------------------------------------- training and scoring
def _compiled(spec, params, seed=0):
    torch.manual_seed(seed)
    return gatedsl.compile(spec, params)


LEARNS = [  # task, its options, spec, parameters, steps, how far below the untrained error the trained one must be
    ("lorenz96", {}, FORECASTER_8, dict(cell="GRU", d=32, layers=1, attention=False), 60, 0.25),
    ("lorenz96", {"variables": 6}, FORECASTER, dict(cell="LSTM", d=16), 60, 0.25),
    ("mqar", {}, TOKENS, dict(d=32, attention=True), 200, 0.5),
    ("parity", {"length": 12}, TOKENS, dict(d=16, attention=False), 100, 0.2),
]


@pytest.mark.parametrize("name, options, spec, params, steps, factor", LEARNS, ids=[c[0] + str(c[1]) for c in LEARNS])
def test_training_beats_the_untrained_model(name, options, spec, params, steps, factor):
    task = get_task(name, **options)
    if spec != FORECASTER_8:  # the others take the sizes the task fixes as parameters
        params = {**params, **task.fixed}
    untrained = task.evaluate(_compiled(spec, params), steps=0)
    trained = task.evaluate(_compiled(spec, params), steps=steps)
    assert untrained.steps == 0 and trained.steps == steps and not trained.pruned
    assert trained.metric < factor * untrained.metric, (trained.metric, untrained.metric)
    if name == "lorenz96":
        assert untrained.metric > 0.5  # an untrained model is far off unit-variance targets
    else:
        assert untrained.metric > 0.4  # and about as bad as a guess
    assert trained.metric_name == ("val_mse" if name == "lorenz96" else "val_error")


def test_result_records_params_flops_latency_and_time():
    task = get_task("mqar", steps=5)
    params = dict(d=16, attention=True, **task.fixed)
    model = _compiled(TOKENS, params)
    result = task.evaluate(model)
    assert isinstance(result, TaskResult)
    report = gatedsl.check(TOKENS, params, dims={"B": 64, "T": 32})  # the task's batch and length
    assert result.params == report.params == sum(p.numel() for p in model.parameters())
    assert result.flops == report.flops > 0
    assert 0 < result.latency_s < 10 and math.isfinite(result.latency_s)
    assert 0 < result.train_s and result.steps == 5


def test_pruning_stops_the_run_where_report_says():
    task = get_task("parity", length=8, eval_every=10)
    calls = []

    def report(step, value):
        calls.append((step, value))
        return step >= 30

    result = task.evaluate(_compiled(TOKENS, dict(d=8, attention=False, vocab=2)), steps=100, report=report)
    assert [s for s, _ in calls] == [10, 20, 30]
    assert result.pruned and result.steps == 30 and result.metric == calls[-1][1]
    assert all(0 <= v <= 1 for _, v in calls)


def test_report_sees_every_interval_before_the_end_and_never_prunes_by_itself():
    task = get_task("parity", length=8, eval_every=10)
    calls = []
    result = task.evaluate(_compiled(TOKENS, dict(d=8, attention=False, vocab=2)), steps=30,
                           report=lambda step, value: calls.append(step) and False)
    assert calls == [10, 20] and not result.pruned and result.steps == 30


def test_a_seed_fixes_the_run():
    task = get_task("lorenz96", steps=20)
    params = dict(cell="GRU", d=32, layers=1, attention=False)
    first, second = _compiled(FORECASTER_8, params), _compiled(FORECASTER_8, params)
    a, b = task.evaluate(first, seed=3), task.evaluate(second, seed=3)
    assert a.metric == b.metric
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(x, y), name
    other = task.evaluate(_compiled(FORECASTER_8, params), seed=4)
    assert other.metric != a.metric  # the seed orders the batches
    assert torch.equal(get_task("lorenz96", steps=20).data()["val_x"], task.data()["val_x"])
    assert not torch.equal(get_task("lorenz96", data_seed=1).data()["val_x"], task.data()["val_x"])


class Diverges(torch.nn.Module):
    """Not a compiled spec: its output is NaN from the first step."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float("nan")))

    def forward(self, x):
        return x * self.scale


def test_a_diverging_run_scores_inf_and_a_plain_module_has_no_flops():
    result = get_task("lorenz96").evaluate(Diverges(), steps=50)
    assert result.metric == math.inf and result.steps == 0 and result.flops is None and result.params == 1


# ---------------------------------------------------------------------------------------- bad input
def test_unknown_task_names_the_built_in_ones():
    with pytest.raises(ValueError, match="unknown task 'lorenz63'; the built-in tasks are: lorenz96, mqar, parity"):
        get_task("lorenz63")


@pytest.mark.parametrize("name, options, message", [
    ("lorenz96", {"bogus": 1}, r"bogus: Extra inputs are not permitted; its options are: steps, batch, lr"),
    ("lorenz96", {"variables": 3}, r"variables: Input should be greater than or equal to 4"),
    ("lorenz96", {"window": 64, "states": 40}, r"states \(40\) must be at least window \+ 1 \(65\)"),
    ("mqar", {"kv_pairs": 16}, r"kv_pairs \(16\) needs distinct keys and values: at most vocab/2 − 1 \(15\)"),
    ("mqar", {"length": 12}, r"length \(12\) must be at least 4 · kv_pairs \(16\)"),
    ("parity", {"steps": -1}, r"steps: Input should be greater than or equal to 0"),
    ("parity", {"lr": "fast"}, r"lr: Input should be a valid number"),
])
def test_bad_options_are_named(name, options, message):
    with pytest.raises(ValueError, match=rf"bad options for task '{name}': .*{message}"):
        get_task(name, **options)


def test_bad_steps_argument():
    with pytest.raises(ValueError, match="steps must be a non-negative int, got -2"):
        get_task("parity").evaluate(Diverges(), steps=-2)


@pytest.mark.parametrize("name, spec, params, expected", [
    ("lorenz96", TOKENS, dict(vocab=8), r"task 'lorenz96' with 8 variables needs a model \[B, T, 8\] -> \[B, T, 8\] "
                                        r"\(float\); this one maps int \['B', 'T'\] -> \['B', 'T', 8\]"),
    ("lorenz96", FORECASTER, dict(features=6), r"needs a model \[B, T, 8\] .* maps float \['B', 'T', 6\]"),
    ("mqar", TOKENS, dict(vocab=16), r"task 'mqar' needs a model of tokens int\[B, T\] -> logits \[B, T, 32\]"),
    ("parity", FORECASTER, dict(features=2),
     r"task 'parity' needs a model of tokens int\[B, T\] -> logits \[B, T, 2\]"),
])
def test_a_model_of_the_wrong_shape_is_refused_before_training(name, spec, params, expected):
    with pytest.raises(ValueError, match=expected):
        get_task(name).evaluate(gatedsl.compile(spec, params))


def test_importing_the_search_package_leaves_torch_out():
    code = "import sys, gatedsl, gatedsl.search; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
