"""A zoo of small, randomly initialised image-restoration networks from spandrel.

Every architecture that spandrel 0.4.2 ships (``spandrel/architectures/*``) is built here from
spandrel's own classes at a *small* configuration: fewer blocks / features than the released
checkpoints, but the same building blocks (upsampler kind, convolution types, skips, concats,
attention).  One forward pass at the entry's example input takes well under a second on a
2-core CPU.  No weights are downloaded: parameters are random (``torch.manual_seed`` fixed).

Usage::

    from examples.zoo import ZOO, ZOO_FAST
    entry = ZOO["ESRGAN"]
    model = entry.build()                 # eval mode
    with torch.no_grad():
        out = model(*entry.example_inputs())

Some models return a tuple whose first element is the image (noted in ``ZooEntry.note``);
use :func:`first_image` to get the image in every case.

spandrel 0.4.2 imports ``torchvision`` at import time (LaMa's arch module, RestoreFormer's
loader), although none of the code paths used here calls it.  When torchvision is not
installed, a stub ``torchvision.transforms.functional`` is put into ``sys.modules`` only while
spandrel is imported and removed right after (its functions raise if ever called), so this
module never pulls a torchvision wheel and never leaves a fake torchvision behind.

``rrdbnet_full()`` builds the full-size ESRGAN generator (23 RRDB blocks, 64 features, x4;
351 convolutions) for compile-time benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lwcompile.cli.spandrel import torchvision_stub

SEED = 0




SPANDREL_IMPORT_ERROR: str | None = None
try:
    with torchvision_stub():
        from spandrel.architectures.ATD import ATD
        from spandrel.architectures.AuraSR import AuraSR
        from spandrel.architectures.Compact import Compact
        from spandrel.architectures.CRAFT import CRAFT
        from spandrel.architectures.DAT import DAT
        from spandrel.architectures.DCTLSA import DCTLSA
        from spandrel.architectures.DITN import DITN
        from spandrel.architectures.DnCNN import DnCNN
        from spandrel.architectures.DRCT import DRCT
        from spandrel.architectures.DRUNet import DRUNet
        from spandrel.architectures.ESRGAN import ESRGAN
        from spandrel.architectures.FBCNN import FBCNN
        from spandrel.architectures.FDAT import FDAT
        from spandrel.architectures.FFTformer import FFTformer
        from spandrel.architectures.GFPGAN import GFPGAN
        from spandrel.architectures.GRL import GRL
        from spandrel.architectures.HAT import HAT
        from spandrel.architectures.HVICIDNet import HVICIDNet
        from spandrel.architectures.IPT import IPT
        from spandrel.architectures.KBNet import KBNet_l, KBNet_s
        from spandrel.architectures.LaMa import LaMa
        from spandrel.architectures.MixDehazeNet import MixDehazeNet
        from spandrel.architectures.MMRealSR import MMRealSR
        from spandrel.architectures.MoESR import MoESR
        from spandrel.architectures.MoSR import MoSR
        from spandrel.architectures.NAFNet import NAFNet
        from spandrel.architectures.OmniSR import OmniSR
        from spandrel.architectures.PLKSR import PLKSR, RealPLKSR
        from spandrel.architectures.RCAN import RCAN
        from spandrel.architectures.RealCUGAN import (
            UpCunet2x,
            UpCunet2x_fast,
            UpCunet3x,
            UpCunet4x,
        )
        from spandrel.architectures.RestoreFormer import RestoreFormer
        from spandrel.architectures.RetinexFormer import RetinexFormer
        from spandrel.architectures.RGT import RGT
        from spandrel.architectures.SAFMN import SAFMN
        from spandrel.architectures.SAFMNBCIE import SAFMNBCIE
        from spandrel.architectures.SCUNet import SCUNet
        from spandrel.architectures.SeemoRe import SeemoRe
        from spandrel.architectures.SPAN import SPAN
        from spandrel.architectures.SwiftSRGAN import SwiftSRGAN
        from spandrel.architectures.Swin2SR import Swin2SR
        from spandrel.architectures.SwinIR import SwinIR
        from spandrel.architectures.Uformer import Uformer
except ImportError as exc:  # spandrel (or einops / safetensors) not installed
    SPANDREL_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Also exported by spandrel.architectures.* but not networks of their own, so not in the zoo:
# IPT.Model (spandrel's tile-chopping wrapper around IPT) and the typing Literals
# FDAT.SampleMods3, MoESR.SampleMods and SeemoRe.LRSpace.


@dataclass(frozen=True)
class ZooEntry:
    name: str  # e.g. "ESRGAN"
    build: Callable[[], nn.Module]  # small config, eval mode
    example_inputs: Callable[[], tuple]  # e.g. (torch.rand(1, 3, 64, 64),)
    note: str = ""  # anything notable (size constraints, tuple outputs, ...)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Wrap a constructor: fixed seed, eval mode."""

    def build() -> nn.Module:
        torch.manual_seed(SEED)
        return factory().eval()

    return build


def _image(size: int = 64, channels: int = 3) -> Callable[[], tuple]:
    def make() -> tuple:
        g = torch.Generator().manual_seed(SEED)
        return (torch.rand(1, channels, size, size, generator=g),)

    return make


def _image_and_mask(size: int = 64) -> Callable[[], tuple]:
    def make() -> tuple:
        g = torch.Generator().manual_seed(SEED)
        image = torch.rand(1, 3, size, size, generator=g)
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 4 : size // 2, size // 4 : 3 * size // 4] = 1.0
        return image, mask

    return make


def first_image(output: object) -> torch.Tensor:
    """The image of a model's output (models noted as returning a tuple put it first)."""
    while isinstance(output, tuple | list):
        output = output[0]
    assert isinstance(output, torch.Tensor)
    return output


def rrdbnet_full() -> nn.Module:
    """Full-size ESRGAN generator: RRDBNet, 23 RRDB blocks, 64 features, x4 (351 convs)."""
    if SPANDREL_IMPORT_ERROR is not None:
        raise ImportError(f"rrdbnet_full needs spandrel: {SPANDREL_IMPORT_ERROR}")
    torch.manual_seed(SEED)
    return ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4).eval()


def _entries() -> list[ZooEntry]:
    e = ZooEntry
    return [
        # ------------------------------------------------------------------ plain CNNs
        e(
            "ESRGAN",
            _seeded(lambda: ESRGAN(in_nc=3, out_nc=3, num_filters=32, num_blocks=2, scale=4)),
            _image(64),
            "RRDBNet (dense blocks: concats), nearest+conv ('upconv') x4 upsampler; 2 of 23 "
            "RRDB blocks, 32 of 64 features. rrdbnet_full() builds the standard size.",
        ),
        e(
            "Compact",
            _seeded(lambda: Compact(num_in_ch=3, num_out_ch=3, num_feat=32, num_conv=8, upscale=4)),
            _image(64),
            "SRVGGNetCompact: PReLU convs, pixel shuffle x4, nearest-upsampled input added; "
            "8 of 16 convs, 32 of 64 features.",
        ),
        e(
            "SwiftSRGAN",
            _seeded(
                lambda: SwiftSRGAN(in_channels=3, num_channels=32, num_blocks=4, upscale_factor=4)
            ),
            _image(64),
            "Depthwise-separable SRResNet with BatchNorm + PReLU, pixel shuffle x4; "
            "4 of 16 blocks, 32 of 64 channels.",
        ),
        e(
            "DnCNN",
            _seeded(lambda: DnCNN(in_nc=3, out_nc=3, nc=64, nb=20, act_mode="BR")),
            _image(64),
            "Color DnCNN at standard size (20 convs, 64 features), conv+BN+ReLU, global residual.",
        ),
        e(
            "FDnCNN",
            _seeded(lambda: DnCNN(in_nc=4, out_nc=3, nc=64, nb=12, act_mode="R", mode="FDnCNN")),
            _image(64, channels=4),
            "DnCNN class in FDnCNN mode: input = RGB + noise-level map (4 channels), no BN, "
            "no residual; 12 of 20 convs.",
        ),
        e(
            "RCAN",
            _seeded(lambda: RCAN(scale=4, n_resgroups=2, n_resblocks=3, n_feats=32)),
            _image(64),
            "Residual groups of channel-attention blocks, mean shift, pixel shuffle x4; "
            "2 of 10 groups x 3 of 20 blocks, 32 of 64 features.",
        ),
        e(
            "SPAN",
            _seeded(lambda: SPAN(num_in_ch=3, num_out_ch=3, feature_channels=48, upscale=4)),
            _image(64),
            "Standard SPAN (48 features, x4): parameter-free attention, concat before the "
            "pixel-shuffle-direct upsampler.",
        ),
        e(
            "PLKSR",
            _seeded(lambda: PLKSR(dim=32, n_blocks=4, upscaling_factor=4, kernel_size=17)),
            _image(64),
            "Partial large-kernel (17x17) convs, pixel shuffle x4; 4 of 28 blocks, dim 32 of 64.",
        ),
        e(
            "RealPLKSR",
            _seeded(lambda: RealPLKSR(dim=32, n_blocks=4, upscaling_factor=4, kernel_size=17)),
            _image(64),
            "PLKSR class RealPLKSR: GroupNorm + large-kernel blocks, pixel shuffle x4; "
            "4 of 28 blocks, dim 32 of 64.",
        ),
        e(
            "MoSR",
            _seeded(lambda: MoSR(upscale=4, n_block=4, dim=48, upsampler="ps")),
            _image(64),
            "Gated-CNN (MambaOut-style) blocks, pixel shuffle x4; 4 of 24 blocks, dim 48 of 64.",
        ),
        e(
            "MoESR",
            _seeded(lambda: MoESR(scale=4, dim=32, n_blocks=2, n_block=2, upsample_dim=32)),
            _image(64),
            "Gated-CNN blocks with inception depthwise convs, pixel-shuffle-direct x4; "
            "2x2 of 9x4 blocks, dim 32 of 64.",
        ),
        e(
            "SAFMN",
            _seeded(lambda: SAFMN(dim=36, n_blocks=8, upscaling_factor=4)),
            _image(64),
            "Standard SAFMN (dim 36, 8 blocks, x4): multi-scale feature modulation "
            "(adaptive max pool + nearest upsample), pixel shuffle. Size multiple of 8.",
        ),
        e(
            "SAFMNBCIE",
            _seeded(lambda: SAFMNBCIE(dim=36, n_blocks=2, num_layers=2, upscaling_factor=2)),
            _image(64),
            "SAFMN for BCIE (NTIRE'24 compressed-image x2); 2x2 of 6x6 blocks. "
            "Size multiple of 16.",
        ),
        e(
            "SeemoRe",
            _seeded(lambda: SeemoRe(scale=4, num_experts=3, num_layers=2, embedding_dim=32)),
            _image(64),
            "Mixture of rank/space experts with a router (top-1), pixel shuffle x4; "
            "2 of 6 layers, 3 of 6 experts, dim 32 of 64.",
        ),
        e(
            "DCTLSA",
            _seeded(lambda: DCTLSA(in_nc=3, nf=55, num_modules=6, out_nc=3, upscale=4)),
            _image(64),
            "Standard size (55 features, 6 modules, 5 heads; the fusion convs hard-code 6 "
            "modules): DCT-domain local self-attention, dense concats, pixel shuffle x4.",
        ),
        e(
            "OmniSR",
            _seeded(lambda: OmniSR(num_feat=64, block_num=1, window_size=8, res_num=2, up_scale=4)),
            _image(64),
            "Omni self-attention (spatial + channel, windows of 8), pixel shuffle x4; "
            "2 of 5 residual groups. Pads internally to a multiple of the window.",
        ),
        # ---------------------------------------------------------- U-Nets / enc-dec
        e(
            "DRUNet",
            _seeded(lambda: DRUNet(in_nc=4, out_nc=3, nc=[32, 64, 128, 256], nb=2)),
            _image(64, channels=4),
            "U-Net with strided-conv down / transposed-conv up and additive skips; input = RGB + "
            "noise-level map (4 channels); 2 of 4 res-blocks per level, half width. "
            "Size multiple of 8.",
        ),
        e(
            "FBCNN",
            _seeded(lambda: FBCNN(in_nc=3, out_nc=3, nc=[32, 64, 128, 512], nb=1)),
            _image(64),
            "JPEG artifact removal U-Net with a quality-factor predictor + QF-conditioned "
            "decoder; returns (image, qf); half width on the first 3 levels (the QF MLP "
            "hard-codes 512 at the last), 1 of 4 blocks. Size multiple of 8.",
        ),
        e(
            "NAFNet",
            _seeded(
                lambda: NAFNet(
                    img_channel=3,
                    width=16,
                    middle_blk_num=1,
                    enc_blk_nums=[1, 1, 1, 1],
                    dec_blk_nums=[1, 1, 1, 1],
                )
            ),
            _image(64),
            "4-level U-Net of NAF blocks (SimpleGate, simplified channel attention, LayerNorm2d); "
            "1 block per level instead of [2,2,4,8]/12/[2,2,2,2], width 16 of 32. "
            "Pads internally to a multiple of 16.",
        ),
        e(
            "KBNet_s",
            _seeded(
                lambda: KBNet_s(
                    img_channel=3,
                    width=16,
                    middle_blk_num=1,
                    enc_blk_nums=[1, 1, 1, 1],
                    dec_blk_nums=[1, 1, 1, 1],
                )
            ),
            _image(64),
            "KBNet (kernel basis attention) NAFNet-style U-Net; 1 block per level, width 16 "
            "of 64. Size multiple of 16.",
        ),
        e(
            "KBNet_l",
            _seeded(
                lambda: KBNet_l(
                    dim=24, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8]
                )
            ),
            _image(64),
            "KBNet Restormer-style U-Net (pixel (un)shuffle down/up, channel attention, "
            "kernel basis attention); 1 block per level, dim 24 of 48 (MFF needs a multiple "
            "of 24). Size multiple of 16.",
        ),
        e(
            "FFTformer",
            _seeded(
                lambda: FFTformer(
                    dim=16, num_blocks=[1, 1, 2], num_refinement_blocks=1, ffn_expansion_factor=3
                )
            ),
            _image(64),
            "Deblurring U-Net with FFT-domain attention/FFN; blocks [1,1,2]+1 of [6,6,12]+4, "
            "dim 16 of 48. Size multiple of 32.",
        ),
        e(
            "SCUNet",
            _seeded(lambda: SCUNet(in_nc=3, config=[1, 1, 1, 1, 1, 1, 1], dim=64)),
            _image(64),
            "Swin-Conv U-Net (parallel Swin + residual-conv branches); 1 of 4 blocks per stage, "
            "standard dim 64 (half of it goes to 32-dim heads). Pads internally to a multiple "
            "of 64; minimum size 40.",
        ),
        e(
            "Uformer",
            _seeded(
                lambda: Uformer(
                    img_size=128,
                    in_chans=3,
                    dd_in=3,
                    embed_dim=16,
                    depths=[1] * 9,
                    num_heads=[1, 2, 4, 8, 16, 16, 8, 4, 2],
                    win_size=8,
                )
            ),
            _image(128),
            "LeWin-transformer U-Net; 1 of 2 blocks per stage, dim 16 of 32. Needs a square "
            "input whose side is a multiple of 128, hence 128x128.",
        ),
        e(
            "RetinexFormer",
            _seeded(lambda: RetinexFormer(n_feat=40, stage=1, num_blocks=[1, 2, 2])),
            _image(64),
            "Low-light enhancement: illumination estimator + illumination-guided transformer "
            "U-Net (standard n_feat 40, blocks [1,2,2], 1 stage). Size multiple of 8.",
        ),
        e(
            "HVICIDNet",
            _seeded(lambda: HVICIDNet(channels=[36, 36, 72, 144], heads=[1, 2, 4, 8])),
            _image(64),
            "Standard CIDNet (HVI colour space, dual-branch U-Net with cross attention). "
            "Size multiple of 8.",
        ),
        e(
            "MixDehazeNet",
            _seeded(
                lambda: MixDehazeNet(
                    in_chans=3,
                    out_chans=4,
                    embed_dims=[24, 48, 96, 48, 24],
                    depths=[1, 1, 2, 1, 1],
                )
            ),
            _image(64),
            "Standard MixDehazeNet-T (mixed-structure blocks, SK fusion, 4-channel K/B head). "
            "Minimum size 40.",
        ),
        e(
            "LaMa",
            _seeded(lambda: LaMa(in_nc=4, out_nc=3)),
            _image_and_mask(64),
            "Inpainting: forward(image, mask); FFC (fast Fourier conv) ResNet generator, "
            "standard size (spandrel exposes no size knobs; 51M params). "
            "Size multiple of 8, minimum 16.",
        ),
        # ----------------------------------------------------------- transformers
        e(
            "SwinIR",
            _seeded(
                lambda: SwinIR(
                    img_size=64,
                    embed_dim=60,
                    depths=[2, 2],
                    num_heads=[6, 6],
                    window_size=8,
                    mlp_ratio=2.0,
                    upscale=2,
                    upsampler="pixelshuffle",
                )
            ),
            _image(64),
            "SwinIR classical-style head (conv + pixel shuffle x2); 2 RSTBs x 2 layers, "
            "dim 60, window 8. Pads internally to a multiple of the window.",
        ),
        e(
            "Swin2SR",
            _seeded(
                lambda: Swin2SR(
                    img_size=64,
                    embed_dim=60,
                    depths=[2, 2],
                    num_heads=[6, 6],
                    window_size=8,
                    mlp_ratio=2.0,
                    upscale=2,
                    upsampler="pixelshuffle",
                )
            ),
            _image(64),
            "SwinV2 (cosine attention, log-spaced CPB) SwinIR; 2 RSTBs x 2 layers, dim 60, "
            "pixel shuffle x2.",
        ),
        e(
            "HAT",
            _seeded(
                lambda: HAT(
                    img_size=64,
                    embed_dim=60,
                    depths=(2, 2),
                    num_heads=(6, 6),
                    window_size=8,
                    mlp_ratio=2.0,
                    upscale=2,
                    upsampler="pixelshuffle",
                )
            ),
            _image(64),
            "Hybrid attention (window attn + channel-attention conv block + overlapping cross "
            "attention), pixel shuffle x2; 2 of 6 groups x 2 of 6 blocks, dim 60 of 180, "
            "window 8 of 16 (overlapping window 12). Pads internally to a multiple of 8.",
        ),
        e(
            "DAT",
            _seeded(
                lambda: DAT(
                    img_size=64,
                    embed_dim=60,
                    split_size=[8, 16],
                    depth=[2, 2],
                    num_heads=[2, 2],
                    expansion_factor=2.0,
                    upscale=2,
                    upsampler="pixelshuffle",
                )
            ),
            _image(64),
            "Dual aggregation transformer (alternating spatial/channel attention), "
            "pixel shuffle x2; 2 groups x 2 blocks, dim 60 of 180.",
        ),
        e(
            "RGT",
            _seeded(
                lambda: RGT(
                    img_size=64,
                    embed_dim=60,
                    depth=[2, 2],
                    num_heads=[2, 2],
                    mlp_ratio=2.0,
                    upscale=2,
                    split_size=[8, 32],
                    c_ratio=0.5,
                )
            ),
            _image(64),
            "Recursive-generalization transformer, pixel shuffle x2; 2 groups x 2 blocks, "
            "dim 60 of 180.",
        ),
        e(
            "DRCT",
            _seeded(
                lambda: DRCT(
                    img_size=64,
                    embed_dim=60,
                    depths=(2, 2),
                    num_heads=(6, 6),
                    window_size=8,
                    upscale=2,
                    upsampler="pixelshuffle",
                    gc=16,
                )
            ),
            _image(64),
            "Dense-residual connected transformer (Swin layers with dense concats), "
            "pixel shuffle x2; 2 of 6 groups, dim 60 of 180, gc 16 of 32, window 8 of 16. "
            "Pads internally to a multiple of the window.",
        ),
        e(
            "ATD",
            _seeded(
                lambda: ATD(
                    img_size=64,
                    embed_dim=48,
                    depths=(2, 2),
                    num_heads=(4, 4),
                    window_size=8,
                    category_size=128,
                    num_tokens=32,
                    reducted_dim=8,
                    convffn_kernel_size=7,
                    mlp_ratio=1.0,
                    upscale=4,
                    upsampler="pixelshuffledirect",
                )
            ),
            _image(64),
            "Adaptive token dictionary transformer, ATD-light style (dim 48, "
            "pixel-shuffle-direct x4); 2 of 4 groups x 2 blocks.",
        ),
        e(
            "CRAFT",
            _seeded(
                lambda: CRAFT(
                    window_size=16,
                    embed_dim=48,
                    depths=[2],
                    num_heads=[6],
                    split_size_0=4,
                    split_size_1=16,
                    upscale=4,
                )
            ),
            _image(64),
            "CRAFT (high-frequency conv branch + horizontal/vertical rectangular-window "
            "attention, alternating), standard dims and window 16, 1 of 4 groups (of 2 blocks), "
            "pixel-shuffle-direct x4. Size multiple of 16.",
        ),
        e(
            "GRL",
            _seeded(
                lambda: GRL(
                    img_size=64,
                    embed_dim=32,
                    upscale=2,
                    upsampler="pixelshuffle",
                    depths=[2, 2],
                    num_heads_window=[2, 2],
                    num_heads_stripe=[2, 2],
                    window_size=8,
                    stripe_size=[8, 8],
                    mlp_ratio=2.0,
                    anchor_window_down_factor=2,
                    local_connection=True,
                )
            ),
            _image(64),
            "Global/regional/local transformer (window + stripe + anchor attention, "
            "local conv branch), pixel shuffle x2; 2 stages x 2 blocks, dim 32.",
        ),
        e(
            "FDAT",
            _seeded(
                lambda: FDAT(
                    scale=4,
                    embed_dim=48,
                    num_groups=2,
                    depth_per_group=2,
                    num_heads=4,
                    window_size=8,
                    mid_dim=32,
                )
            ),
            _image(64),
            "Fast dual-aggregation transformer, transpose+conv x4 upsampler; 2x2 of 4x3 blocks, "
            "dim 48 of 120.",
        ),
        e(
            "DITN",
            _seeded(
                lambda: DITN(
                    dim=60, ITL_blocks=2, SAL_blocks=2, UFONE_blocks=1, patch_size=8, upscale=4
                )
            ),
            _image(64),
            "DITN_Real: unfolding transformer layers, pixel shuffle x4; 2 of 4 ITL/SAL blocks. "
            "Size multiple of patch_size (8).",
        ),
        e(
            "IPT",
            _seeded(
                lambda: IPT(
                    patch_size=48,
                    n_feats=32,
                    scale=[2],
                    num_heads=4,
                    num_layers=1,
                    rgb_range=255,
                )
            ),
            _image(48),
            "Image processing transformer (conv heads, ViT body over 3x3 patches, pixel-shuffle "
            "tail); 1 of 12 layers, 32 of 64 features. The raw module takes exactly "
            "patch_size x patch_size (48x48); spandrel's IPT.Model wrapper chops larger images.",
        ),
        # --------------------------------------------------------- GANs / faces / misc
        e(
            "RealCUGAN_2x",
            _seeded(lambda: UpCunet2x(in_channels=3, out_channels=3)),
            _image(64),
            "Real-CUGAN UpCunet2x (cascaded U-Nets, SE blocks, crops); full size. Data-dependent "
            "padding in forward: not traceable by torch.fx. Minimum size 32.",
        ),
        e(
            "RealCUGAN_3x",
            _seeded(lambda: UpCunet3x(in_channels=3, out_channels=3)),
            _image(64),
            "Real-CUGAN UpCunet3x, full size. Minimum size 32.",
        ),
        e(
            "RealCUGAN_4x",
            _seeded(lambda: UpCunet4x(in_channels=3, out_channels=3)),
            _image(64),
            "Real-CUGAN UpCunet4x, full size. Minimum size 32.",
        ),
        e(
            "RealCUGAN_2x_fast",
            _seeded(lambda: UpCunet2x_fast(in_channels=3, out_channels=3)),
            _image(64),
            "Real-CUGAN UpCunet2x_fast (pixel-unshuffled input), full size. "
            "Size multiple of 4, minimum 40.",
        ),
        e(
            "MMRealSR",
            _seeded(
                lambda: MMRealSR(
                    num_in_ch=3,
                    num_out_ch=3,
                    scale=4,
                    num_feat=32,
                    num_block=2,
                    num_grow_ch=16,
                    num_feats=[16, 32, 64, 128],
                    num_blocks=[1, 1, 1, 1],
                )
            ),
            _image(64),
            "RRDBNet modulated by a degradation-estimation ResNet; returns (image, degrees); "
            "2 of 23 blocks, 32 of 64 features.",
        ),
        e(
            "GFPGAN",
            _seeded(
                lambda: GFPGAN(
                    out_size=64, num_style_feat=128, channel_multiplier=1, num_mlp=2, narrow=0.25
                )
            ),
            _image(64),
            "GFPGANv1Clean: U-Net encoder + StyleGAN2 decoder with SFT; returns (image, rgbs). "
            "Input side must equal out_size (64 here instead of 512); narrow 0.25.",
        ),
        e(
            "RestoreFormer",
            _seeded(
                lambda: RestoreFormer(
                    n_embed=256,
                    embed_dim=64,
                    ch=32,
                    ch_mult=(1, 2, 2, 4),
                    num_res_blocks=1,
                    attn_resolutions=(8,),
                    resolution=64,
                    z_channels=64,
                    head_size=4,
                )
            ),
            _image(64),
            "VQ autoencoder with multi-head cross attention to a codebook; returns (image, "
            "vq loss). 4 of 6 levels, ch 32 of 64, resolution 64 of 512. Size multiple of 32.",
        ),
        e(
            "AuraSR",
            _seeded(
                lambda: AuraSR(
                    dim=8,
                    image_size=None,
                    input_image_size=None,
                    style_network={"dim_in": 32, "dim_out": 128, "depth": 2},
                    up_dim_mults=(1, 2, 4, 8, 16),
                    down_dim_mults=(4, 8, 16),
                    full_attn=(False, False, False, True, True),
                    self_attn_dim_head=16,
                    self_attn_heads=2,
                    attn_depths=(1, 1, 1, 1, 1),
                    mid_attn_depth=1,
                    num_conv_kernels=2,
                    skip_connect_scale=0.4,
                )
            ),
            _image(64),
            "GigaGAN upsampler (style network + adaptive-kernel convs + attention), x4 = "
            "style dim_out / dim_in; dim 8 of 64, 1 attention layer per level. Draws random "
            "noise in forward (output not deterministic). Size multiple of 8.",
        ),
    ]


ZOO: dict[str, ZooEntry] = {}
# Architecture name -> why it is not in ZOO. Empty with spandrel 0.4.2 installed: every
# architecture builds and runs here (torchvision only through the import stub above).
SKIPPED: dict[str, str] = {}

if SPANDREL_IMPORT_ERROR is None:
    ZOO = {entry.name: entry for entry in _entries()}
else:
    SKIPPED = {"*": f"spandrel could not be imported: {SPANDREL_IMPORT_ERROR}"}

# A diverse subset for CI (``pytest -m "not zoo"``): a plain CNN with dense concats and a
# nearest+conv upsampler, a pixel-shuffle CNN, a U-Net, NAFNet, a Swin transformer, FFC
# inpainting with two inputs, SPAN (pixel-shuffle-direct), and a model whose root forward
# torch.fx cannot trace (Real-CUGAN: data-dependent padding and crops).
ZOO_FAST: tuple[str, ...] = (
    "ESRGAN",
    "Compact",
    "DRUNet",
    "NAFNet",
    "SwinIR",
    "LaMa",
    "SPAN",
    "RealCUGAN_2x",
)
