"""The reference example networks: exact sizes (hand-checked against the specs) and shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from examples import dncnn, glcic, srresnet, unet
from lwcompile import count_params
from lwcompile.nn import LIST
from tests.helpers import image_and_mask, run


def test_dncnn_parameter_count():
    # 2 end convs: 64*1*9 = 576 each; 15 middle: 64*64*9 = 36,864 + BN 2*64 = 36,992.
    assert count_params(dncnn.build()) == 2 * 576 + 15 * 36_992 == 556_032


def test_cheap_dncnn_parameter_count_and_structure():
    model = dncnn.cheap_dncnn()
    # LIST(64, 64): squeeze 64*16+16 = 1,040; 1x1 branch 16*32+32 = 544;
    # depthwise 16*9+16 = 160 and 1x1 16*32+32 = 544 -> 2,288; plus BN 128 per block.
    assert count_params(model) == 2 * 576 + 15 * (2_288 + 128) == 37_392
    lists = [m for m in model.modules() if isinstance(m, LIST)]
    assert len(lists) == 15
    # Each LIST is still followed by BN + ReLU, and the end convs stay dense.
    body = list(model.body)
    for i, layer in enumerate(body):
        if isinstance(layer, LIST):
            assert isinstance(body[i + 1], nn.BatchNorm2d)
            assert isinstance(body[i + 2], nn.ReLU)
    assert isinstance(body[0], nn.Conv2d) and isinstance(body[-1], nn.Conv2d)


@pytest.mark.parametrize("factory", [dncnn.build, dncnn.cheap_dncnn])
def test_dncnn_shape_and_residual(factory):
    (x,) = dncnn.example_inputs()
    model = factory()
    y = run(model.eval(), (x,))
    assert y.shape == x.shape == (1, 1, 64, 64)
    torch.testing.assert_close(y, x - run(model.body, (x,)))


def test_example_inputs_are_seeded():
    torch.testing.assert_close(dncnn.example_inputs()[0], dncnn.example_inputs()[0])


def test_srresnet_parameter_count_and_shape():
    # head 3*64*81+64 + PReLU 1 = 15,617; block 2*(36,864+64) + 2*128 + 1 = 74,113 (x16);
    # fuse 36,928 + 128 = 37,056; up stage 64*256*9+256 + 1 = 147,713 (x2); tail 64*3*81+3.
    expected = 15_617 + 16 * 74_113 + 37_056 + 2 * 147_713 + 15_555
    model = srresnet.build()
    assert count_params(model) == expected == 1_549_462
    assert run(model.eval(), srresnet.example_inputs()).shape == (1, 3, 128, 128)


def test_srresnet_small_x2_variant():
    model = srresnet.SRResNet(scale=2, features=32, blocks=4)
    assert count_params(model) == 136_393
    assert run(model.eval(), (torch.rand(1, 3, 16, 12),)).shape == (1, 3, 32, 24)
    with pytest.raises(ValueError):
        srresnet.SRResNet(scale=3)


def test_glcic_parameter_count_and_shape():
    conv = [  # (in, out, k) of every conv / transposed conv, with bias
        (4, 64, 5),
        (64, 128, 3),
        (128, 128, 3),
        (128, 256, 3),
        *[(256, 256, 3)] * 8,  # 2 plain, 4 dilated, 2 plain
        (256, 128, 4),
        (128, 128, 3),
        (128, 64, 4),
        (64, 32, 3),
        (32, 3, 3),
    ]
    bn_channels = [64, 128, 128, *[256] * 9, 128, 128, 64, 32]
    expected = sum(i * o * k * k + o for i, o, k in conv) + 2 * sum(bn_channels)
    model = glcic.build()
    assert count_params(model) == expected == 6_072_131
    image, mask = glcic.example_inputs()
    assert mask.shape == (1, 1, 64, 64) and mask.sum() > 0
    y = run(model.eval(), (image, mask))
    assert y.shape == (1, 3, 64, 64)
    assert y.min() >= 0 and y.max() <= 1


def test_glcic_odd_input_runs():
    y = run(glcic.build().eval(), image_and_mask(67, 61))
    # Two stride-2 convs (67 -> 34 -> 17, 61 -> 31 -> 16), then two x2 deconvs: no cropping.
    assert y.shape == (1, 3, 68, 64)


def test_glcic_hole_content_is_ignored():
    image, mask = glcic.example_inputs()
    other = image.clone()
    other[mask.expand_as(image) > 0] = 0.5
    model = glcic.build().eval()
    torch.testing.assert_close(run(model, (image, mask)), run(model, (other, mask)))


def test_unet_parameter_count_and_shape():
    def conv(i, o, k):
        return i * o * k * k + o

    def double(i, o):
        return conv(i, o, 3) + conv(o, o, 3)

    def up(i, o):  # transposed 2x2, 1x1 fuse of the concat, double conv
        return conv(i, o, 2) + conv(2 * o, o, 1) + double(o, o)

    expected = (
        double(3, 32)
        + double(32, 64)
        + double(64, 128)
        + double(128, 256)
        + up(256, 128)
        + up(128, 64)
        + up(64, 32)
        + conv(32, 3, 1)
    )
    model = unet.build()
    assert count_params(model) == expected == 1_775_363
    (x,) = unet.example_inputs()
    assert run(model.eval(), (x,)).shape == x.shape == (1, 3, 64, 64)
