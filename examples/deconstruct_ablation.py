"""The grid of "Deconstructing Recurrence, Attention, and Gating", at small scale on Lorenz-96, from one spec.

Heidenreich, Vlachas & Koumoutsakos (2024) treat the recurrent cell, the gating of the residual path and
attention as hyper-parameters of one family of forecasters (GATES.md §8). examples/deconstruct_ablation.gate
writes that family with those three switches as its only parameters; gatedsl.Space enumerates the 18
combinations, and the search task `lorenz96` trains each (same data, same steps, same seeds) to predict the
next state of the Lorenz-96 ring. Prints the table and draws it to a PNG.

    python examples/deconstruct_ablation.py            # under a minute of CPU time; 2.5 minutes on a busy machine
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed: the figure only goes to a file
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

import gatedsl  # noqa: E402
from gatedsl.search import get_task  # noqa: E402

HERE = Path(__file__).resolve().parent
SPEC = HERE / "deconstruct_ablation.gate"


def main(steps: int = 200, seeds: tuple[int, ...] = (0, 1), plot: str | Path = HERE / "deconstruct_ablation.png"
         ) -> list[dict]:
    """Train every candidate `steps` Adam steps once per seed; print the table, save the plot, return the rows."""
    # The matrices here are tiny: one thread is fastest, and it leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(steps, seeds, Path(plot))
    finally:
        torch.set_num_threads(threads)


def run(steps: int, seeds: tuple[int, ...], plot: Path) -> list[dict]:
    space = gatedsl.Space(SPEC)
    task = get_task("lorenz96", steps=steps)
    data = task.data()
    persistence = F.mse_loss(data["val_x"], data["val_y"]).item()  # "the next state is this one"
    print(f"{space.size} candidates ({' × '.join(d.name for d in space.dimensions)}), each trained {steps} steps "
          f"per seed, seeds {', '.join(map(str, seeds))}; validation MSE in units of the data's variance "
          f"(predicting no change scores {persistence:.4f})")
    rows = []
    start = time.perf_counter()
    for dna in space.grid():
        errors, train_s = [], []
        for seed in seeds:
            torch.manual_seed(seed)  # the initial weights; the task's seed orders the batches
            result = task.evaluate(space.compile(dna), seed=seed)
            errors.append(result.metric)
            train_s.append(result.train_s)
        rows.append({**dna, "errors": errors, "error": statistics.mean(errors), "params": result.params,
                     "flops": result.flops, "train_s": statistics.mean(train_s)})
    plain = {r["cell"]: r["error"] for r in rows if r["gating"] == "none" and not r["attention"]}
    for r in rows:
        r["vs_plain"] = r["error"] / plain[r["cell"]]
    print_table(rows, seeds)
    print(f"{len(rows)} candidates in {time.perf_counter() - start:.0f} s")
    draw(rows, persistence, plot)
    print(f"plot: {os.path.relpath(plot)}")
    return rows


def print_table(rows: list[dict], seeds: tuple[int, ...]) -> None:
    each = "  ".join(f"seed {s}" for s in seeds)
    print(f"{'cell':5} {'gating':9} {'attention':9}  {each}  {'mean':>7}  {'vs plain':>8}  {'params':>6}  "
          f"{'s/run':>5}")
    for r in rows:
        errors = "  ".join(f"{e:6.4f}" for e in r["errors"])
        print(f"{r['cell']:5} {r['gating']:9} {'on' if r['attention'] else 'off':9}  {errors}  {r['error']:7.4f}  "
              f"{r['vs_plain']:8.2f}  {r['params']:6,}  {r['train_s']:5.1f}")


def draw(rows: list[dict], persistence: float, path: Path) -> None:
    """Mean validation MSE per candidate as bars (each seed a dot), grouped by cell and attention, log scale."""
    colours = {"none": "#bbbbbb", "additive": "#6a9fd4", "input": "#e08a3c"}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ticks, x = [], 0.0
    for cell in dict.fromkeys(r["cell"] for r in rows):
        for attention in (False, True):
            group = [r for r in rows if r["cell"] == cell and r["attention"] == attention]
            for r in group:
                ax.bar(x, r["error"], color=colours[r["gating"]], hatch="//" if attention else None,
                       edgecolor="black", linewidth=0.5)
                ax.plot([x] * len(r["errors"]), r["errors"], "k.", markersize=4)
                x += 1
            ticks.append((x - (len(group) + 1) / 2, f"{cell}\nattention {'on' if attention else 'off'}"))
            x += 0.6
        x += 0.6
    ax.axhline(persistence, color="black", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks([p for p, _ in ticks], [t for _, t in ticks], fontsize=8)
    ax.set_ylabel("validation MSE (normalised), lower is better")
    ax.set_title("Recurrence × gating × attention on Lorenz-96 (examples/deconstruct_ablation.gate)")
    legend = [Patch(facecolor=c, edgecolor="black", label=f"gating {g}") for g, c in colours.items()]
    legend += [Patch(facecolor="white", edgecolor="black", hatch="//", label="attention on")]
    legend += [Line2D([], [], color="black", linestyle=":", label="predicting no change"),
               Line2D([], [], color="black", marker=".", linestyle="", label="one seed")]
    ax.legend(handles=legend, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
