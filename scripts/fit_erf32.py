"""Fit the rational erf that npconvnext's float32 GELU kernel uses (engine/erf.py's _ERF32_P/_Q).

    python scripts/fit_erf32.py

erf(x) ~ x * P(x^2) / Q(x^2) on |x| <= 4 (beyond, float32 erf is +-1), P of degree 6, Q of
degree 5, Q(0) = 1: weighted linear least squares on the error in erf, re-weighted by the last
Q (Sanathanan-Koerner iteration). Evaluated in float64 and rounded, it is within 1 float32 ulp
of the exact erf; tests/engine/test_erf.py checks that on a dense grid.
"""

import math

import numpy as np

DEG_P, DEG_Q, ITERATIONS = 6, 5, 40

x = np.linspace(1e-4, 4.0, 20000)
target = np.array([math.erf(v) for v in x]) / x   # erf(x) / x as a function of t = x^2
t = x * x
q = np.ones_like(t)
for _ in range(ITERATIONS):
    A = np.hstack([np.vander(t, DEG_P + 1, increasing=True),
                   -target[:, None] * np.vander(t, DEG_Q + 1, increasing=True)[:, 1:]])
    weight = x / q                                  # error in erf = x * (P - target Q) / Q
    solution, *_ = np.linalg.lstsq(A * weight[:, None], target * weight, rcond=None)
    p, qc = solution[: DEG_P + 1], np.concatenate([[1.0], solution[DEG_P + 1 :]])
    q = np.polyval(qc[::-1], t)
print("_ERF32_P =", tuple(p.tolist()))
print("_ERF32_Q =", tuple(qc.tolist()))
