"""`patchetl` console entry point: the ETL app plus the training commands.

torch is imported inside the training commands only, so `patchetl extract --help`
starts without loading it.
"""
from __future__ import annotations

from etl.cli import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
