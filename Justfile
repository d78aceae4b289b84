# `just` recipes; each is also a plain shell line in README.md.

setup:
    python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e ".[test]"

test: setup
    .venv/bin/python -m pytest

test-slow: setup
    .venv/bin/python -m pytest -m slow

quickstart: setup
    .venv/bin/rnnrep quickstart

bench: setup
    .venv/bin/rnnrep bench zoo

# on a CUDA machine whose environment already has torch and rnnrep (no `setup`: that installs the CPU torch)
bench-gpu:
    rnnrep bench lstm --device cuda --members 1024
    rnnrep bench zoo --device cuda
    rnnrep bench train --device cuda
    rnnrep bench train --device cuda --precision bf16
    python -m pytest tests/test_cuda.py
