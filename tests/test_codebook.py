"ELU+1 against a float64 reference, far below zero as well (where F.elu(x) + 1 rounds to 0 in float32)."
import math

import torch

from lexvla.codebook import elu1p


def test_elu1p_matches_float64_reference_and_keeps_tiny_weights():
    x = torch.linspace(-60, 8, 2001, dtype=torch.float32, requires_grad=True)
    y = elu1p(x)
    xd = x.detach().double()
    ref = torch.where(xd > 0, xd + 1, torch.exp(xd))          # ELU(x) + 1 written out
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad.double(), torch.where(xd > 0, torch.ones_like(xd), torch.exp(xd)), rtol=1e-6, atol=0)
    # by hand: at -20 the weight is e^-20 = 2.06e-9, not the 0 that (e^-20 - 1) + 1 gives in float32
    assert math.isclose(float(elu1p(torch.tensor(-20.0))), math.exp(-20), rel_tol=1e-6)
    assert float(torch.nn.functional.elu(torch.tensor(-20.0)) + 1) == 0.0
