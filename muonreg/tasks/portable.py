"""The in-network track fit's float64 math, in a form every ONNX runtime can run.

The fit (`track_fit`) works in float64. ONNX has no linear solver, and ONNX Runtime has no float64
kernel for atan, asinh, tan or cosh. While `torch.export` traces the model (`python -m
muonreg.export`), the functions below therefore use closed forms built from operations it does
have (arithmetic, sqrt, log, exp, sin, cos): a 3x3 inverse by its adjugate, the Cephes
rational approximation of atan, asinh through an accurate log1p. All stay float64 and agree with
torch's to a few units in the last place (tests/test_export.py); outside an export, torch's own
functions run, so training and evaluation are unchanged.
"""

from __future__ import annotations

import math

import torch


def exporting() -> bool:
    """Whether torch.export is tracing the model (the graph must use the portable forms)."""
    return torch.compiler.is_exporting()


def inverse3(a: torch.Tensor) -> torch.Tensor:
    """Inverse of 3x3 matrices [..., 3, 3] in closed form (adjugate over determinant)."""
    r0, r1, r2 = a[..., 0, :], a[..., 1, :], a[..., 2, :]
    columns = torch.stack([_cross(r1, r2), _cross(r2, r0), _cross(r0, r1)], -1)  # the adjugate
    det = (r0 * columns[..., :, 0]).sum(-1)
    return columns / det[..., None, None]


def _cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x0, x1, x2 = x.unbind(-1)
    y0, y1, y2 = y.unbind(-1)
    return torch.stack([x1 * y2 - x2 * y1, x2 * y0 - x0 * y2, x0 * y1 - x1 * y0], -1)


# Cephes atan (double precision): range reduction to |x| <= 0.66, then x + x^3 P(x^2) / Q(x^2).
_T3P8 = 2.41421356237309504880  # tan(3 pi / 8)
_MOREBITS = 6.123233995736765886130e-17  # pi/2 = PIO2 + MOREBITS in double
_P = (-8.750608600031904122785e-1, -1.615753718733365076637e1, -7.500855792314704667340e1,
      -1.228866684490136173410e2, -6.485021904942025371773e1)  # fmt: skip
_Q = (1.0, 2.485846490142306297962e1, 1.650270098316988542046e2, 4.328810604912902668951e2,
      4.853903996359136964868e2, 1.945506571482613964425e2)  # fmt: skip


def _polynomial(x: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    out = torch.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        out = out * x + c
    return out


def portable_atan(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    large, middle = a > _T3P8, a > 0.66
    # clamp: no division by zero in the branch not taken
    reduced = torch.where(large, -1 / a.clamp(min=_T3P8), torch.where(middle, (a - 1) / (a + 1), a))
    zero = torch.zeros_like(a)  # where() of two Python floats would be float32
    base = torch.where(large, math.pi / 2, torch.where(middle, math.pi / 4, zero))
    extra = torch.where(large, _MOREBITS, torch.where(middle, 0.5 * _MOREBITS, zero))
    z = reduced * reduced
    y = base + (reduced + reduced * z * _polynomial(z, _P) / _polynomial(z, _Q) + extra)
    return torch.where(x < 0, -y, y)


def portable_atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    safe_x = torch.where(x == 0, 1.0, x)
    base = portable_atan(y / safe_x)
    zero = torch.zeros_like(base)
    half = torch.where(y > 0, math.pi / 2, torch.where(y < 0, -math.pi / 2, zero))
    turn = torch.where(y >= 0, math.pi, zero - math.pi)
    return torch.where(x > 0, base, torch.where(x < 0, base + turn, half))


def _log1p(u: torch.Tensor) -> torch.Tensor:
    """log(1 + u) accurate for small u (Goldberg): log(w) * u / (w - 1) with w = 1 + u rounded."""
    w = 1 + u
    return torch.where(w == 1, u, torch.log(w) * u / torch.where(w == 1, 1.0, w - 1))


def portable_asinh(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    y = _log1p(a + a * a / (1 + torch.sqrt(1 + a * a)))
    return torch.where(x < 0, -y, y)


def portable_tan(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) / torch.cos(x)


def portable_cosh(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x.abs())
    return 0.5 * (e + 1 / e)


def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.linalg.solve of 3x3 systems [..., 3, 3] x = [..., 3] (closed form while exporting).

    The `_ex` forms skip the singularity check, which on a GPU makes the host wait for the device at
    every call; the track fit's normal matrices carry a prior on their diagonal and are never singular.
    """
    if exporting():
        return (inverse3(a) @ b.unsqueeze(-1)).squeeze(-1)
    return torch.linalg.solve_ex(a, b).result


def inverse(a: torch.Tensor) -> torch.Tensor:
    return inverse3(a) if exporting() else torch.linalg.inv_ex(a).inverse


def atan(x: torch.Tensor) -> torch.Tensor:
    return portable_atan(x) if exporting() else torch.atan(x)


def atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return portable_atan2(y, x) if exporting() else torch.atan2(y, x)


def asinh(x: torch.Tensor) -> torch.Tensor:
    return portable_asinh(x) if exporting() else torch.asinh(x)


def tan(x: torch.Tensor) -> torch.Tensor:
    return portable_tan(x) if exporting() else torch.tan(x)


def cosh(x: torch.Tensor) -> torch.Tensor:
    return portable_cosh(x) if exporting() else torch.cosh(x)
