"""``python -m bnfold``: the same command line as ``bnfold``."""

from bnfold.cli import main

if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    main(prog_name="bnfold")
