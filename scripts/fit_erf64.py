"""Fit the erf that npconvnext's float64 GELU kernel uses (engine/erf.py's _ERF64_*, _LN2_HI/_LO).

    python scripts/fit_erf64.py      # about 30 s; needs mpmath (a dependency of the test extra)

The C library's erf is a function call per element, which keeps the loop around it scalar:
7 times the float32 GELU's cost. This erf is built from arithmetic only, so it vectorises:
    |x| < 1:      erf(x) = x + x * P(x^2) / Q(x^2)              P, Q of degree 5
    1 <= |x|:     erf(x) = 1 - exp(-a^2) * P(a) / Q(a)          a = min(|x|, 6), degree 8
(erfc(6) is a fifth of erf's half-ulp at 1, so beyond 6 the result is 1.) exp(-a^2) is a
Taylor polynomial after the usual reduction by multiples of ln 2. The fits are linear least
squares in 40-digit arithmetic re-weighted by the last Q (Sanathanan-Koerner), weighted by the
absolute error they cause in erf. Evaluated in float64 the result is within 1.25 ulp of the
exact erf (glibc's: 0.96), and within 1 ulp when the polynomials are evaluated with fused
multiply-adds, as the kernel does; tests/engine/test_erf.py checks the kernel against mpmath.
"""

import mpmath as mp

mp.mp.dps = 40
ITERATIONS = 12


def fit(f, xs, weight, deg_p, deg_q):
    """P/Q ~ f on the points xs, minimising weight(x) * (P(x) - f(x) Q(x)) / Q_last(x)."""
    fx = [f(x) for x in xs]
    wx = [weight(x) for x in xs]
    q_last = [mp.mpf(1)] * len(xs)
    for _ in range(ITERATIONS):
        rows, rhs = [], []
        for x, y, w, ql in zip(xs, fx, wx, q_last):
            s = w / ql
            rows.append([s * x**i for i in range(deg_p + 1)] + [-s * y * x**j for j in range(1, deg_q + 1)])
            rhs.append(s * y)
        solution, _ = mp.qr_solve(mp.matrix(rows), mp.matrix(rhs))
        p = [solution[i] for i in range(deg_p + 1)]
        q = [mp.mpf(1)] + [solution[deg_p + 1 + j] for j in range(deg_q)]
        q_last = [mp.polyval(q[::-1], x) for x in xs]
    return tuple(float(c) for c in p), tuple(float(c) for c in q)


def erf_over_x_minus_1(t):  # as a function of t = x^2; the error in erf is x times this one's
    x = mp.sqrt(t)
    return 2 / mp.sqrt(mp.pi) - 1 if t == 0 else mp.erf(x) / x - 1


def erfc_times_exp(a):  # erfc(a) = exp(-a^2) * this; the error in erf is exp(-a^2) times this one's
    return mp.erfc(a) * mp.exp(a * a)


small = fit(erf_over_x_minus_1, [mp.mpf(i) / 400 for i in range(401)], lambda t: 1, 5, 5)
large = fit(erfc_times_exp, [1 + mp.mpf(5) * i / 600 for i in range(601)], lambda a: mp.exp(-a * a), 8, 8)
ln2 = mp.log(2)
ln2_hi = mp.mpf(int(ln2 * 2**32)) / 2**32  # 32 significant bits: k * _LN2_HI is exact for |k| < 2**21
print("_ERF64_SMALL_P =", small[0])
print("_ERF64_SMALL_Q =", small[1])
print("_ERF64_LARGE_P =", large[0])
print("_ERF64_LARGE_Q =", large[1])
print("_LN2_HI, _LN2_LO =", float(ln2_hi), float(ln2 - ln2_hi))
