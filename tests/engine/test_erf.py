"""erf.py's erfs against exact ones: within one ulp in float32 and in float64."""

import numpy as np

from npconvnext.engine import erf


def test_float64_erf_is_within_one_ulp_of_the_exact_erf():
    import mpmath

    mpmath.mp.dps = 30
    x = np.linspace(-7, 7, 20_001)
    x = np.concatenate([x, np.logspace(-300, 0.8, 1000), -np.logspace(-300, 0.8, 1000), [0.0, np.inf, -np.inf]])
    ours = np.array([erf.erf64(float(v)) for v in x])
    exact = [mpmath.erf(mpmath.mpf(float(v))) for v in x]
    ulp = np.spacing(np.abs(np.array([float(e) for e in exact])))
    ulp_error = np.array([float(abs(mpmath.mpf(float(o)) - e)) for o, e in zip(ours, exact)]) / ulp
    assert ulp_error.max() <= 1.0, (ulp_error.max(), x[ulp_error.argmax()])


def test_float32_erf_is_within_one_ulp_of_the_exact_erf():
    import math

    x = np.linspace(-6, 6, 400_001).astype(np.float32)
    x = np.concatenate([x, np.logspace(-30, 0, 2000, dtype=np.float32), -np.logspace(-30, 0, 2000, dtype=np.float32)])
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    ours = np.array([erf.erf32(float(v)) for v in x.astype(np.float64)]).astype(np.float32)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert (np.abs(ours - exact) / ulp).max() <= 1.0
