"""`gatedsl generate`: new tokens from a spec's language model after prompts of token ids, with a progress bar."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from gatedsl.cli.options import EXIT_OK, UsageError, model_options, pairs, positive_int, spec_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE",
                   help="a .gate spec whose model takes token ids int[B, T] and returns next-token scores [B, T, V]")
    p.add_argument("--prompt", action="append", required=True, type=_token_ids, metavar="IDS",
                   help='a prompt as token ids, e.g. "1 2 3" (repeatable: the prompts decode together, '
                        'each as it would alone)')
    p.add_argument("-n", "--max-new-tokens", type=_count, default=32, metavar="N",
                   help="new tokens per prompt at most (default 32)")
    p.add_argument("--weights", metavar="FILE.pt",
                   help="a state dict saved with torch.save, as `gatedsl compile -o` writes beside its module "
                        "(default: the spec's random initialisation, drawn with --seed)")
    p.add_argument("--temperature", type=_temperature, default=0.0, metavar="T",
                   help="sample from softmax(logits / T); 0, the default, takes the most likely token (greedy)")
    p.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                   help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=_probability, default=None, metavar="P",
                   help="sample among the most likely tokens whose probabilities sum to at least P (nucleus)")
    p.add_argument("--seed", type=int, default=0,
                   help="the seed of the sampling (and of the weights, without --weights; default 0)")
    p.add_argument("--stop", action="append", default=[], type=_token_id, metavar="ID",
                   help="a token id that ends a prompt's generation when emitted (repeatable)")
    p.add_argument("--input", metavar="NAME", help="the model's token-ids input, when it has several")
    p.add_argument("--output", metavar="NAME", help="the model's next-token scores, when it has several outputs")
    model_options(p, sizes=False)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: {prompt, tokens, finished} (finished: stop or length)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _token_ids(text: str) -> list[int]:
    """A --prompt: token ids separated by spaces or commas."""
    ids = [_token_id(part) for part in text.replace(",", " ").split()]
    if not ids:
        raise argparse.ArgumentTypeError("a prompt needs at least one token id")
    return ids


def _token_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"a token id is an integer of at least 0, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"needs an integer of at least 0, got {text!r}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"needs a number of at least 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"needs a number above 0 and at most 1, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    path = spec_file(args.file)
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UsageError("--top-k and --top-p shape sampling, and --temperature 0 (the default) is greedy: "
                         "give a --temperature above 0")
    weights = Path(args.weights) if args.weights else None
    if weights is not None and not weights.is_file():
        raise UsageError(f"--weights: no such file: {args.weights}")

    import torch

    import gatedsl
    from gatedsl.generation import plan_generation

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this torch sees no CUDA device")
    with torch.random.fork_rng(devices=[]):  # the same weights for the same --seed, leaving torch's own seed alone
        torch.manual_seed(args.seed)
        model = gatedsl.compile(path, pairs(args.param, "-p"), model=args.model, max_params=args.max_params,
                                opt_level=args.opt_level, max_file_size=args.max_file_size, max_ops=args.max_ops)
    if weights is not None:
        _load_weights(model, weights)
    model.to(args.device)
    try:
        plan = plan_generation(model, args.prompt, args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                               input=args.input, output=args.output)
    except (ValueError, TypeError) as err:  # a token id the model does not have, an --input it lacks
        raise UsageError(str(err)) from None

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeElapsedColumn())
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    quiet = args.quiet or not console.is_terminal  # a bar only where someone watches (rich ends a hidden one with "\n")
    if weights is None and not args.quiet:
        console.print("note: no --weights, so the model has its random initialisation")
    with Progress(*columns, console=console, transient=True, disable=quiet) as bar:
        shown = bar.add_task("", total=args.max_new_tokens)
        result = plan.run(lambda done, total: bar.update(shown, completed=done))
    for prompt, tokens, finished in zip(result.prompts, result.tokens, result.finished):
        if args.json:
            print(json.dumps({"prompt": prompt, "tokens": tokens, "finished": finished}))
        else:
            print(" ".join(map(str, tokens)))
    return EXIT_OK


def _load_weights(model, path: Path) -> None:
    """Load a torch.save'd state dict into the compiled model: a usage error if it is not one, or not this model's."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load's unpickler fails in many ways on a file that is not its format
        raise UsageError(f"--weights {path}: not a state dict saved with torch.save ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path}: not a state dict (a dict of tensors) but a {type(state).__name__}")
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    wrong = [f"{k} is {list(v.shape)}, the model's {list(ours[k].shape)}" for k, v in state.items()
             if k in ours and v.shape != ours[k].shape]
    problems = ([f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"] if missing else []) + \
               ([f"not the model's: {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''}"]
                if unexpected else []) + wrong[:3]
    if problems:
        raise UsageError(f"--weights {path} does not fit this model (check -p and --model): {'; '.join(problems)}")
    model.load_state_dict(state)
