"""Linear layers through oneDNN on CPU: same results as F.linear, used only where it pays."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from prefixcache.models import cpu_linear
from prefixcache.models.parallel_layers import ColumnParallelLinear, RowParallelLinear

pytestmark = pytest.mark.skipif(not cpu_linear.ENABLED, reason="oneDNN is not in this build")


def _weights(rows: int, inputs: int, outputs: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, generator=gen)
    return x, torch.randn(outputs, inputs, generator=gen), torch.randn(outputs, generator=gen)


@pytest.mark.parametrize("with_bias", [True, False])
def test_a_prefill_sized_product_equals_f_linear(with_bias):
    x, weight, bias = _weights(36, 512, 768)
    bias = bias if with_bias else None
    assert cpu_linear._onednn_fits(x, weight)
    got = cpu_linear.linear(x, weight, bias)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_batched_and_strided_inputs_equal_f_linear():
    x, weight, bias = _weights(2 * 40, 256, 512)
    batched = x.reshape(2, 40, 256)
    strided = torch.randn(256, 80).t()  # a transposed view, not contiguous
    for inputs in (batched, strided):
        got = cpu_linear.linear(inputs, weight, bias)
        torch.testing.assert_close(got, F.linear(inputs, weight, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("rows", "inputs", "outputs", "dtype"),
    [
        (2, 512, 2048, torch.float32),  # a decode step of two sequences
        (30, 64, 128, torch.float32),  # too little work to pay oneDNN's per-call cost
        (36, 512, 768, torch.bfloat16),
    ],
)
def test_small_products_and_other_dtypes_stay_with_f_linear(rows, inputs, outputs, dtype):
    x, weight, _ = _weights(rows, inputs, outputs)
    assert not cpu_linear._onednn_fits(x.to(dtype), weight.to(dtype))


def test_autograd_inputs_stay_with_f_linear():
    x, weight, _ = _weights(36, 512, 768)
    assert not cpu_linear._onednn_fits(x, weight.requires_grad_())
    with torch.no_grad():
        assert cpu_linear._onednn_fits(x, weight)


def test_the_model_layers_compute_what_f_linear_does():
    torch.manual_seed(0)
    column = ColumnParallelLinear(512, [(768, range(768))], bias=True)
    row = RowParallelLinear(768, 512, bias=True)
    x = torch.randn(36, 512)
    with torch.inference_mode():
        hidden = column(x)
        torch.testing.assert_close(hidden, F.linear(x, column.weight, column.bias))
        torch.testing.assert_close(row(hidden), F.linear(hidden, row.weight, row.bias))
