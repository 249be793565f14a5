"""The ``datamesh`` command's entry point (also ``python -m datamesh``).

It imports the command line only when called. The operator's child processes (collection
builders, the built-in embedder; started with ``spawn``) import the program's main script again,
and the console script is that script: importing ``datamesh.cli`` at its top cost each child
about 28 MiB (typer, rich, pydantic and the resource models) that none of them uses.
"""

from __future__ import annotations


def main() -> None:
    """Run the ``datamesh`` command."""
    from datamesh.cli import app

    app()


if __name__ == "__main__":
    main()
