"""mmcore.layers: MulT's 1×1 projection as a matrix product, the fast CPU dropout."""

import pytest
import torch
from torch import nn

from mmcore import FastDropout, PointwiseConv1d, dropout_fast


def test_pointwise_conv_equals_conv1d_in_values_gradients_and_state_dict():
    torch.manual_seed(0)
    conv = nn.Conv1d(7, 5, kernel_size=1)
    torch.manual_seed(0)
    pointwise = PointwiseConv1d(7, 5)
    # same initialisation draws and state-dict layout: weights load both ways
    torch.testing.assert_close(pointwise.state_dict(), conv.state_dict())
    pointwise.load_state_dict(conv.state_dict())
    x = torch.randn(3, 7, 11, requires_grad=True)
    expected, out = conv(x), pointwise(x)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    (expected * grad).sum().backward()
    reference = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = None
    (out * grad).sum().backward()
    for got, want in zip(
        (x.grad, pointwise.weight.grad, pointwise.bias.grad), reference, strict=True
    ):
        torch.testing.assert_close(got, want)
    # unbatched input and no bias, as nn.Conv1d
    bare = PointwiseConv1d(7, 5, bias=False)
    assert bare.bias is None
    torch.testing.assert_close(bare(x[0]), nn.functional.conv1d(x[0], bare.weight))
    assert isinstance(pointwise, nn.Conv1d)  # code looking for conv layers still finds it


def test_pointwise_conv_rejects_the_wrong_channels():
    with pytest.raises(ValueError, match=r"expected \[B, 7, T\]"):
        PointwiseConv1d(7, 5)(torch.randn(3, 11, 7))
    with pytest.raises(ValueError, match="got \\(7,\\)"):
        PointwiseConv1d(7, 5)(torch.randn(7))


def test_fast_dropout_module_is_dropout_in_training_and_identity_in_eval():
    torch.manual_seed(0)
    layer = FastDropout(0.25)
    x = torch.rand(100, 100) + 1.0
    assert (layer(x) == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert layer.eval()(x) is x
    assert "p=0.25" in repr(layer)
    with pytest.raises(ValueError, match="inplace"):
        FastDropout(0.1, inplace=True)


def test_dropout_drops_at_the_rate_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.rand(200, 500) + 1.0  # no zeros of its own
    out = dropout_fast(x, 0.1)
    dropped = out == 0
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.003)
    scale = 32768 / (32768 - 3277)  # p rounded to a multiple of 2^-15
    torch.testing.assert_close(out[~dropped], x[~dropped] * scale)
    # the mean over many masks is x
    ratios = torch.stack([dropout_fast(x[:4], 0.3) / x[:4] for _ in range(1000)])
    assert ratios.mean().item() == pytest.approx(1.0, abs=0.003)  # 2e6 draws: std 0.0005
    # every 16-bit chunk of the draws is used: no position is dropped more often than others
    by_position = torch.stack([dropout_fast(torch.ones(8), 0.5) == 0 for _ in range(4000)])
    assert by_position.float().mean(0).sub(0.5).abs().max() < 0.04


def test_dropout_is_seeded_by_torch_and_its_gradient_is_the_mask():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(3)
    a = dropout_fast(x, 0.2)
    torch.manual_seed(3)
    b = dropout_fast(x, 0.2)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, dropout_fast(x, 0.2))  # the generator moved on
    a.sum().backward()
    torch.testing.assert_close(x.grad, a.detach() / x.detach())
    # off in eval, at p = 0, and at a p that rounds to 0; p = 1 drops everything
    assert dropout_fast(x, 0.2, training=False) is x
    assert dropout_fast(x, 0.0) is x and dropout_fast(x, 1e-6) is x
    assert (dropout_fast(x, 1.0) == 0).all()
