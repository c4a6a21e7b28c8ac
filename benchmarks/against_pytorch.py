"""gatedsl against the PyTorch a user would otherwise write (issue 4's targets); the same as `gatedsl bench`.

Run:  python benchmarks/against_pytorch.py [--threads 2] [--repeats 7] [--case NAME]... [--quick] [--json OUT]

The cases and the timing harness are in gatedsl/bench/, the hand-written baselines in
gatedsl/bench/baselines.py, the benchmark-only specs in benchmarks/specs/. Each case runs
gatedsl and its baselines in one process, interleaved, after warm-up, and reports medians
and the ratio gatedsl / baseline, forward and forward+backward.
"""

from gatedsl.bench import main

if __name__ == "__main__":
    main()
