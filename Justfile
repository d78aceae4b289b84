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
