"""``python -m bnfold``: the same command line as ``bnfold``."""

from bnfold._entry import main

if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    main()
