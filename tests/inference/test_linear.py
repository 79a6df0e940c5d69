"""inference.layers.linear: one-row products split over the intra-op threads give F.linear's bits.

The split is what makes a batch-of-one decode step faster on a CPU; giving the same bits keeps a
sequence's greedy tokens the same whether it decodes alone or with others, and the same as before.
"""

import pytest
import torch
import torch.nn.functional as F

from inference.layers import linear as linear_module
from inference.layers.linear import Linear, linear


# The shapes the model families use: fused q/k/v, o_proj, an expert's gate-and-up and down, an LM head.
@pytest.mark.parametrize("rows, inner", [(1024, 512), (512, 512), (512, 256), (256, 512), (640, 512), (4096, 1024)])
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_is_split_and_gives_the_same_bits_as_f_linear(two_threads, rows, inner, bias):
    generator = torch.Generator().manual_seed(rows + inner)
    weight = torch.randn(rows, inner, generator=generator)
    b = torch.randn(rows, generator=generator) if bias else None
    x = torch.randn(1, inner, generator=generator)
    assert linear_module._parts(x, weight) == 2
    assert torch.equal(linear(x, weight, b), F.linear(x, weight, b))


def test_other_shapes_and_dtypes_are_plain_f_linear(two_threads):
    weight = torch.randn(512, 512)
    assert linear_module._parts(torch.randn(2, 512), weight) == 1  # more than one row
    assert linear_module._parts(torch.randn(1, 1, 512), weight) == 1  # not [1, in]
    assert linear_module._parts(torch.randn(1, 512), torch.randn(32, 512)) == 1  # a router: too small to split
    assert linear_module._parts(torch.randn(1, 512).bfloat16(), weight.bfloat16()) == 1
    assert linear_module._parts(torch.randn(1, 512), weight.t()) == 1  # not contiguous
    assert linear_module._parts(torch.randn(1, 512), torch.randn(513, 512)) == 1  # rows not divisible
    torch.set_num_threads(1)
    assert linear_module._parts(torch.randn(1, 512), weight) == 1  # one thread: nothing to split over


def test_linear_module_is_an_nn_linear_computing_the_same():
    layer = Linear(512, 1024, bias=True)
    assert isinstance(layer, torch.nn.Linear)
    x = torch.randn(1, 512)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        batch = torch.randn(7, 512)
        assert torch.equal(layer(batch), F.linear(batch, layer.weight, layer.bias))
