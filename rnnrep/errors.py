"""How the CLI reports user errors: one line on stderr, exit code 2; bugs keep their traceback."""

from __future__ import annotations

import typer


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types that mean "bad input", each with a message that names the fix."""
    from rnnrep.config import ConfigError
    from rnnrep.tasks.sequential_mnist import MnistSourceError
    from rnnrep.tasks.splits import SplitError
    from rnnrep.zoo.schema import ZooFormatError

    return (ConfigError, ZooFormatError, MnistSourceError, SplitError, FileNotFoundError)


def fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)
