"""Reference model zoo for bnfold tests.

Each topology lives in its own module; ``models.zoo`` holds the registry
(``REFERENCE_MODELS``, ``RESNET50``) and ``build(name, seed)``.
"""
