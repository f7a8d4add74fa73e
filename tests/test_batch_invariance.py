"""runtime.batch_invariance: under `row_invariant_matmuls`, a row's product is the same bits
whatever rows share the call, on the machine that runs the tests (MKL picks kernels by row count,
and which counts differ varies between CPUs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.batch_invariance import ROW_CHUNK, padded_mm, row_invariant_matmuls


@pytest.mark.parametrize("k, n", [(768, 1024), (64, 256), (3072, 768), (320, 960)])
def test_each_row_of_a_product_is_the_same_at_every_row_count(k, n):
    torch.manual_seed(0)
    weight = torch.randn(n, k).t()
    x = torch.randn(3 * ROW_CHUNK + 5, k)
    alone = torch.cat([padded_mm(x[i:i + 1], weight) for i in range(x.shape[0])])
    for rows in [*range(1, 2 * ROW_CHUNK + 2), x.shape[0]]:
        assert torch.equal(padded_mm(x[:rows], weight), alone[:rows]), rows
    assert torch.allclose(alone, x @ weight, rtol=1e-4, atol=1e-3)  # the product, not just a stable one


def test_the_mode_routes_linear_layers_and_products_and_leaves_the_rest():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(2, 23, 96)
    with row_invariant_matmuls(torch.device("cpu")):
        batched = linear(x)
        single = linear(x[1:])
        product = x[0] @ linear.weight.t()
        summed = torch.addmm(linear.bias, x[0], linear.weight.t())
    assert torch.equal(batched[1:], single)
    assert torch.equal(product + linear.bias, summed)
    torch.testing.assert_close(batched, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
