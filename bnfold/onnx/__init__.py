"""ONNX: export, lint, onnxruntime runner, graph folding (one module each)."""
