"""HistoryNet's networks: shapes and parameter counts against the official Keras code's layer list,
written out below layer by layer (counted from that list, not from the modules), G0 = torchvision's
VGG-16 up to conv4_3, TensorFlow 'same' padding, the ablations, channels_last + autocast, and a small
model that overfits one batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mhmd_builder.historynet.losses import LossWeights, critic_loss, generator_loss, info_classifier_loss
from mhmd_builder.historynet.model import (HistoryNetGenerator, InfoClassifier, build_networks, conv4x4,
                                           conv_relu_bn, load_vgg16_backbone, vgg16_backbone)


# -- parameter counts from the official code's layer list -------------------------------------------
def conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout


def bn(c: int) -> int:
    return 2 * c  # gamma and beta; the running statistics are buffers


def linear(i: int, o: int) -> int:
    return i * o + o


def flat(size: int) -> int:
    return 512 * (size // 32) ** 2  # 512x7x7 = 25088 at 224


G0 = (conv(3, 3, 64) + conv(3, 64, 64) + conv(3, 64, 128) + conv(3, 128, 128) + conv(3, 128, 256)
      + 2 * conv(3, 256, 256) + conv(3, 256, 512) + 2 * conv(3, 512, 512))
MID = conv(3, 512, 512) + bn(512) + conv(3, 512, 256) + bn(256)
G3 = (2 * (conv(3, 512, 512) + bn(512)) + conv(3, 512, 256) + conv(3, 256, 128)  # at 28
      + conv(3, 128, 128) + conv(3, 128, 64)  # up to 56
      + 2 * conv(3, 64, 64) + conv(3, 64, 32)  # up to 112
      + conv(3, 32, 32) + conv(3, 32, 1))  # parsing head
D1 = conv(4, 3, 64) + conv(4, 64, 128) + conv(4, 128, 256) + conv(4, 256, 512) + conv(4, 512, 1)


def g2(size: int, classes: int = 42) -> int:
    trunk = 4 * (conv(3, 512, 512) + bn(512))
    z = linear(flat(size), 1024) + linear(1024, 512) + linear(512, 256)
    head = linear(flat(size), 4096) + linear(4096, 420) + linear(420, classes)
    return trunk + z + head


def g1(skips: tuple[int, int, int]) -> int:
    s28, s56, s112 = skips
    return (conv(1, 512, 256) + conv(3, 256, 128) + conv(3, 128 + s28, 128)
            + conv(3, 128, 64) + conv(3, 64 + s56, 64) + conv(3, 64, 64)
            + conv(3, 64, 32) + conv(3, 32 + s112, 32) + conv(3, 32, 2))


def d2(size: int) -> int:
    return (conv(4, 2, 64) + conv(4, 64, 128) + bn(128) + conv(4, 128, 256) + bn(256)
            + conv(4, 256, 512) + bn(512) + conv(4, 512, 512) + bn(512) + linear(flat(size), 1024) + linear(1024, 256))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- full size (224) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    return build_networks("historynet")


def test_parameter_counts_match_the_layer_list(full):
    gen = full.generator
    assert count(gen.g0) == G0 == 7_635_264
    assert count(gen.g2) == g2(224)
    assert count(gen.mid) == MID
    assert count(gen.g3) == G3
    assert count(gen.g1) == g1((128, 64, 32))
    assert count(gen) == G0 + g2(224) + MID + G3 + g1((128, 64, 32))
    assert count(full.critic) == D1
    assert count(full.info_classifier) == d2(224)


def test_every_output_has_the_official_shape(full):
    gen = full.generator.eval()
    l = torch.rand(1, 1, 224, 224)
    with torch.no_grad():
        x = gen.g0(l.expand(-1, 3, -1, -1))
        (f28, f56, f112), _ = gen.g3(x)
        global_features = gen.g2.trunk(x)
        out = gen(l)
        patches = full.critic(l, out.ab)
        z_back = full.info_classifier.eval()(out.ab)
    assert x.shape == (1, 512, 28, 28)
    assert global_features.shape == (1, 512, 7, 7)
    assert (f28.shape, f56.shape, f112.shape) == ((1, 128, 28, 28), (1, 64, 56, 56), (1, 32, 112, 112))
    assert out.z.shape == (1, 256) and out.class_logits.shape == (1, 42)
    assert out.parsing.shape == (1, 1, 224, 224) and out.ab.shape == (1, 2, 224, 224)
    for sigmoid_map in (out.ab, out.parsing):
        assert 0 < sigmoid_map.min() and sigmoid_map.max() < 1
        # nearest-upsampled from 112: every 2x2 block is one value
        assert torch.equal(sigmoid_map[..., ::2, ::2], sigmoid_map[..., 1::2, 1::2])
    assert patches.shape == (1, 1, 28, 28)
    assert z_back.shape == (1, 256)


# -- G0 and its weights --------------------------------------------------------------------------
def test_g0_is_torchvision_vgg16_up_to_conv4_3_and_loads_its_weights(tmp_path):
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    g0 = vgg16_backbone()
    assert count(g0) == count(vgg.features[:23]) == G0
    # torchvision's file holds the whole network: conv5 and the classifier are left out of G0
    state = {k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}
    state["classifier.6.bias"] = vgg.classifier[6].bias.detach()
    torch.save(state, tmp_path / "vgg16.pth")
    load_vgg16_backbone(g0, tmp_path / "vgg16.pth")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(g0(x), vgg.features[:23](x))


def test_without_a_path_g0_takes_torchvisions_imagenet_weights(monkeypatch):
    vgg_features = torchvision.models.vgg16(weights=None).features
    asked = {}

    def fake_download(weights, **kwargs):
        asked.update(weights=weights, **kwargs)
        return {f"features.{k}": v for k, v in vgg_features.state_dict().items()}

    monkeypatch.setattr(torchvision.models.VGG16_Weights, "get_state_dict", fake_download)
    g0 = vgg16_backbone()
    load_vgg16_backbone(g0)
    assert asked["weights"] is torchvision.models.VGG16_Weights.IMAGENET1K_V1 and asked["check_hash"]
    assert torch.equal(g0[21].weight, vgg_features[21].weight)  # conv4_3


# -- padding as TensorFlow's 'same' --------------------------------------------------------------
def top_left_tap(pad_and_conv: nn.Sequential, size: int) -> torch.Tensor:
    """What a padding + convolution whose kernel keeps only its top-left tap makes of 1, 2, 3, ... laid out."""
    pad, layer = pad_and_conv
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0, 0, 0] = 1
        layer.bias.zero_()
        return layer(pad(torch.arange(1.0, size * size + 1).view(1, 1, size, size)))[0, 0]


def test_stride_2_three_by_three_pads_only_the_end_as_tensorflow():
    grid = torch.arange(1.0, 65).view(8, 8)
    # TensorFlow 'same', stride 2, 8 -> 4: windows start at rows/columns 0, 2, 4, 6 (no padding before)
    assert torch.equal(top_left_tap(conv_relu_bn(1, 1, stride=2)[:2], 8), grid[::2, ::2])


def test_stride_1_four_by_four_pads_one_before_and_two_after_as_tensorflow():
    grid = torch.arange(1.0, 65).view(8, 8)
    out = top_left_tap(conv4x4(1, 1, stride=1), 8)
    assert out.shape == (8, 8)
    assert torch.equal(out[1:, 1:], grid[:-1, :-1]) and out[0].abs().sum() == 0


# -- ablations -----------------------------------------------------------------------------------
def test_ablations_remove_exactly_their_branches():
    torch.manual_seed(0)
    nets = {name: build_networks(name, image_size=64) for name in ("historynet", "no_parsing", "chromagan")}
    full, no_parsing, chromagan = (nets[name] for name in ("historynet", "no_parsing", "chromagan"))
    assert count(full.generator) - count(no_parsing.generator) == G3 + g1((128, 64, 32)) - g1((0, 0, 0))
    assert no_parsing.generator.g3 is None and count(no_parsing.info_classifier) == d2(64)
    assert chromagan.info_classifier is None and count(chromagan.generator) == count(no_parsing.generator)
    assert build_networks("no_classifier", image_size=64).info_classifier is None
    no_parsing.generator.eval()
    with torch.no_grad():
        out = no_parsing.generator(torch.rand(1, 1, 64, 64))
    assert out.parsing is None and out.ab.shape == (1, 2, 64, 64) and out.z.shape == (1, 256)


def test_width_scales_every_hidden_layer_and_nothing_else():
    wide, narrow = build_networks(num_classes=5, image_size=32), build_networks(num_classes=5, image_size=32, width=0.5)
    for name in ("generator", "critic", "info_classifier"):
        narrow_shapes = {key: value.shape for key, value in getattr(narrow, name).state_dict().items()}
        for key, value in getattr(wide, name).state_dict().items():
            # kernels (1, 3, 4), inputs (L, RGB, ab), outputs (1, 2) and the 5 classes are <= 5; every hidden
            # size is 32 or more
            assert narrow_shapes[key] == tuple(d if d <= 5 else d // 2 for d in value.shape), (name, key)
    quarter = build_networks(num_classes=5, image_size=32, width=0.25)
    assert 14 < count(wide.generator) / count(quarter.generator) < 18  # "~16x fewer weights" (--width help)
    assert narrow.generator(torch.rand(2, 1, 32, 32)).z.shape == (2, 128)


def test_sizes_that_are_not_multiples_of_32_and_unknown_variants_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        HistoryNetGenerator(image_size=100)
    with pytest.raises(ValueError, match="multiple of 32"):
        InfoClassifier(image_size=100)
    with pytest.raises(ValueError, match="unknown HistoryNet variant"):
        build_networks("pix2pix")
    for width in (0, 1.5):
        with pytest.raises(ValueError, match=rf"network width {width} is not in \(0, 1\]"):
            build_networks(width=width)


# -- training ------------------------------------------------------------------------------------
def small_batch(size: int = 32, batch: int = 2) -> dict[str, torch.Tensor]:
    """A fixed batch: smooth L and an ab that is a function of it (learnable by a convolutional net whose
    output is upsampled), one of the two samples labelled."""
    torch.manual_seed(1)
    l = F.interpolate(torch.rand(batch, 1, size // 8, size // 8), size=size, mode="bilinear")
    return {"l": l, "ab": torch.cat([0.5 + 0.6 * (l - 0.5), 0.5 - 0.6 * (l - 0.5)], dim=1),
            "labels": torch.tensor([3, -1]), "has_label": torch.tensor([True, False]),
            "parsing": (l > 0.5).float(), "has_parsing": torch.tensor([True, True])}


def test_channels_last_and_bfloat16_autocast_train_without_nan():
    torch.manual_seed(0)
    nets = build_networks(image_size=32)
    for net in (nets.generator, nets.critic, nets.info_classifier):
        net.to(memory_format=torch.channels_last)
    batch = small_batch()
    l, ab = (batch[k].to(memory_format=torch.channels_last) for k in ("l", "ab"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nets.generator(l)
        g_total, g_terms = generator_loss(out, l, ab, nets.critic, labels=batch["labels"],
                                          has_label=batch["has_label"], parsing=batch["parsing"],
                                          has_parsing=batch["has_parsing"], info_classifier=nets.info_classifier)
        d1_total, d1_terms = critic_loss(nets.critic, l, ab, out.ab)
        d2_total = info_classifier_loss(nets.info_classifier, out.ab, out.z)
    assert out.ab.dtype == torch.bfloat16 and g_total.dtype == d1_total.dtype == d2_total.dtype == torch.float32
    assert set(g_terms) == {"l2_ab", "class_kl", "parsing_l2", "wgan", "info_kl", "total"}
    (g_total + d1_total + d2_total).backward()
    assert all(torch.isfinite(v) for v in [*g_terms.values(), *d1_terms.values(), d2_total])
    for net in (nets.generator, nets.critic, nets.info_classifier):
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_a_small_model_overfits_one_batch():
    """The supervised terms only: the WGAN and info terms need D1 and D2 trained alongside (untrained,
    their gradients in ab outweigh the L2 term's at first)."""
    torch.manual_seed(0)
    nets = build_networks(image_size=32, width=0.25)
    optimiser = torch.optim.Adam(nets.generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    supervised = LossWeights(l2_ab=1.0, class_kl=0.003, parsing_l2=0.003, wgan=0.0, info_kl=0.0)
    batch = small_batch()
    l2 = []
    for _ in range(50):
        out = nets.generator(batch["l"])
        total, terms = generator_loss(out, batch["l"], batch["ab"], nets.critic, labels=batch["labels"],
                                      has_label=batch["has_label"], parsing=batch["parsing"],
                                      has_parsing=batch["has_parsing"], weights=supervised)
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        l2.append(terms["l2_ab"].item())
    assert min(l2[-5:]) < l2[0] / 10, l2
