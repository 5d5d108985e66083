"""The erf and exp the GELU kernels use (linear.py's fc1 + GELU tile, mlp.py's training GELU),
made of arithmetic only.

GELU(x) = x * (1 + erf(x / sqrt 2)) / 2 is exact-erf GELU, as timm's nn.GELU. A libm call per
element would keep the GELU loops scalar; these rational fits vectorise and stay within one ulp:
`erf32` (within 1 float32 ulp once rounded, fitted by scripts/fit_erf32.py) and `erf64` (within
1 float64 ulp, scripts/fit_erf64.py), both tested against exact erfs. `erf_for` picks one by
the activations' dtype, once per compiled type; `gelu_value` is the GELU every kernel evaluates
with it. `exp_nonpositive` is the exp erf64 and GELU's slope (mlp.py) need.
"""

from __future__ import annotations

import math

import numba
import numba.extending
import numpy as np

from .jit import INLINE_JIT, JIT
from .llvm import fma


# erf(x) ~ x * P(x^2) / Q(x^2) for |x| <= 4, fitted by scripts/fit_erf32.py. Evaluated in float64
# it is within 1 float32 ulp of the exact erf (tested), and unlike a libm call it vectorises: the
# float32 GELU costs a few multiply-adds an element instead of a function call.
_ERF32_P = (1.1283791828557568, 0.18464218086117465, 0.05432957883500719, 0.003837558269364263,
            0.000382898632632459, 4.787317654138257e-06, -1.3695023282078722e-08)
_ERF32_Q = (1.0, 0.49696842670177166, 0.11380346548497325, 0.015450254739050696,
            0.0013094628387245167, 6.407477200176016e-05)
SQRT_HALF = math.sqrt(0.5)


@numba.njit(**JIT)
def erf32(x):
    # x: float64; result within 1 float32 ulp of erf(x) once rounded to float32
    a = min(max(x, -4.0), 4.0)  # the fit's range; beyond, float32 erf is +-1
    t = a * a
    t2 = t * t
    t4 = t2 * t2
    p0, p1, p2, p3, p4, p5, p6 = _ERF32_P
    q0, q1, q2, q3, q4, q5 = _ERF32_Q
    # Estrin's scheme, not Horner's: three dependent multiply-adds instead of six, for the GELU
    # loop waits on that chain
    num = (p0 + t * p1) + t2 * (p2 + t * p3) + t4 * ((p4 + t * p5) + t2 * p6)
    den = (q0 + t * q1) + t2 * (q2 + t * q3) + t4 * (q4 + t * q5)
    # +-1 itself beyond 4, not the fit's 1 - 2e-8 there: GELU's 1 + erf(x) must be 0 for large
    # negative x, or x times it is not (a select, not a branch: the loop stays vectorised)
    return a * num / den if abs(x) < 4.0 else math.copysign(1.0, x)


# float64 erf from arithmetic alone, fitted by scripts/fit_erf64.py (see there), so that the GELU
# loop vectorises. Its polynomials are evaluated with fused multiply-adds, which keeps it within
# 1 ulp of the exact erf (tested) and shortens the loop's dependency chains.
_ERF64_SMALL_P = (0.1283791670955126, -0.3170140210501066, -0.04831000610875467, -0.008812639421024768,
                  -0.0004951455370909747, -2.071155112422161e-05)
_ERF64_SMALL_Q = (1.0, 0.4604514059337391, 0.09378470115183579, 0.010687519279199436,
                  0.0006919395167024753, 2.0785316787251384e-05)
_ERF64_LARGE_P = (0.9999999999361617, 1.6845880528558341, 1.4190212383455725, 0.7382370063756867,
                  0.25276035845715616, 0.05670040573398806, 0.0077420879304875385, 0.0005025011218855426,
                  1.5052902626585605e-11)
_ERF64_LARGE_Q = (1.0, 2.8129672190991575, 3.5931148515729627, 2.731918486266149, 1.358347885468797,
                  0.45486135069858546, 0.10094470290438697, 0.013722460657207166, 0.0008906613942539173)
_LN2_HI, _LN2_LO = 0.6931471803691238, 1.9082149292705877e-10  # ln 2 = hi + lo, k * hi exact
_EXP_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(14))  # |r| <= ln2/2: error < 2**-57
_ROUND = 1.5 * 2.0**52  # (y + _ROUND) - _ROUND rounds y to an integer, in float arithmetic
_INV_LN2 = 1.0 / math.log(2.0)


@numba.njit(**INLINE_JIT)
def _polynomial(coefficients, x):
    # coefficients lowest degree first; Horner's rule with fused multiply-adds, unrolled while
    # compiling so that the loops around it still vectorise
    result = 0.0
    for c in numba.literal_unroll(coefficients[::-1]):
        result = fma(result, x, c)
    return result


@numba.njit(**INLINE_JIT)
def exp_nonpositive(y):
    # exp(y) for -37 <= y <= 0: exp(r) * 2**k with y = k ln2 + r, |r| <= ln2/2, within an ulp
    k = (y * _INV_LN2 + _ROUND) - _ROUND
    r = (y - k * _LN2_HI) - k * _LN2_LO
    two_to_k = np.int64((np.int64(k) + 1023) << 52).view(np.float64)  # the float64 bits of 2**k
    return _polynomial(_EXP_TAYLOR, r) * two_to_k


@numba.njit(**INLINE_JIT)
def erf64(x):
    # x: float64; within 1 ulp of erf(x)
    a = min(abs(x), 6.0)  # erf(6) rounds to 1 in float64
    t = x * x
    small = x + x * (_polynomial(_ERF64_SMALL_P, t) / _polynomial(_ERF64_SMALL_Q, t))
    large = 1.0 - exp_nonpositive(-a * a) * (_polynomial(_ERF64_LARGE_P, a) / _polynomial(_ERF64_LARGE_Q, a))
    return small if a < 1.0 else math.copysign(large, x)  # both computed: a select, not a branch


def erf_for(sample, v):
    """erf(v) for v: float64, accurate to the precision of sample's type: erf32 for float32,
    erf64 for float64. Compiled, the choice is made once per type."""
    return erf32(v) if isinstance(sample, np.float32) else erf64(v)


@numba.extending.overload(erf_for, inline="always")
def _erf_for_compiled(sample, v):
    if sample == numba.types.float32:
        return lambda sample, v: erf32(v)
    return lambda sample, v: erf64(v)


@numba.njit(**INLINE_JIT)
def gelu_value(x):
    # GELU(x) = x (1 + erf(x / sqrt 2)) / 2 of a float32 or float64 x, evaluated in float64 with
    # the erf of x's precision (erf_for); the caller rounds it once to what it stores
    v = np.float64(x)
    return 0.5 * v * (1.0 + erf_for(x, v * SQRT_HALF))
