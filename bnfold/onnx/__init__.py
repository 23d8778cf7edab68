"""ONNX: export, lint, onnxruntime runner, graph folding (one module each).

Folding: ``io`` loads and saves model files (external data included), ``graph`` translates a graph into the
shared pairing nodes (:mod:`bnfold.discover.graph`) and reads/writes its tensors for
:func:`bnfold.fold.apply.apply_fold`, ``fold`` puts the two together. Import the modules directly; this package
imports nothing heavy.
"""
