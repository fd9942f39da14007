import math

import torch

from mmcore import sinusoidal_positions


def test_sinusoidal_positions_values_and_dtype():
    table = sinusoidal_positions(6, 4)
    assert table.shape == (6, 4) and table.dtype == torch.float32
    # position p, pair i: sin and cos of p / 10000^(2i / dim)
    p, i = 5, 1
    angle = p / 10000 ** (2 * i / 4)
    torch.testing.assert_close(table[p, 2 * i], torch.tensor(math.sin(angle)))
    torch.testing.assert_close(table[p, 2 * i + 1], torch.tensor(math.cos(angle)))
    # odd widths: the last column is a sine
    assert sinusoidal_positions(3, 5)[:, -1].abs().sum() > 0
    # the dtype of the sequence it is added to, so half precision is not promoted to float32
    half = sinusoidal_positions(6, 4, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, table.to(torch.bfloat16))
    assert (torch.zeros(6, 4, dtype=torch.bfloat16) + half).dtype == torch.bfloat16
