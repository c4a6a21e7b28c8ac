"""Built-in cheap tasks that train a compiled model on the CPU in seconds and score it: Lorenz-96, MQAR, N-parity.

Each task makes its data once (deterministically, from `data_seed`), trains the module it is given with Adam
for a few hundred steps, and returns a TaskResult: the validation error, the parameter count, the FLOPs of
one batch (the spec's FLOP polynomial at the task's batch and sequence sizes), the measured median latency
of a forward pass on one batch, the training time and the steps run. torch is imported only when a task
runs, so `import gatedsl.search` stays light.
"""

from __future__ import annotations

import math
import statistics
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    import torch
    from torch import nn

IGNORE = -100  # the label of a position that is not scored (torch's cross-entropy ignore_index)
LATENCY_REPEATS = 7  # forward passes timed per candidate, after one untimed warm-up; the median is reported


class TaskResult(BaseModel):
    """What one training run of a candidate gives: its error (lower is better) and what it costs."""

    metric: float  # the task's error on its validation set; inf when training diverged
    metric_name: str  # "val_mse" or "val_error"
    params: int  # learned elements
    flops: int | None  # of one forward pass on one batch; None for a module that is not a compiled spec
    latency_s: float  # median wall time of a forward pass on one batch (eval mode, no grad)
    train_s: float  # wall time of the training loop, evaluations for `report` included
    steps: int  # optimiser steps taken
    pruned: bool = False  # stopped early because `report` asked to


class TaskOptions(BaseModel):
    """Options every task takes: how long and how it trains, and the seed of its data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=0, description="Adam steps")
    batch: int = Field(32, ge=1, description="sequences per step, and in the batch FLOPs and latency are measured on")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    clip: float = Field(1.0, gt=0, description="gradient norm clipping, as usual for recurrent models")
    eval_every: int = Field(25, ge=1, description="steps between the validation errors given to `report`")
    data_seed: int = Field(0, description="seed of the data; every candidate of a search sees the same data")


class Task(ABC):
    """A built-in task: data made on first use, a training loop, and a validation error (lower is better)."""

    name: ClassVar[str]
    metric_name: ClassVar[str]
    Options: ClassVar[type[TaskOptions]]

    def __init__(self, **options: Any):
        try:
            self.options = self.Options(**options)
        except ValidationError as error:
            problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else str(e["ctx"]["error"])
                        for e in error.errors()]
            if any(e["type"] == "extra_forbidden" for e in error.errors()):
                problems.append(f"its options are: {', '.join(self.Options.model_fields)}")
            raise ValueError(f"bad options for task '{self.name}': {'; '.join(problems)}") from None
        self._data: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"get_task({self.name!r}, {self.options!r})"

    # ---------------------------------------------------------------- what each task defines
    @property
    @abstractmethod
    def fixed(self) -> dict[str, Any]:
        """Model parameters a spec for this task should be given (those it declares): the sizes the data fixes."""

    @property
    @abstractmethod
    def length(self) -> int:
        """T, the sequence length the model reads."""

    @abstractmethod
    def make_data(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """train_x, train_y, val_x, val_y."""

    @abstractmethod
    def check_signature(self, inputs: dict, input_dtypes: dict, outputs: dict) -> None:
        """Raise ValueError when a compiled spec's inputs and outputs cannot be this task's model."""

    @abstractmethod
    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch."""

    @abstractmethod
    def error(self, out: torch.Tensor, target: torch.Tensor) -> float:
        """The metric over the validation set, lower is better."""

    # ---------------------------------------------------------------- shared machinery
    def data(self) -> dict[str, torch.Tensor]:
        """The task's data, made once per task object from `data_seed`."""
        if self._data is None:
            import torch

            self._data = self.make_data(torch.Generator().manual_seed(self.options.data_seed))
        return self._data

    def evaluate(self, module: nn.Module, *, seed: int = 0, steps: int | None = None,
                 report: Callable[[int, float], bool] | None = None) -> TaskResult:
        """Train `module` in place for `steps` (the task's default if None) and score it on the validation set.

        `seed` sets torch's RNG (dropout, noise) and the order of the batches; the weights are the module's
        as given. Every `eval_every` steps before the last, `report(step, validation error)` is called and
        the run stops when it returns True (the result then has pruned=True and that error as its metric).
        A run whose training loss stops being finite ends there with metric inf.
        """
        import torch

        steps = self.options.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        rep = getattr(module, "meta", {}).get("gatedsl_report")
        if rep is not None:
            self.check_signature(rep.inputs, rep.input_dtypes, rep.outputs)
        data = self.data()
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())
        train_x, train_y, val_x, val_y = (self._as(data[k], dtype) for k in ("train_x", "train_y", "val_x", "val_y"))

        torch.manual_seed(seed)
        order = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(module.parameters(), lr=self.options.lr)
        metric, pruned, done = None, False, 0
        module.train()
        start = time.perf_counter()
        for step in range(1, steps + 1):
            pick = torch.randint(len(train_x), (self.options.batch,), generator=order)
            loss = self.loss(module(train_x[pick]), train_y[pick])
            if not math.isfinite(loss.item()):  # diverged: no later step can bring it back
                metric = math.inf
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.options.clip)
            optimizer.step()
            done = step
            if report is not None and step % self.options.eval_every == 0 and step < steps:
                value = self._validate(module, val_x, val_y)
                if report(step, value):
                    metric, pruned = value, True
                    break
        train_s = time.perf_counter() - start
        if metric is None:
            metric = self._validate(module, val_x, val_y)
        return TaskResult(metric=metric, metric_name=self.metric_name, params=_count_params(module),
                          flops=self._flops(module, rep), latency_s=self._latency(module, val_x[:self.options.batch]),
                          train_s=train_s, steps=done, pruned=pruned)

    @staticmethod
    def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    def _validate(self, module: nn.Module, val_x: torch.Tensor, val_y: torch.Tensor) -> float:
        import torch

        module.eval()
        try:
            with torch.no_grad():
                outs = [module(val_x[i:i + 256]) for i in range(0, len(val_x), 256)]
            value = self.error(torch.cat(outs), val_y)
        finally:
            module.train()
        return value if math.isfinite(value) else math.inf

    @staticmethod
    def _latency(module: nn.Module, batch: torch.Tensor) -> float:
        import torch

        module.eval()
        try:
            with torch.no_grad():
                module(batch)  # warm-up: first-call allocations and kernel choices are not the model's latency
                times = []
                for _ in range(LATENCY_REPEATS):
                    start = time.perf_counter()
                    module(batch)
                    times.append(time.perf_counter() - start)
        finally:
            module.train()
        return statistics.median(times)

    def _flops(self, module: nn.Module, rep) -> int | None:
        """The spec's FLOP polynomial at this task's batch and length (the one gatedsl's report prints)."""
        graph = getattr(module, "_ir", None)
        if rep is None or graph is None:
            return None
        from gatedsl.ir.ops import graph_flops

        # The report keeps the polynomial only as rounded text, so it is recounted on the module's graph; an
        # optimisation that counted differently would show at unit sizes, where the report's value is exact.
        flops = graph_flops(graph)
        if flops.evaluate({}) != rep.flops:
            return None
        # The input's first two dims are the batch and the time axis, whatever the spec calls them.
        shape = next(iter(rep.inputs.values()))
        sizes = {name: size for name, size in zip(shape, (self.options.batch, self.length)) if isinstance(name, str)}
        return flops.evaluate(sizes)


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _single(kind: str, values: dict) -> tuple[str, list]:
    if len(values) != 1:
        raise ValueError(f"a model for this task has exactly one {kind}; this one has {len(values)}: "
                         f"{', '.join(values) or 'none'}")
    return next(iter(values.items()))


def _sequence_dims(shape: list, length: int) -> bool:
    """[B, T, ...]: a symbolic batch and a time axis that is symbolic or exactly the task's length."""
    return (len(shape) >= 2 and isinstance(shape[0], str)
            and (isinstance(shape[1], str) or shape[1] == length))


# -------------------------------------------------------------------------------------------- Lorenz-96
def lorenz96_derivative(x: torch.Tensor, forcing: float) -> torch.Tensor:
    """dx_i/dt = (x_{i+1} − x_{i−2}) x_{i−1} − x_i + F, the ring of variables on the last dim."""
    return (x.roll(-1, -1) - x.roll(2, -1)) * x.roll(1, -1) - x + forcing


def rk4_step(x: torch.Tensor, dt: float, forcing: float) -> torch.Tensor:
    """One classical fourth-order Runge–Kutta step of Lorenz-96."""
    k1 = lorenz96_derivative(x, forcing)
    k2 = lorenz96_derivative(x + dt / 2 * k1, forcing)
    k3 = lorenz96_derivative(x + dt / 2 * k2, forcing)
    k4 = lorenz96_derivative(x + dt * k3, forcing)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def lorenz96_trajectories(count: int, states: int, *, variables: int = 8, forcing: float = 8.0, dt: float = 0.01,
                          sample_every: int = 5, spinup: int = 1000, gen: torch.Generator | None = None
                          ) -> torch.Tensor:
    """`count` independent trajectories of `states` states each, [count, states, variables], in float64.

    Each starts at F plus a standard normal perturbation (F alone is a fixed point), runs `spinup` RK4 steps
    of dt onto the attractor (discarded), then keeps one state every `sample_every` steps.
    """
    import torch

    x = forcing + torch.randn(count, variables, generator=gen, dtype=torch.float64)
    for _ in range(spinup):
        x = rk4_step(x, dt, forcing)
    kept = []
    for _ in range(states):
        for _ in range(sample_every):
            x = rk4_step(x, dt, forcing)
        kept.append(x)
    return torch.stack(kept, dim=1)


class Lorenz96Options(TaskOptions):
    variables: int = Field(8, ge=4, description="N, the variables on the ring (x_{i−2} and x_{i+1} must differ)")
    forcing: float = Field(8.0, description="F; 8 is the usual chaotic regime")
    dt: float = Field(0.01, gt=0, le=0.05, description="RK4 step")
    sample_every: int = Field(5, ge=1, description="RK4 steps between kept states: Δt = dt · sample_every")
    spinup: int = Field(1000, ge=0, description="RK4 steps discarded to reach the attractor")
    window: int = Field(32, ge=1, description="T: states the model reads; it predicts the next one of each")
    train_trajectories: int = Field(12, ge=1)
    val_trajectories: int = Field(4, ge=1)
    states: int = Field(160, description="kept states per trajectory")

    @model_validator(mode="after")
    def _long_enough(self):
        if self.states < self.window + 1:
            raise ValueError(f"states ({self.states}) must be at least window + 1 ({self.window + 1})")
        return self


class Lorenz96(Task):
    """Forecast Lorenz-96 one step ahead: the model maps states [B, T, N] to the next states [B, T, N].

    The data are independent trajectories (train and validation from different initial conditions),
    scaled by the training data's mean and standard deviation; the metric is the validation MSE in
    those units (predicting no change scores about 0.07 at the defaults).
    """

    name = "lorenz96"
    metric_name = "val_mse"
    Options = Lorenz96Options

    @property
    def fixed(self) -> dict[str, Any]:
        return {"features": self.options.variables}

    @property
    def length(self) -> int:
        return self.options.window

    def make_data(self, gen):
        o = self.options
        series = lorenz96_trajectories(o.train_trajectories + o.val_trajectories, o.states, variables=o.variables,
                                       forcing=o.forcing, dt=o.dt, sample_every=o.sample_every, spinup=o.spinup,
                                       gen=gen)
        train, val = series[:o.train_trajectories], series[o.train_trajectories:]
        mean, std = train.mean(), train.std()
        windows = {}
        for split, part in (("train", train), ("val", val)):
            w = ((part - mean) / std).unfold(1, o.window + 1, 1)  # [count, windows, N, T + 1]
            w = w.transpose(-1, -2).reshape(-1, o.window + 1, o.variables).float()
            windows[split + "_x"], windows[split + "_y"] = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        return windows

    def check_signature(self, inputs, input_dtypes, outputs):
        n = self.options.variables
        name, shape = _single("input", inputs)
        _, out = _single("output", outputs)
        if (input_dtypes[name] != "float" or len(shape) != 3 or shape[-1] != n or not _sequence_dims(shape, self.length)
                or out != shape):
            raise ValueError(f"task 'lorenz96' with {n} variables needs a model [B, T, {n}] -> [B, T, {n}] "
                             f"(float); this one maps {input_dtypes[name]} {shape} -> {out}")

    def loss(self, out, target):
        import torch.nn.functional as F

        return F.mse_loss(out, target)

    def error(self, out, target):
        import torch.nn.functional as F

        return F.mse_loss(out, target).item()


# ------------------------------------------------------------------------------------- token tasks
class _TokenTask(Task):
    """A task on integer tokens [B, T] whose model gives logits [B, T, V] at every position."""

    @property
    @abstractmethod
    def vocab(self) -> int:
        """V, the tokens the model reads and scores."""

    @property
    def fixed(self) -> dict[str, Any]:
        return {"vocab": self.vocab}

    def check_signature(self, inputs, input_dtypes, outputs):
        v = self.vocab
        name, shape = _single("input", inputs)
        _, out = _single("output", outputs)
        if (input_dtypes[name] != "int" or len(shape) != 2 or not _sequence_dims(shape, self.length)
                or out != [*shape, v]):
            raise ValueError(f"task '{self.name}' needs a model of tokens int[B, T] -> logits [B, T, {v}] "
                             f"(T = {self.length}); this one maps {input_dtypes[name]} {shape} -> {out}")

    def loss(self, out, target):
        import torch.nn.functional as F

        return F.cross_entropy(out.flatten(0, -2), target.flatten(), ignore_index=IGNORE)

    def error(self, out, target):
        scored = target != IGNORE
        return (out.argmax(-1)[scored] != target[scored]).float().mean().item()


def mqar_examples(count: int, *, vocab: int, length: int, kv_pairs: int, power_a: float = 0.01,
                  gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall as Zoology makes it (Arora et al. 2023): tokens [count, length], labels.

    The first 2·kv_pairs tokens are pairs k v (distinct keys from 1..vocab/2 − 1, distinct values from
    vocab/2..vocab − 1); each key is then queried once, at an even offset into the rest drawn with
    Zoology's power law (p(gap) ∝ gap^(a−1)), and every other position is a random token. The label
    of a query's position is the value its key was paired with; every other label is IGNORE.
    """
    import torch

    context = 2 * kv_pairs
    half = vocab // 2
    keys = torch.rand(count, half - 1, generator=gen).argsort(-1)[:, :kv_pairs] + 1
    values = torch.rand(count, vocab - half, generator=gen).argsort(-1)[:, :kv_pairs] + half
    slots = (length - context) // 2
    p = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial((p / p.sum()).expand(count, slots), kv_pairs, replacement=False, generator=gen)
    query_at = context + 2 * gaps
    tokens = torch.randint(vocab, (count, length), generator=gen)
    tokens[:, 0:context:2], tokens[:, 1:context:2] = keys, values
    tokens.scatter_(1, query_at, keys)
    labels = torch.full((count, length), IGNORE).scatter_(1, query_at, values)
    return tokens, labels


class MQAROptions(TaskOptions):
    vocab: int = Field(32, ge=4, description="V: keys from 1..V/2 − 1, values from V/2..V − 1")
    length: int = Field(32, ge=4, description="T")
    kv_pairs: int = Field(4, ge=1, description="key-value pairs per sequence, each queried once")
    power_a: float = Field(0.01, gt=0, le=1, description="Zoology's power law of the query offsets")
    train_size: int = Field(4096, ge=1)
    val_size: int = Field(512, ge=1)
    batch: int = Field(64, ge=1, description="sequences per step, and in the batch FLOPs and latency are measured on")
    steps: int = Field(300, ge=0, description="Adam steps")

    @model_validator(mode="after")
    def _sizes_fit(self):
        if self.kv_pairs > self.vocab // 2 - 1 or self.kv_pairs > self.vocab - self.vocab // 2:
            raise ValueError(f"kv_pairs ({self.kv_pairs}) needs distinct keys and values: at most vocab/2 − 1 "
                             f"({self.vocab // 2 - 1})")
        if 4 * self.kv_pairs > self.length:
            raise ValueError(f"length ({self.length}) must be at least 4 · kv_pairs ({4 * self.kv_pairs}): the pairs, "
                             "then a query slot per pair with room to spread them")
        return self


class MQAR(_TokenTask):
    """Multi-query associative recall (Arora et al. 2023, Zoology): recall the value paired with each queried key.

    The model maps tokens int[B, T] to logits [B, T, V]; the metric is the error rate at the query
    positions of the validation set (guessing among the values scores 1 − 2/V).
    """

    name = "mqar"
    metric_name = "val_error"
    Options = MQAROptions

    @property
    def vocab(self) -> int:
        return self.options.vocab

    @property
    def length(self) -> int:
        return self.options.length

    def make_data(self, gen):
        o = self.options
        make = dict(vocab=o.vocab, length=o.length, kv_pairs=o.kv_pairs, power_a=o.power_a, gen=gen)
        train_x, train_y = mqar_examples(o.train_size, **make)
        val_x, val_y = mqar_examples(o.val_size, **make)
        return {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y}


class ParityOptions(TaskOptions):
    length: int = Field(16, ge=1, description="T, the bits per sequence (N of N-parity)")
    train_size: int = Field(4096, ge=1)
    val_size: int = Field(512, ge=1)
    batch: int = Field(64, ge=1, description="sequences per step, and in the batch FLOPs and latency are measured on")


class Parity(_TokenTask):
    """N-parity in its sequence form: at every position t, the parity of bits 0..t (the last is the N-parity).

    This is the parity automaton of "Transformers Learn Shortcuts to Automata" (Liu et al. 2023): one
    label per position, so the model learns from every prefix, and the last position asks for the
    parity of all N bits. The model maps bits int[B, T] to logits [B, T, 2]; the metric is the error rate
    over every position of the validation set (0.5 for a guess).
    """

    name = "parity"
    metric_name = "val_error"
    Options = ParityOptions

    @property
    def vocab(self) -> int:
        return 2

    @property
    def length(self) -> int:
        return self.options.length

    def make_data(self, gen):
        import torch

        o = self.options
        bits = torch.randint(2, (o.train_size + o.val_size, o.length), generator=gen)
        running = bits.cumsum(-1) % 2
        return {"train_x": bits[:o.train_size], "train_y": running[:o.train_size],
                "val_x": bits[o.train_size:], "val_y": running[o.train_size:]}


TASKS: dict[str, Callable[..., Task]] = {"lorenz96": Lorenz96, "mqar": MQAR, "parity": Parity}


def get_task(name: str, **options: Any) -> Task:
    """The built-in task `name` with its options (each task's Options lists them, with defaults)."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; the built-in tasks are: {', '.join(TASKS)}")
    return TASKS[name](**options)
