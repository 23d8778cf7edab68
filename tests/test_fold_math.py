"""Property tests for :mod:`bnfold.fold.math` against an independent float64 reference.

The reference is never the folding formula: it is the real torch modules (``nn.Conv*d``,
``nn.ConvTranspose*d``, ``nn.Linear``, ``nn.BatchNorm*d`` in eval mode with set running statistics), rebuilt
in float64 from the *stored* (possibly fp16/bf16) parameters and run as ``BN(conv(x))`` (or ``conv(BN(x))``).
The folded layer is run with ``F.conv*`` / ``F.linear`` in float64 on the folded weights cast to float64, so
what is measured is the accuracy of folding (and of storing the result in the weight's dtype), never the
accuracy of an fp16 convolution kernel.

Tolerance design
----------------
Folding in float64 and casting back rounds every folded weight ``w' = s * w`` and bias ``b'`` once, with a
relative error of at most the unit roundoff ``u`` of the stored dtype (2**-24 fp32, 2**-11 fp16, 2**-8
bf16), or an absolute error of at most half the smallest subnormal ``eta`` when the value is subnormal.
An output ``y = sum_k w'_k x_k + b'`` therefore errs by ``sum_k d_k x_k + d_b`` with ``|d_k| <= u |w'_k|``:

* worst case (all rounding errors aligned with the signs of ``x``): ``u * (sum_k |w'_k x_k| + |b'|)``, i.e.
  at most ``(fan_in + 1) * u`` times the largest term; the fan-in here is at most 3 * 27 = 81 (convolutions)
  or 16 (linear layers);
* typical case: the rounding errors are independent, so the error grows like ``sqrt(fan_in)`` exactly as the
  output does; the largest error over all outputs is then ``~ u / sqrt(3)`` times the largest output.

Hence the per-dtype tolerance on ``max |folded - reference|`` relative to ``scale = max |reference|``:

* fp32: ``1e-5`` ~ 168 u, twice the worst case: a single-rounding fp32 fold cannot get near it, whereas
  any extra fp32 arithmetic on a badly scaled value (or a wrong channel) does;
* fp16: ``2e-3`` ~ 4 u and bf16: ``2e-2`` ~ 5 u: the worst case is not affordable here (it would be
  ``rtol=0.04``/``0.3``, too loose to catch much), so these are statistical bounds, a few times the typical
  error. Over 3 * 10^4 derandomized examples (``BNFOLD_FOLD_MATH_EXAMPLES=20``) the largest error seen was
  0.43 of the tolerance for fp16, 0.30 for bf16 and 0.01 for fp32.

``max |reference|`` is a meaningful scale only as a maximum over enough outputs: one output can cancel to
almost nothing while its error stays ``~u (|w'x| + |b'|)``, so every channel gets at least
``MIN_OUTPUTS_PER_CHANNEL`` outputs (the batch grows when the spatial output is small).

An absolute floor ``eta * (sum_k |x_k| + 1)`` covers subnormal folded weights, plus ``2**-40`` times the term
magnitude for the float64 arithmetic of reference and folded computations (it only matters for float64
outputs that cancel to ~0).

Independently of the outputs, every folded weight/bias is checked to be a *single* rounding of the exact
(float64) folded value: it is no farther from it than the correctly rounded value is.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import skip_init

from bnfold.fold.math import BNParams, fold_bn_after, fold_bn_before, identity_statistics

F64 = torch.float64
LOW = (torch.float32, torch.float16, torch.bfloat16)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
FCONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

# Output tolerance relative to max |reference| (see module docstring for the derivation).
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# Example counts are sized for < 30 s on 2 CPU cores; BNFOLD_FOLD_MATH_EXAMPLES scales them for a deeper
# local run (the runs stay derandomized either way).
_SCALE = float(os.environ.get("BNFOLD_FOLD_MATH_EXAMPLES", "1"))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Every tensor here is tiny: intra-op threads only add synchronisation, which on a busy 2-core CI
    runner (other test processes) turns 0.05 ms convolutions into 40 ms ones. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(n: int) -> settings:
    return settings(
        max_examples=max(1, int(n * _SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no explain phase / patch files
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# --------------------------------------------------------------------------------------------------------------
# Independent reference pieces
# --------------------------------------------------------------------------------------------------------------


def _make_bn_params(
    gen: torch.Generator, channels: int, log10_var: list[float], eps: float, affine: bool, dtype: torch.dtype
) -> BNParams:
    """Running statistics as a model would store them (in ``dtype``)."""
    mean = torch.randn(channels, generator=gen, dtype=F64)
    var = 10.0 ** torch.tensor(log10_var, dtype=F64)
    gamma = torch.randn(channels, generator=gen, dtype=F64) if affine else None
    beta = torch.randn(channels, generator=gen, dtype=F64) if affine else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return BNParams(mean=cast(mean), var=cast(var), eps=eps, gamma=cast(gamma), beta=cast(beta))


def _reference_bn(bn: BNParams, dim: int) -> nn.Module:
    """A float64 ``nn.BatchNorm{dim}d`` in eval mode holding exactly the stored statistics."""
    affine = bn.gamma is not None
    mod = skip_init(BATCHNORM[dim], bn.num_features, eps=bn.eps, affine=affine, dtype=F64).eval()
    with torch.no_grad():
        mod.running_mean.copy_(bn.mean.to(F64))
        mod.running_var.copy_(bn.var.to(F64))
        mod.num_batches_tracked.zero_()
        if affine:
            mod.weight.copy_(bn.gamma.to(F64))
            mod.bias.copy_(bn.beta.to(F64))
    return mod


def _scale_shift64(bn: BNParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(z) = s z + t`` written out from the BatchNorm definition, in float64."""
    mean, var = bn.mean.to(F64), bn.var.to(F64)
    gamma = torch.ones_like(mean) if bn.gamma is None else bn.gamma.to(F64)
    beta = torch.zeros_like(mean) if bn.beta is None else bn.beta.to(F64)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - s * mean


def _channel_index(shape: torch.Size, axis: int, groups: int) -> torch.Tensor:
    """For a weight ``(d0, d1, *k)`` whose groups are stacked along axis 0, the global channel that each
    ``(i, j)`` entry belongs to when ``axis`` (0 or 1) is the channel axis. Written element-wise, with no
    reshape trick, so that it is independent of the implementation under test."""
    d0, d1 = shape[0], shape[1]
    idx = torch.empty(d0, d1, dtype=torch.long)
    per_group0 = d0 // groups
    for i in range(d0):
        for j in range(d1):
            idx[i, j] = i if axis == 0 else (i // per_group0) * d1 + j
    return idx


def _exact_after(weight, bias, bn, channel_axis, groups):
    s, t = _scale_shift64(bn)
    w64 = weight.to(F64)
    idx = _channel_index(weight.shape, channel_axis, groups if channel_axis == 1 else 1)
    w = w64 * s[idx].reshape(*idx.shape, *([1] * (weight.dim() - 2)))
    b64 = torch.zeros_like(s) if bias is None else bias.to(F64)
    return w, s * b64 + t


def _input_channel_index(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Consumer weight ``(out, in/groups, *k)``: the input channel of entry ``(o, j)`` is
    ``(o // (out/groups)) * (in/groups) + j``. Element-wise, like :func:`_channel_index`."""
    out, per_group_in = weight.shape[0], weight.shape[1]
    idx = torch.empty(out, per_group_in, dtype=torch.long)
    for o in range(out):
        for j in range(per_group_in):
            idx[o, j] = (o // (out // groups)) * per_group_in + j
    return idx.reshape(out, per_group_in, *([1] * (weight.dim() - 2)))


def _exact_before(weight, bias, bn, groups):
    s, t = _scale_shift64(bn)
    w64 = weight.to(F64)
    idx = _input_channel_index(weight, groups)
    b64 = torch.zeros(weight.shape[0], dtype=F64) if bias is None else bias.to(F64)
    return w64 * s[idx], b64 + (w64 * t[idx]).flatten(1).sum(1)


def _before_bias_terms(weight, bias, bn, groups):
    """``|b| + sum |W t|``: the size of what the BN-before bias sums (for float64 summation-order noise)."""
    _, t = _scale_shift64(bn)
    idx = _input_channel_index(weight, groups)
    b_abs = 0.0 if bias is None else bias.to(F64).abs()
    return b_abs + (weight.to(F64).abs() * t.abs()[idx]).flatten(1).sum(1)


# --------------------------------------------------------------------------------------------------------------
# The checks every property test shares
# --------------------------------------------------------------------------------------------------------------


def _eta(dtype: torch.dtype) -> float:
    """Smallest positive subnormal of ``dtype``."""
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


def _assume_representable(dtype, *exact: torch.Tensor) -> None:
    """A fold whose exact result overflows ``dtype`` cannot be stored; such examples are skipped (the
    finiteness of every other fold is asserted by :func:`_check_single_rounding`)."""
    limit = torch.finfo(dtype).max
    assume(all(bool((e.abs() <= limit).all()) for e in exact))


def _check_single_rounding(
    got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str, terms: torch.Tensor | None = None
) -> None:
    """``got`` (in ``dtype``) is at most as far from ``exact`` as the correctly rounded value is, up to the
    float64 noise of computing ``exact`` (``terms``: the magnitude of what was summed into it)."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values although the exact fold fits {dtype}"
    best = (exact.to(dtype).to(F64) - exact).abs()
    err = (got.to(F64) - exact).abs()
    slack = 1e-9 * best + 2.0**-48 * (exact.abs() if terms is None else terms) + 1e-300
    bad = err > best + slack
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} entries are more than one rounding away from the float64 fold; "
        f"worst excess {float((err - best)[bad].max()):.3e}"
    )


def _check_outputs(got, ref, magnitude, fan_abs, dtype, what) -> None:
    """``max |got - ref| <= RTOL[dtype] * max |ref| + floor`` (see the module docstring)."""
    scale = float(ref.abs().max())
    floor = _eta(dtype) * float(fan_abs.max() + 1) + 2.0**-40 * float(magnitude.max())
    err = float((got - ref).abs().max())
    tol = RTOL[dtype] * scale + floor
    assert err <= tol, f"{what}: max abs error {err:.3e} > tol {tol:.3e} (scale {scale:.3e}, {dtype})"


# --------------------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)
weight_dtypes = st.sampled_from(LOW)
eps_values = st.sampled_from([1e-5, 1e-3])
log10_vars = st.floats(-8.0, 4.0, allow_nan=False, allow_infinity=False)  # running_var log-uniform 1e-8..1e4


def _per_dim(draw, dim, lo, hi):
    return tuple(draw(st.integers(lo, hi)) for _ in range(dim))


# max |reference| is a meaningful output scale only as a maximum over enough outputs: a single output
# y = w'x + b' can cancel to almost nothing while its rounding error stays ~u (|w'x| + |b'|). The batch is
# therefore raised until every channel has at least this many outputs (Linear cases: batch >= 16).
MIN_OUTPUTS_PER_CHANNEL = 16


def _batch(draw, out_size) -> int:
    per_sample = 1
    for n in out_size:
        per_sample *= n
    return -(-MIN_OUTPUTS_PER_CHANNEL // per_sample) + draw(st.integers(0, 1))


@st.composite
def grouped_channels(draw):
    groups = draw(st.sampled_from([1, 2, 3, 4]))
    if draw(st.booleans()):  # depthwise
        return groups, groups, groups
    return groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3)), groups


@st.composite
def stats_dtype_for(draw, dtype):
    """BN statistics kept in fp32 (mixed precision) or in the weight's dtype (``model.half()``)."""
    return draw(st.sampled_from([torch.float32, dtype]))


# --------------------------------------------------------------------------------------------------------------
# BN after Conv / ConvTranspose
# --------------------------------------------------------------------------------------------------------------


@st.composite
def conv_after_cases(draw):
    dim = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    cin, cout, groups = draw(grouped_channels())
    kernel = _per_dim(draw, dim, 1, 3)
    stride = _per_dim(draw, dim, 1, 3)
    dilation = _per_dim(draw, dim, 1, 2)
    padding = _per_dim(draw, dim, 0, 2)
    extra = 2 if dim == 3 else 3
    if transposed:
        # torch: output_padding must be smaller than either stride or dilation.
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        size, out_size = [], []
        for k, s, d, p, op in zip(kernel, stride, dilation, padding, output_padding):
            need = 2 * p - d * (k - 1) - op  # (L - 1) * s >= need  <=>  output size >= 1
            lmin = 1 + max(0, -(-need // s))
            size.append(draw(st.integers(lmin, lmin + extra)))
            out_size.append((size[-1] - 1) * s - need + 1)
    else:
        output_padding = None
        size, out_size = [], []
        for k, s, d, p in zip(kernel, stride, dilation, padding):
            lmin = max(1, d * (k - 1) + 1 - 2 * p)
            size.append(draw(st.integers(lmin, lmin + extra)))
            out_size.append((size[-1] + 2 * p - d * (k - 1) - 1) // s + 1)
    dtype = draw(weight_dtypes)
    return dict(
        dim=dim,
        transposed=transposed,
        cin=cin,
        cout=cout,
        groups=groups,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        output_padding=output_padding,
        size=tuple(size),
        batch=_batch(draw, out_size),
        bias=draw(st.booleans()),
        affine=draw(st.booleans()),
        eps=draw(eps_values),
        log10_var=draw(st.lists(log10_vars, min_size=cout, max_size=cout)),
        log10_wscale=draw(st.floats(-2.0, 2.0)),
        dtype=dtype,
        stats_dtype=draw(stats_dtype_for(dtype)),
        pass_groups=draw(st.booleans()),  # Conv: groups must be irrelevant with channel_axis=0
        seed=draw(seeds),
    )


@_settings(600)
@given(case=conv_after_cases())
def test_fold_after_conv_matches_float64_modules(case):
    c = case
    gen = torch.Generator().manual_seed(c["seed"])
    dim, dtype, groups = c["dim"], c["dtype"], c["groups"]
    kw = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=groups)
    if c["transposed"]:
        kw["output_padding"] = c["output_padding"]
        conv64 = skip_init(CONVT[dim], c["cin"], c["cout"], c["kernel"], bias=c["bias"], dtype=F64, **kw)
    else:
        conv64 = skip_init(CONV[dim], c["cin"], c["cout"], c["kernel"], bias=c["bias"], dtype=F64, **kw)
    wscale = 10.0 ** c["log10_wscale"]
    weight = (torch.randn(conv64.weight.shape, generator=gen, dtype=F64) * wscale).to(dtype)
    bias = (torch.randn(c["cout"], generator=gen, dtype=F64) * 0.5).to(dtype) if c["bias"] else None
    with torch.no_grad():
        conv64.weight.copy_(weight.to(F64))
        if bias is not None:
            conv64.bias.copy_(bias.to(F64))
    bn = _make_bn_params(gen, c["cout"], c["log10_var"], c["eps"], c["affine"], c["stats_dtype"])
    x = torch.randn(c["batch"], c["cin"], *c["size"], generator=gen, dtype=F64)
    with torch.no_grad():
        ref = _reference_bn(bn, dim)(conv64(x))

    channel_axis = 1 if c["transposed"] else 0
    fold_groups = groups if (c["transposed"] or c["pass_groups"]) else 1
    w_f, b_f = fold_bn_after(weight, bias, bn, channel_axis=channel_axis, groups=fold_groups)

    exact_w, exact_b = _exact_after(weight, bias, bn, channel_axis, groups)
    _assume_representable(dtype, exact_w, exact_b)
    assert w_f.shape == weight.shape and b_f.shape == (c["cout"],)
    _check_single_rounding(w_f, exact_w, dtype, "weight")
    _check_single_rounding(b_f, exact_b, dtype, "bias")

    if c["transposed"]:
        run = lambda inp, w, b: FCONVT[dim](inp, w, b, **kw)  # noqa: E731
    else:
        run = lambda inp, w, b: FCONV[dim](inp, w, b, **kw)  # noqa: E731
    got = run(x, w_f.to(F64), b_f.to(F64))
    assert got.shape == ref.shape
    magnitude = run(x.abs(), exact_w.abs(), exact_b.abs())
    fan_abs = run(x.abs(), torch.ones_like(exact_w), None)
    _check_outputs(got, ref, magnitude, fan_abs, dtype, "BN(conv(x))")


# --------------------------------------------------------------------------------------------------------------
# BN after Linear
# --------------------------------------------------------------------------------------------------------------


@st.composite
def linear_cases(draw):
    cin, cout = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    dtype = draw(weight_dtypes)
    return dict(
        cin=cin,
        cout=cout,
        batch=draw(st.integers(MIN_OUTPUTS_PER_CHANNEL, MIN_OUTPUTS_PER_CHANNEL + 4)),
        bias=draw(st.booleans()),
        affine=draw(st.booleans()),
        eps=draw(eps_values),
        log10_var=draw(st.lists(log10_vars, min_size=cout, max_size=cout)),
        log10_wscale=draw(st.floats(-2.0, 2.0)),
        dtype=dtype,
        stats_dtype=draw(stats_dtype_for(dtype)),
        seed=draw(seeds),
    )


def _linear64(c, gen, cin, cout):
    lin = skip_init(nn.Linear, cin, cout, bias=c["bias"], dtype=F64)
    weight = (torch.randn(cout, cin, generator=gen, dtype=F64) * 10.0 ** c["log10_wscale"]).to(c["dtype"])
    bias = (torch.randn(cout, generator=gen, dtype=F64) * 0.5).to(c["dtype"]) if c["bias"] else None
    with torch.no_grad():
        lin.weight.copy_(weight.to(F64))
        if bias is not None:
            lin.bias.copy_(bias.to(F64))
    return lin, weight, bias


@_settings(200)
@given(c=linear_cases())
def test_fold_after_linear_matches_float64_modules(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dtype = c["dtype"]
    lin, weight, bias = _linear64(c, gen, c["cin"], c["cout"])
    bn = _make_bn_params(gen, c["cout"], c["log10_var"], c["eps"], c["affine"], c["stats_dtype"])
    x = torch.randn(c["batch"], c["cin"], generator=gen, dtype=F64)
    with torch.no_grad():
        ref = _reference_bn(bn, 1)(lin(x))

    w_f, b_f = fold_bn_after(weight, bias, bn)
    exact_w, exact_b = _exact_after(weight, bias, bn, 0, 1)
    _assume_representable(dtype, exact_w, exact_b)
    _check_single_rounding(w_f, exact_w, dtype, "weight")
    _check_single_rounding(b_f, exact_b, dtype, "bias")
    got = F.linear(x, w_f.to(F64), b_f.to(F64))
    magnitude = F.linear(x.abs(), exact_w.abs(), exact_b.abs())
    fan_abs = F.linear(x.abs(), torch.ones_like(exact_w))
    _check_outputs(got, ref, magnitude, fan_abs, dtype, "BN(linear(x))")


# --------------------------------------------------------------------------------------------------------------
# BN before Linear / before an unpadded Conv
# --------------------------------------------------------------------------------------------------------------


@_settings(200)
@given(c=linear_cases())
def test_fold_before_linear_matches_float64_modules(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dtype = c["dtype"]
    # BN sees the Linear's *input* channels: reuse the drawn sizes the other way round.
    cin, cout = c["cout"], c["cin"]
    lin, weight, bias = _linear64(c, gen, cin, cout)
    bn = _make_bn_params(gen, cin, c["log10_var"], c["eps"], c["affine"], c["stats_dtype"])
    x = torch.randn(c["batch"], cin, generator=gen, dtype=F64)
    with torch.no_grad():
        ref = lin(_reference_bn(bn, 1)(x))

    w_f, b_f = fold_bn_before(weight, bias, bn)
    exact_w, exact_b = _exact_before(weight, bias, bn, 1)
    _assume_representable(dtype, exact_w, exact_b)
    _check_single_rounding(w_f, exact_w, dtype, "weight")
    _check_single_rounding(b_f, exact_b, dtype, "bias", _before_bias_terms(weight, bias, bn, 1))
    got = F.linear(x, w_f.to(F64), b_f.to(F64))
    magnitude = F.linear(x.abs(), exact_w.abs(), exact_b.abs())
    fan_abs = F.linear(x.abs(), torch.ones_like(exact_w))
    _check_outputs(got, ref, magnitude, fan_abs, dtype, "linear(BN(x))")


@st.composite
def conv_before_cases(draw):
    dim = draw(st.integers(1, 3))
    cin, cout, groups = draw(grouped_channels())
    kernel = _per_dim(draw, dim, 1, 3)
    dilation = _per_dim(draw, dim, 1, 2)
    stride = _per_dim(draw, dim, 1, 3)
    extra = 2 if dim == 3 else 3
    size, out_size = [], []
    for k, s, d in zip(kernel, stride, dilation):
        lmin = d * (k - 1) + 1  # no padding
        size.append(draw(st.integers(lmin, lmin + extra)))
        out_size.append((size[-1] - lmin) // s + 1)
    dtype = draw(weight_dtypes)
    return dict(
        dim=dim,
        cin=cin,
        cout=cout,
        groups=groups,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        size=tuple(size),
        batch=_batch(draw, out_size),
        bias=draw(st.booleans()),
        affine=draw(st.booleans()),
        eps=draw(eps_values),
        log10_var=draw(st.lists(log10_vars, min_size=cin, max_size=cin)),
        log10_wscale=draw(st.floats(-2.0, 2.0)),
        dtype=dtype,
        stats_dtype=draw(stats_dtype_for(dtype)),
        seed=draw(seeds),
    )


@_settings(400)
@given(c=conv_before_cases())
def test_fold_before_unpadded_conv_matches_float64_modules(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dim, dtype, groups = c["dim"], c["dtype"], c["groups"]
    kw = dict(stride=c["stride"], padding=0, dilation=c["dilation"], groups=groups)
    conv64 = skip_init(CONV[dim], c["cin"], c["cout"], c["kernel"], bias=c["bias"], dtype=F64, **kw)
    weight = (torch.randn(conv64.weight.shape, generator=gen, dtype=F64) * 10.0 ** c["log10_wscale"]).to(dtype)
    bias = (torch.randn(c["cout"], generator=gen, dtype=F64) * 0.5).to(dtype) if c["bias"] else None
    with torch.no_grad():
        conv64.weight.copy_(weight.to(F64))
        if bias is not None:
            conv64.bias.copy_(bias.to(F64))
    bn = _make_bn_params(gen, c["cin"], c["log10_var"], c["eps"], c["affine"], c["stats_dtype"])
    x = torch.randn(c["batch"], c["cin"], *c["size"], generator=gen, dtype=F64)
    with torch.no_grad():
        ref = conv64(_reference_bn(bn, dim)(x))

    w_f, b_f = fold_bn_before(weight, bias, bn, groups=groups)
    exact_w, exact_b = _exact_before(weight, bias, bn, groups)
    _assume_representable(dtype, exact_w, exact_b)
    assert w_f.shape == weight.shape and b_f.shape == (c["cout"],)
    _check_single_rounding(w_f, exact_w, dtype, "weight")
    _check_single_rounding(b_f, exact_b, dtype, "bias", _before_bias_terms(weight, bias, bn, groups))
    run = lambda inp, w, b: FCONV[dim](inp, w, b, **kw)  # noqa: E731
    got = run(x, w_f.to(F64), b_f.to(F64))
    magnitude = run(x.abs(), exact_w.abs(), exact_b.abs())
    fan_abs = run(x.abs(), torch.ones_like(exact_w), None)
    _check_outputs(got, ref, magnitude, fan_abs, dtype, "conv(BN(x))")


# --------------------------------------------------------------------------------------------------------------
# fp16 overflow: finite exactly when the float64 fold fits
# --------------------------------------------------------------------------------------------------------------


@_settings(100)
@given(
    log10_var=st.lists(st.floats(-8.0, -4.0), min_size=4, max_size=4),
    log10_wscale=st.floats(0.0, 4.5),
    seed=seeds,
)
def test_fp16_fold_is_finite_whenever_the_float64_fold_fits(log10_var, log10_wscale, seed):
    """Tiny running_var scales weights by up to ~316 (eps=1e-5); with large weights the fold can leave fp16's
    range. Such examples are skipped; every other one must come back finite (and correctly rounded)."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(4, 2, 3, 3, generator=gen, dtype=F64) * 10.0**log10_wscale).clamp(-6e4, 6e4).half()
    bias = torch.randn(4, generator=gen, dtype=F64).half()
    bn = _make_bn_params(gen, 4, log10_var, 1e-5, True, torch.float32)
    w_f, b_f = fold_bn_after(weight, bias, bn, groups=2)
    exact_w, exact_b = _exact_after(weight, bias, bn, 0, 2)
    _assume_representable(torch.float16, exact_w, exact_b)
    _check_single_rounding(w_f, exact_w, torch.float16, "weight")
    _check_single_rounding(b_f, exact_b, torch.float16, "bias")


# --------------------------------------------------------------------------------------------------------------
# Folding in float64 then casting beats folding in the stored dtype
# --------------------------------------------------------------------------------------------------------------


def _naive_fold_after(weight, bias, bn):
    """What folding "in the weight's dtype" would do: every operation rounded to fp16."""
    s = bn.gamma / torch.sqrt(bn.var + bn.eps)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * s.reshape(shape), (bias - bn.mean) * s + bn.beta


def test_float64_then_cast_is_at_least_as_accurate_as_naive_fp16_folding():
    """fp16 model (weights *and* statistics in fp16) with tiny running_var (1e-8..1e-6, i.e. below fp16's
    normal range, so ``var + eps`` in fp16 is subnormal and coarse). Over many draws:

    * per entry, the float64-then-cast weight/bias is never farther from the exact fold than the naive one
      (it is the correctly rounded value);
    * the aggregated output error (sum over draws of max error / scale) of float64-then-cast is <= that of
      naive fp16 folding, and in fact clearly smaller.
    """
    gen = torch.Generator().manual_seed(20240601)
    total_ours = total_naive = 0.0
    draws = 150
    for _ in range(draws):
        cout, cin = 8, 4
        log10_var = (torch.rand(cout, generator=gen, dtype=F64) * 2 - 8).tolist()
        weight = torch.randn(cout, cin, 3, 3, generator=gen, dtype=F64).half()
        bias = (torch.randn(cout, generator=gen, dtype=F64) * 0.5).half()
        bn = _make_bn_params(gen, cout, log10_var, 1e-5, True, torch.float16)
        x = torch.randn(2, cin, 6, 6, generator=gen, dtype=F64)

        conv64 = skip_init(nn.Conv2d, cin, cout, 3, dtype=F64)
        with torch.no_grad():
            conv64.weight.copy_(weight.to(F64))
            conv64.bias.copy_(bias.to(F64))
            ref = _reference_bn(bn, 2)(conv64(x))

        ours = fold_bn_after(weight, bias, bn)
        naive = _naive_fold_after(weight, bias, bn)
        exact = _exact_after(weight, bias, bn, 0, 1)
        # |exact fold| < 316 * ~5: always representable in fp16, no overflow to skip here
        for o, n, e in zip(ours, naive, exact):
            assert o.dtype == n.dtype == torch.float16
            err_o, err_n = (o.to(F64) - e).abs(), (n.to(F64) - e).abs()
            assert bool((err_o <= err_n + 1e-9 * e.abs()).all())

        scale = float(ref.abs().max())
        for (w, b), acc in ((ours, "ours"), (naive, "naive")):
            err = float((F.conv2d(x, w.to(F64), b.to(F64)) - ref).abs().max()) / scale
            if acc == "ours":
                total_ours += err
                assert err <= RTOL[torch.float16]
            else:
                total_naive += err
    assert total_ours <= total_naive
    # Not a tie: the naive path loses ~several roundings (subnormal var + eps, sqrt, divide, multiply).
    assert total_ours < 0.8 * total_naive, (total_ours / draws, total_naive / draws)


# --------------------------------------------------------------------------------------------------------------
# identity_statistics
# --------------------------------------------------------------------------------------------------------------


def _awkward_values(dtype: torch.dtype, gen: torch.Generator, n: int) -> torch.Tensor:
    """Normals over the whole exponent range of ``dtype`` plus zeros, subnormals, extremes and infinities."""
    fi, inf = torch.finfo(dtype), float("inf")
    top = 30 if dtype == torch.float32 else 300
    mags = 10.0 ** (torch.rand(n, generator=gen, dtype=F64) * 2 * top - top)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    specials = torch.tensor(
        # zeros, smallest normal, smallest subnormal, largest, one, eps, infinities
        [0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny * fi.eps, fi.max, -fi.max, 1.0, -1.0, fi.eps, inf, -inf],
        dtype=F64,
    )
    vals = torch.cat([mags * signs * torch.randn(n, generator=gen, dtype=F64).abs(), specials]).to(dtype)
    return vals


def _bn_module(p: BNParams, dim: int, dtype: torch.dtype) -> nn.Module:
    mod = skip_init(BATCHNORM[dim], p.num_features, eps=p.eps, dtype=dtype).eval()
    with torch.no_grad():
        mod.running_mean.copy_(p.mean)
        mod.running_var.copy_(p.var)
        mod.weight.copy_(p.gamma)
        mod.bias.copy_(p.beta)
    return mod


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_identity_statistics_make_batchnorm2d_an_exact_identity(dtype, eps, channels_last):
    gen = torch.Generator().manual_seed(7)
    p = identity_statistics(5, eps, dtype)
    assert p.num_features == 5 and p.eps == eps
    for t in (p.mean, p.var, p.gamma, p.beta):
        assert t.dtype == dtype and t.shape == (5,)
    bn = _bn_module(p, 2, dtype)
    z = _awkward_values(dtype, gen, 5 * 3 * 7 * 9 - 12)[torch.randperm(5 * 3 * 7 * 9, generator=gen)]
    z = z.reshape(3, 5, 7, 9)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = bn(z)
    assert out.dtype == dtype
    assert torch.equal(out, z), f"max deviation {float((out.to(F64) - z.to(F64)).abs().nan_to_num().max())}"


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_identity_statistics_with_shift_compute_z_plus_shift_within_one_ulp(dtype, eps):
    gen = torch.Generator().manual_seed(11)
    shift = (torch.randn(6, generator=gen, dtype=F64) * 10.0 ** torch.randint(-3, 4, (6,), generator=gen)).to(dtype)
    shift_before = shift.clone()
    p = identity_statistics(6, eps, dtype, shift=shift)
    assert torch.equal(shift, shift_before)
    assert p.beta.data_ptr() != shift.data_ptr()
    bn = _bn_module(p, 2, dtype)
    z = torch.randn(4, 6, 5, 5, generator=gen, dtype=F64) * 10.0 ** torch.randint(-3, 4, (4, 6, 5, 5), generator=gen)
    z = z.to(dtype)
    with torch.no_grad():
        out = bn(z).to(F64)
    exact = z.to(F64) + shift.to(F64).reshape(1, -1, 1, 1)
    # one ulp of the exact result in ``dtype``
    a = exact.abs().to(dtype)
    ulp = (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).to(F64)
    err = (out - exact).abs()
    assert bool((err <= ulp).all()), f"worst error {float((err / ulp).max()):.3f} ulp"


def test_identity_statistics_neutralise_a_bn_after_its_scale_moved_into_the_conv():
    """The use in apply.py: fold a BN into the conv, keep the BN with identity statistics (+ shift)."""
    gen = torch.Generator().manual_seed(3)
    conv = skip_init(nn.Conv2d, 3, 6, 3, groups=3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    bn = _make_bn_params(gen, 6, [-8, -4, -2, 0, 2, 4], 1e-3, True, torch.float32)
    w_f, b_f = fold_bn_after(conv.weight, None, bn, groups=3)
    folded = skip_init(nn.Conv2d, 3, 6, 3, groups=3, bias=False)
    with torch.no_grad():
        folded.weight.copy_(w_f)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    keep = _bn_module(identity_statistics(6, 1e-3, torch.float32, shift=b_f), 2, torch.float32)
    with torch.no_grad():
        z = folded(x)
        assert torch.equal(keep(z), z + b_f.reshape(1, -1, 1, 1))


# --------------------------------------------------------------------------------------------------------------
# Contract details: errors, dtypes, no mutation
# --------------------------------------------------------------------------------------------------------------


def _bn(n: int, dtype=torch.float32, affine=True) -> BNParams:
    gen = torch.Generator().manual_seed(n)
    return _make_bn_params(gen, n, [0.0] * n, 1e-5, affine, dtype)


def _mentions(message: str, *numbers: int) -> bool:
    return all(re.search(rf"(?<![\d.]){n}(?![\d.])", message) for n in numbers)


@pytest.mark.parametrize(
    "call, numbers",
    [
        (lambda: fold_bn_after(torch.randn(6, 2, 3), None, _bn(7)), (6, 7)),  # Conv1d out=6
        (lambda: fold_bn_after(torch.randn(3, 4), torch.randn(3), _bn(4)), (3, 4)),  # Linear out=3
        # ConvTranspose (in=4, out/groups=3), groups=2 -> out=6; 4 (= in channels) is the tempting mistake
        (lambda: fold_bn_after(torch.randn(4, 3, 3), None, _bn(4), channel_axis=1, groups=2), (6, 4)),
        (lambda: fold_bn_after(torch.randn(4, 3, 3), None, _bn(3), channel_axis=1, groups=2), (6, 3)),
        (lambda: fold_bn_before(torch.randn(5, 3, 3, 3), None, _bn(5), groups=2), (6, 5)),  # Conv in=6
        (lambda: fold_bn_before(torch.randn(5, 3), None, _bn(5)), (3, 5)),  # Linear in=3
    ],
    ids=["conv-after", "linear-after", "convT-after-in", "convT-after-per-group", "conv-before", "linear-before"],
)
def test_channel_mismatch_raises_value_error_naming_both_counts(call, numbers):
    with pytest.raises(ValueError) as info:
        call()
    assert _mentions(str(info.value), *numbers), str(info.value)


def _fold_calls(dtype):
    """(name, weight, bias, bn, kwargs, function, bias length) over every entry point, inputs in ``dtype``."""
    gen = torch.Generator().manual_seed(5)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=F64).to(dtype)  # noqa: E731
    return [
        ("conv-after", r(6, 2, 3, 3), r(6), _bn(6, dtype), dict(groups=3), fold_bn_after, 6),
        ("conv-after-nobias", r(6, 2, 3), None, _bn(6, dtype, affine=False), {}, fold_bn_after, 6),
        ("convT-after", r(4, 3, 3, 3), r(6), _bn(6, dtype), dict(channel_axis=1, groups=2), fold_bn_after, 6),
        ("linear-after", r(5, 7), r(5), _bn(5, dtype), {}, fold_bn_after, 5),
        ("conv-before", r(4, 3, 3, 3), r(4), _bn(6, dtype), dict(groups=2), fold_bn_before, 4),
        ("linear-before", r(5, 7), None, _bn(7, dtype, affine=False), {}, fold_bn_before, 5),
    ]


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=["fp16", "bf16", "fp32", "fp64"]
)
def test_results_come_back_in_the_weight_dtype(dtype):
    for name, weight, bias, bn, kw, fn, n_bias in _fold_calls(dtype):
        w, b = fn(weight, bias, bn, **kw)
        assert w.dtype == dtype and b.dtype == dtype, name
        assert w.shape == weight.shape and b.shape == (n_bias,), name


def test_results_follow_the_weight_dtype_not_the_bias_or_statistics_dtype():
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(6, 2, 3, 3, generator=gen).half()
    w, b = fold_bn_after(weight, torch.randn(6, generator=gen, dtype=F64), _bn(6, torch.float32))
    assert (w.dtype, b.dtype) == (torch.float16, torch.float16)
    weight = torch.randn(6, 2, 3, 3, generator=gen).bfloat16()
    w, b = fold_bn_before(weight, torch.randn(6, generator=gen), _bn(2, F64))
    assert (w.dtype, b.dtype) == (torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=["fp16", "bf16", "fp32", "fp64"]
)
def test_inputs_are_not_modified(dtype):
    for name, weight, bias, bn, kw, fn, _ in _fold_calls(dtype):
        inputs = [t for t in (weight, bias, bn.mean, bn.var, bn.gamma, bn.beta) if t is not None]
        before = [t.clone() for t in inputs]
        w, b = fn(weight, bias, bn, **kw)
        for t, c in zip(inputs, before):
            assert t.dtype == c.dtype and torch.equal(t, c), name
        # the results own their memory: editing them leaves the inputs alone
        w.add_(1)
        b.add_(1)
        for t, c in zip(inputs, before):
            assert torch.equal(t, c), name


def test_parameters_with_requires_grad_are_accepted_and_results_are_detached():
    conv = skip_init(nn.Conv2d, 4, 6, 3)
    bn = skip_init(nn.BatchNorm2d, 6)
    with torch.no_grad():
        for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2)
    params = BNParams(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    w, b = fold_bn_after(conv.weight, conv.bias, params)
    assert not w.requires_grad and not b.requires_grad
    w, b = fold_bn_before(conv.weight, conv.bias, BNParams(bn.running_mean[:4], bn.running_var[:4], bn.eps))
    assert not w.requires_grad and not b.requires_grad
