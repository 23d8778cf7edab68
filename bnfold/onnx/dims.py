"""What an ONNX tensor dimension says, as every producer writes it: the one place that decides it.

A dimension is *fixed* when it carries a positive ``dim_value``. Everything else is dynamic: a ``dim_param`` of
any spelling (``"batch"``, ``"?"``, ``"p2o.DynamicDimension.0"``, ``""``), no field at all, and a ``dim_value``
of -1 or 0, which is how older exporters (paddle2onnx, early torch and tf2onnx) write "any size"; onnxruntime
and onnxslim read them as dynamic too. A true zero-size input would have nothing to compare.
"""

from __future__ import annotations

import onnx


def fixed_size(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """The dimension's size when the file fixes it, else None (dynamic)."""
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return int(dim.dim_value)
    return None


def written(dim: onnx.TensorShapeProto.Dimension) -> str:
    """What the file says of a dimension, for messages: ``dim_value -1``, ``dim_param 'batch'``, ``no size``."""
    if dim.HasField("dim_value"):
        return f"dim_value {dim.dim_value}"
    if dim.HasField("dim_param"):
        return f"dim_param {dim.dim_param!r}"
    return "no size"


def zero_dims(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """The graph inputs' dimensions written as ``dim_value 0``: (input, axis)."""
    return [(value.name, axis) for value in model.graph.input
            for axis, dim in enumerate(value.type.tensor_type.shape.dim) if dim.HasField("dim_value")
            and dim.dim_value == 0]


def open_zero_dims(model: onnx.ModelProto) -> str | None:
    """Rewrite, in place, each input dimension written as ``dim_value 0`` as a ``dim_param`` (``x_dim0``), and
    say so; None when there is none. bnfold reads 0 as dynamic, but onnxruntime reads it as a fixed size 0
    and refuses every other size: the graph must say "dynamic" the way onnxruntime understands to run at all."""
    found = zero_dims(model)
    if not found:
        return None
    inputs = {value.name: value for value in model.graph.input}
    for name, axis in found:
        dim = inputs[name].type.tensor_type.shape.dim[axis]
        dim.dim_param = f"{name}_dim{axis}"  # setting the oneof clears dim_value
    listed = ", ".join(f"{name} axis {axis}" for name, axis in found)
    return (f"input dimension(s) written as dim_value 0 ({listed}) are written as dim_params: onnxruntime reads 0 "
            "as a fixed size 0")
