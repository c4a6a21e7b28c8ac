"""Train the HorNet-style classifier of examples/hornet_images.gate to tell drawn shapes apart.

The images are generated here: 16 × 16 grey pictures of one of four shapes (a disk, a
square outline, a plus and a cross), each at a random place and size with a random
brightness, under Gaussian noise. The classes differ in shape only, so the model must
relate pixels to their neighbours, which is what gnConv's gated convolutions do.

    python examples/hornet_images.py                 # under half a minute on a laptop CPU
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

SPEC = Path(__file__).resolve().parent / "hornet_images.gate"
SHAPES = ("disk", "square outline", "plus", "cross")


# ------------------------------------------------------------------ the data
def draw_shapes(count: int, size: int = 16, noise: float = 0.35, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` noisy images [count, size, size, 1] (channels last) and their labels, an index into SHAPES."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(SHAPES), (count,), generator=gen)
    radius = 3 + 3 * torch.rand(count, 1, 1, generator=gen)                  # half-widths from 3 to 6 pixels
    centre = radius[:, None] + (size - 1 - 2 * radius[:, None]) * torch.rand(count, 2, 1, 1, generator=gen)  # inside
    rows = torch.arange(size, dtype=torch.float32).view(1, size, 1)
    cols = torch.arange(size, dtype=torch.float32).view(1, 1, size)
    dy, dx = (rows - centre[:, 0]).abs(), (cols - centre[:, 1]).abs()
    outer = torch.maximum(dx, dy)
    pictures = torch.stack([
        dx**2 + dy**2 <= radius**2,                                           # disk
        (outer <= radius) & (outer >= radius - 1.2),                          # square outline
        ((dx <= 0.8) | (dy <= 0.8)) & (outer <= radius),                      # plus
        ((dx - dy).abs() <= 0.8) & (outer <= radius),                         # cross (an X)
    ], dim=1).float()                                                         # [count, 4, size, size]
    picture = pictures[torch.arange(count), labels]
    brightness = 0.6 + 0.8 * torch.rand(count, 1, 1, generator=gen)
    images = brightness * picture + noise * torch.randn(count, size, size, generator=gen)
    return images.unsqueeze(-1), labels


def show(images: torch.Tensor, labels: torch.Tensor) -> None:
    """Print images [n, H, W, 1] side by side as text, darkest to brightest: ' ', '.', ':', '#'."""
    print("   ".join(f"{SHAPES[i]:<{images.shape[2]}}" for i in labels.tolist()))
    for row in range(images.shape[1]):
        print("   ".join("".join(" .:#"[min(max(int(v * 3), 0), 3)] for v in image[row, :, 0].tolist())
                         for image in images))


# ---------------------------------------------------------------- training
def main(steps: int = 300, d: int = 32, depth: int = 2, order: int = 3, batch: int = 64, lr: float = 3e-3,
         log_every: int = 50, seed: int = 0) -> dict[str, float]:
    """Train for `steps` AdamW steps; returns the eval loss and accuracy before and after, and the last train loss."""
    # The matrices here are small: one thread is fastest on a busy machine, and leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(steps, d, depth, order, batch, lr, log_every, seed)
    finally:
        torch.set_num_threads(threads)


def train(steps: int, d: int, depth: int, order: int, batch: int, lr: float, log_every: int,
          seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    train_images, train_labels = draw_shapes(4096, seed=seed)
    eval_images, eval_labels = draw_shapes(1024, seed=seed + 1)
    print(f"{len(train_images)} training and {len(eval_images)} evaluation images of", ", ".join(SHAPES))
    show(*draw_shapes(len(SHAPES), seed=seed))  # what the model sees: four of them

    model = gatedsl.compile(SPEC, params=dict(size=16, channels=1, classes=len(SHAPES), d=d, depth=depth, order=order))
    report = model.meta["gatedsl_report"]
    print(f"{report.params:,} parameters; {len(report.gates)} gates:", ", ".join(sorted({g.kind for g in report.gates})))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        logits = model(eval_images)
        model.train()
        return F.cross_entropy(logits, eval_labels).item(), (logits.argmax(-1) == eval_labels).float().mean().item()

    initial_loss, initial_accuracy = evaluate()
    print(f"before training: eval loss {initial_loss:.3f}, accuracy {initial_accuracy:.1%} (chance is "
          f"{1 / len(SHAPES):.0%})")
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        pick = torch.randint(len(train_images), (batch,), generator=gen)
        loss = F.cross_entropy(model(train_images[pick]), train_labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            eval_loss, accuracy = evaluate()
            print(f"step {step:4d}  train loss {loss.item():.3f}  eval loss {eval_loss:.3f}  accuracy {accuracy:.1%}")
    final_loss, final_accuracy = evaluate()
    print(f"after training: eval loss {final_loss:.3f} (from {initial_loss:.3f}), accuracy {final_accuracy:.1%} "
          f"(from {initial_accuracy:.1%})")
    assert final_loss < initial_loss, "the loss did not fall"
    return {"initial_loss": initial_loss, "final_loss": final_loss, "initial_accuracy": initial_accuracy,
            "final_accuracy": final_accuracy, "train_loss": loss.item()}


if __name__ == "__main__":
    main()
