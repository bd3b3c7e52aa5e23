"""HistoryNet's networks (the paper's G0 VGG-16, G2 classification, G3 parsing, G1 colour decoder, D1
critic and D2 info-classifier), a PyTorch port of the official Keras code (BestiVictory/HistoryNet,
SOURCE_HistoryNet/HistoryNet.py, itself built on ChromaGAN: pvitoria/ChromaGAN).

    generator = HistoryNetGenerator(num_classes=42, parsing=True)     # G0 + G2 + Mid + G3 + G1
    out = generator(l)        # l: (B, 1, S, S), L/255; out.ab (B, 2, S, S) in [0, 1], out.class_logits,
                              # out.z (B, 256), out.parsing (B, 1, S, S) or None
    critic = PatchDiscriminator()          # D1: critic(l, ab) -> (B, 1, S/8, S/8), WGAN scores
    info = InfoClassifier()                # D2: info(ab) -> (B, 256), recovers z from the colours
    nets = build_networks("historynet")    # the three at once, for one of the ablations in VARIANTS

S is 224 as in the paper; any multiple of 32 works (the fully connected layers are sized from it), which
lets the tests run small. `width` scales every layer's channels and units (1.0, the paper's, by
default): a network of width 0.25 has about 1/16 of the weights and trains about that much faster on a
CPU, for quick experiments and the tests; only width 1 takes ImageNet VGG-16 weights. Layers follow the official code exactly: kernel sizes, TensorFlow's 'same'
padding, ReLU before BatchNorm, Keras' BatchNorm constants, Glorot-uniform initialisation, linear
(activation-free) Dense stacks. Softmax is left to the losses, which take logits.

The ablations (paper Table 3) are the official code's four branches (see VARIANTS). Its own name for
D2 is "classifier" (`classcifi`); the 42-way class head of G2 and the z fusion are in every branch,
including the ChromaGAN baseline, whose class head there is ChromaGAN's 1000-way one taught by a frozen
ImageNet VGG-16. Here the baseline keeps the 42 MHMD labels instead: the design has no VGG teacher.
Every variant here shares SOURCE_HistoryNet's decoder, so that dropping G3 removes exactly G3 and its
skip inputs; the official branches also differ by a few 3x3 convolutions: SOURCE_Classifier has one
64->64 less in G1, SOURCE_Parsing one 64->64 less in G1 and a 64->64 and a 32->32 less in G3, and
ChromaGAN's decoder a 128->128, a 64->64 and a 32->32 less.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

Z_SIZE = 256
CLASS_HIDDEN = 420  # official: Dense(4096) -> Dense(420) -> Dense(42, softmax)
VGG_G0_LAYERS = 23  # torchvision vgg16().features[:23]: conv1_1 .. conv4_3 and its ReLU
VGG_G0_CHANNELS = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512)
KERAS_BATCHNORM = {"eps": 1e-3, "momentum": 0.01}  # Keras: epsilon=1e-3, momentum=0.99 (its decay)
KERAS_LEAKY_SLOPE = 0.3  # keras.layers.LeakyReLU() default alpha


@dataclass
class GeneratorOutput:
    ab: torch.Tensor  # (B, 2, S, S), sigmoid
    class_logits: torch.Tensor  # (B, num_classes), before softmax
    z: torch.Tensor  # (B, 256), the global code broadcast into the colour decoder; D2 must recover it
    parsing: torch.Tensor | None  # (B, 1, S, S), sigmoid; None without the parsing branch


# -- layers -------------------------------------------------------------------------------------
def conv(cin: int, cout: int, kernel: int = 3) -> nn.Conv2d:
    """Stride 1, TensorFlow 'same' padding (odd kernels only: even ones pad unevenly)."""
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2)


def conv_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, kernel), nn.ReLU(inplace=True))


def conv_relu_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Conv2D(activation='relu') then BatchNormalization, the official order. A stride-2 3x3 'same'
    convolution on an even size pads one row/column at the end only, as TensorFlow does."""
    if stride == 1:
        layers = [conv(cin, cout)]
    else:
        layers = [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(cin, cout, 3, stride=2)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True), nn.BatchNorm2d(cout, **KERAS_BATCHNORM))


def conv4x4(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Conv2D(4x4, padding='same'): TensorFlow pads 1 + 1 at stride 2 (even sizes) and 1 + 2 at stride 1."""
    if stride == 2:
        return nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1))
    return nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(cin, cout, 4))


def upsample() -> nn.Upsample:
    return nn.Upsample(scale_factor=2, mode="nearest")  # Keras UpSampling2D


def dense_stack(sizes: list[int]) -> nn.Sequential:
    """Flatten then Dense layers with no activation between them, as in the official code."""
    return nn.Sequential(nn.Flatten(), *(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])))


def init_keras(module: nn.Module) -> None:
    """Keras' default initialisation: Glorot-uniform kernels, zero biases (BatchNorm keeps 1 and 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def check_image_size(image_size: int) -> int:
    if image_size % 32:
        raise InputError(f"image size {image_size} is not a multiple of 32 (the paper's is 224)")
    return image_size


def check_width(width: float) -> float:
    if not 0 < width <= 1:
        raise InputError(f"network width {width} is not in (0, 1] (the paper's is 1)")
    return width


def scaled(channels: int, width: float) -> int:
    """A layer's channels or units at `width` (at least 1)."""
    return max(1, round(channels * width))


# -- G0: VGG-16 up to conv4_3 -------------------------------------------------------------------
def vgg16_backbone(width: float = 1.0) -> nn.Sequential:
    """G0 with torchvision's vgg16().features[:23] layout (same indices, so its state dict loads as is
    at width 1). Random weights use torchvision's VGG initialisation."""
    layers: list[nn.Module] = []
    cin = 3
    for item in VGG_G0_CHANNELS:
        if item == "pool":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            cout = scaled(item, width)
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
            cin = cout
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def load_vgg16_backbone(g0: nn.Sequential, path: str | Path | None = None) -> None:
    """Load ImageNet VGG-16 weights into G0: from `path`, a torchvision vgg16 state dict (.pth, e.g. a
    copy of vgg16-397923af.pth), or when None from torchvision's own IMAGENET1K_V1 download (into the
    weights cache; torchvision checks the hash prefix in the file name). Raises OSError when offline,
    RuntimeError when the download has another hash."""
    if path is None:
        from torchvision.models import VGG16_Weights

        from ..weights import weights_cache

        state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(model_dir=str(weights_cache()), progress=True,
                                                           check_hash=True)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # keys "features.<i>.weight"; the classifier and conv5 (i >= 23) are not part of G0
    features = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
    g0.load_state_dict({k: v for k, v in features.items() if int(k.split(".")[0]) < VGG_G0_LAYERS})


# -- G2, Mid, G3, G1 ----------------------------------------------------------------------------
class ClassificationBranch(nn.Module):
    """G2: 512x(S/8)^2 -> 512x(S/32)^2 global features -> z (256) and the class logits."""

    def __init__(self, image_size: int, num_classes: int, width: float = 1.0):
        super().__init__()
        c = scaled(512, width)
        self.trunk = nn.Sequential(conv_relu_bn(c, c, stride=2), conv_relu_bn(c, c),
                                   conv_relu_bn(c, c, stride=2), conv_relu_bn(c, c))
        flat = c * (image_size // 32) ** 2
        self.to_z = dense_stack([flat, scaled(1024, width), c, scaled(Z_SIZE, width)])
        self.to_class = dense_stack([flat, scaled(4096, width), scaled(CLASS_HIDDEN, width), num_classes])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return self.to_z(features), self.to_class(features)


class ParsingBranch(nn.Module):
    """G3 (official 'segment_features'): features at S/8 (128 ch), S/4 (64), S/2 (32) that G1
    concatenates, and the parsing map (sigmoid at S/2, nearest-upsampled to S)."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        c512, c256, c128, c64, c32 = (scaled(n, width) for n in (512, 256, 128, 64, 32))
        self.at_8 = nn.Sequential(conv_relu_bn(c512, c512), conv_relu_bn(c512, c512),
                                  conv_relu(c512, c256), conv_relu(c256, c128))
        self.at_4 = nn.Sequential(conv_relu(c128, c128), upsample(), conv_relu(c128, c64))
        self.at_2 = nn.Sequential(conv_relu(c64, c64), conv_relu(c64, c64), upsample(), conv_relu(c64, c32))
        self.head = nn.Sequential(conv_relu(c32, c32), conv(c32, 1), nn.Sigmoid(), upsample())

    def forward(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        f8 = self.at_8(x)
        f4 = self.at_4(f8)
        f2 = self.at_2(f4)
        return (f8, f4, f2), self.head(f2)


class ColourDecoder(nn.Module):
    """G1: the fused 512x(S/8)^2 features -> ab. With the parsing branch, its features at each scale are
    concatenated after the first convolution there (official 'Fusion + Colorization')."""

    def __init__(self, skip: bool = False, width: float = 1.0):
        super().__init__()
        c256, c128, c64, c32 = (scaled(n, width) for n in (256, 128, 64, 32))
        # the fused input: Mid's 256 channels and z's 256, each at `width`
        fused = c256 + scaled(Z_SIZE, width)
        # the parsing branch's features at S/8, S/4, S/2 have as many channels as the decoder there
        s8, s4, s2 = (c128, c64, c32) if skip else (0, 0, 0)
        self.in_8 = nn.Sequential(conv_relu(fused, c256, kernel=1), conv_relu(c256, c128))
        self.out_8 = conv_relu(c128 + s8, c128)
        self.in_4 = nn.Sequential(upsample(), conv_relu(c128, c64))
        # official SOURCE_Classifier (no parsing) has one 64->64 convolution less here; we keep the
        # decoder fixed so that dropping the branch removes exactly the branch and its skip inputs
        self.out_4 = nn.Sequential(conv_relu(c64 + s4, c64), conv_relu(c64, c64))
        self.in_2 = nn.Sequential(upsample(), conv_relu(c64, c32))
        self.out_2 = nn.Sequential(conv_relu(c32 + s2, c32), conv(c32, 2), nn.Sigmoid(), upsample())

    def forward(self, fused: torch.Tensor, skips: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        s8, s4, s2 = skips if skips is not None else (None, None, None)
        x = self.out_8(join(self.in_8(fused), s8))
        x = self.out_4(join(self.in_4(x), s4))
        return self.out_2(join(self.in_2(x), s2))


def join(x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    return x if skip is None else torch.cat([x, skip], dim=1)


class HistoryNetGenerator(nn.Module):
    """G0 + G2 + Mid + G3 + G1, as in the official code. Input L/255 as (B, 1, S, S); G0 sees it copied
    to 3 channels (official: np.tile, no ImageNet normalisation)."""

    def __init__(self, num_classes: int = 42, parsing: bool = True, image_size: int = 224, width: float = 1.0):
        super().__init__()
        check_image_size(image_size)
        c512 = scaled(512, check_width(width))
        self.g0 = vgg16_backbone(width)
        self.g2 = ClassificationBranch(image_size, num_classes, width)
        self.mid = nn.Sequential(conv_relu_bn(c512, c512), conv_relu_bn(c512, scaled(256, width)))
        self.g3 = ParsingBranch(width) if parsing else None
        self.g1 = ColourDecoder(skip=parsing, width=width)
        for part in (self.g2, self.mid, self.g3, self.g1):
            if part is not None:
                init_keras(part)

    def forward(self, l: torch.Tensor) -> GeneratorOutput:
        x = self.g0(l.expand(-1, 3, -1, -1))
        z, class_logits = self.g2(x)
        # official RepeatVector + Reshape: the same z at every position of the S/8 grid
        z_map = z[:, :, None, None].expand(-1, -1, x.shape[-2], x.shape[-1])
        fused = torch.cat([self.mid(x), z_map], dim=1)
        skips, parsing = self.g3(x) if self.g3 is not None else (None, None)
        return GeneratorOutput(self.g1(fused, skips), class_logits, z, parsing)


# -- D1, D2 -------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """D1, the WGAN critic on concat(L, ab): a (B, 1, S/8, S/8) map of unbounded scores."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        c64, c128, c256, c512 = (scaled(n, check_width(width)) for n in (64, 128, 256, 512))
        self.net = nn.Sequential(
            conv4x4(3, c64, 2), nn.LeakyReLU(KERAS_LEAKY_SLOPE),
            conv4x4(c64, c128, 2), nn.LeakyReLU(KERAS_LEAKY_SLOPE),
            conv4x4(c128, c256, 2), nn.LeakyReLU(KERAS_LEAKY_SLOPE),
            conv4x4(c256, c512, 1), nn.LeakyReLU(KERAS_LEAKY_SLOPE),
            conv4x4(c512, 1, 1))
        init_keras(self)

    def forward(self, l: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([l, ab], dim=1))


class InfoClassifier(nn.Module):
    """D2, the InfoGAN-style classifier (official `classcifi`): ab -> a 256-vector that should equal G2's z."""

    def __init__(self, image_size: int = 224, width: float = 1.0):
        super().__init__()
        check_image_size(image_size)
        c64, c128, c256, c512 = (scaled(n, check_width(width)) for n in (64, 128, 256, 512))
        layers: list[nn.Module] = [conv4x4(2, c64, 2), nn.LeakyReLU(KERAS_LEAKY_SLOPE)]
        for cin, cout in ((c64, c128), (c128, c256), (c256, c512), (c512, c512)):
            layers += [conv4x4(cin, cout, 2), nn.LeakyReLU(KERAS_LEAKY_SLOPE),
                       nn.BatchNorm2d(cout, **KERAS_BATCHNORM)]
        self.features = nn.Sequential(*layers)
        self.head = dense_stack([c512 * (image_size // 32) ** 2, scaled(1024, width), scaled(Z_SIZE, width)])
        init_keras(self)

    def forward(self, ab: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ab))


# -- the variants of the paper's Table 3 --------------------------------------------------------
VARIANTS = {
    "historynet": {"parsing": True, "classifier": True},  # SOURCE_HistoryNet
    "no_parsing": {"parsing": False, "classifier": True},  # SOURCE_Classifier
    "no_classifier": {"parsing": True, "classifier": False},  # SOURCE_Parsing (no D2)
    "chromagan": {"parsing": False, "classifier": False},  # Baseline, with the 42 labels (module docstring)
}


@dataclass
class Networks:
    generator: HistoryNetGenerator
    critic: PatchDiscriminator
    info_classifier: InfoClassifier | None  # None without D2: the loss then has no info term
    # G's exponential moving average (train's --ema), what evaluation and colorization use when there is one
    generator_ema: HistoryNetGenerator | None = None


def build_networks(variant: str = "historynet", num_classes: int = 42, image_size: int = 224,
                   width: float = 1.0) -> Networks:
    if variant not in VARIANTS:
        raise InputError(f"unknown HistoryNet variant {variant!r} (available: {', '.join(VARIANTS)})")
    flags = VARIANTS[variant]
    return Networks(HistoryNetGenerator(num_classes, flags["parsing"], image_size, width), PatchDiscriminator(width),
                    InfoClassifier(image_size, width) if flags["classifier"] else None)
