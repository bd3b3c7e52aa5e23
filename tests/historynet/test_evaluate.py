"""`evaluate` against the official protocol rebuilt here independently, step by step as the official
scripts do it (cv2 + skimage + lpips), on small test shards and random-weight checkpoints."""
from __future__ import annotations

from collections import Counter
from urllib.error import URLError

import cv2
import lpips
import numpy as np
import pytest
import torch
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from test_colorize import IMAGE_SIZE, WIDTH, make_checkpoint
from test_data import NUM_CLASSES, PER_SHARD, decoded, gradient_frame, label_id, make_sample, write_shards

from mhmd_builder.historynet.checkpoint import load_generator, save_checkpoint
from mhmd_builder.historynet.data import ab_levels, lightness
from mhmd_builder.historynet.evaluate import PROTOCOLS, evaluate, format_evaluation, reconstructed
from mhmd_builder.historynet.metrics import colorfulness_rgb, lpips_model
from mhmd_builder.historynet.model import build_networks

SAMPLES = 3 * PER_SHARD


@pytest.fixture(autouse=True)
def one_torch_thread():
    """On a shared 2-core machine torch's second OpenMP thread waits for a busy core: LPIPS on these 12
    frames took 8 s with 2 threads and 0.7 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three test shards: (folder, samples in shard order)."""
    folder = tmp_path_factory.mktemp("shards")
    samples = [make_sample(i) for i in range(SAMPLES)]
    write_shards(folder, samples, split="test")
    return folder, samples


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "g.safetensors")


@pytest.fixture(scope="module")
def random_alexnet(tmp_path_factory):
    """A torchvision AlexNet state dict with random weights, as an offline LPIPS backbone."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("alexnet") / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def official_cast(ab: np.ndarray, cast=lambda x: x.astype(np.uint8)) -> np.ndarray:
    """The official deprocess() on one predicted ab (2xSxS float32, ab/255): SxSx2 uint8."""
    levels = ab.transpose(1, 2, 0) * 255
    levels[levels > 255] = 255
    levels[levels < 0] = 0
    return cast(levels)


def official_image(bgr: np.ndarray, ab8: np.ndarray, folder, quality: int | None = None,
                   interpolation: int | None = None, jpeg: bool = True) -> np.ndarray:
    """The official sample_images() for one frame and its 8-bit ab, then the image the metric scripts
    read back (RGB). The keyword arguments make the variants that the protocol must not be."""
    height, width = bgr.shape[:2]
    resize = {} if interpolation is None else {"interpolation": interpolation}
    ab_full = cv2.resize(ab8, (width, height), **resize)
    light = cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab)[None, ..., 0] / 255  # labimg_oritList, then deprocess:
    result = cv2.cvtColor(np.concatenate((official_cast(light), ab_full), axis=2), cv2.COLOR_Lab2BGR)
    if not jpeg:
        return result[..., ::-1]
    path = str(folder / "frame_reconstructed.jpg")
    cv2.imwrite(path, result, [] if quality is None else [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imread(path)[..., ::-1]


def rounded_image(bgr: np.ndarray, ab: np.ndarray, folder) -> np.ndarray:
    """The `rounded` protocol: the official steps with ab rounded and no JPEG."""
    return official_image(bgr, official_cast(ab, lambda x: np.rint(x).astype(np.uint8)), folder, jpeg=False)


def grey_levels() -> np.ndarray:
    return np.full((IMAGE_SIZE, IMAGE_SIZE, 2), 128, np.uint8)


def predictions(checkpoint, samples: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(frame BGR, predicted ab 2xSxS) per sample: L resized to the model's size, one batch of all."""
    generator, _ = load_generator(checkpoint)
    frames = [decoded(sample["jpg"]) for sample in samples]
    small = [cv2.resize(bgr, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA) for bgr in frames]
    lightness_small = np.stack([cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)[..., 0] for bgr in small])[:, None]
    with torch.no_grad():  # one batch of all the samples, as evaluate makes it with batch_size=SAMPLES
        ab = generator(torch.from_numpy(lightness_small.astype(np.float32) / 255)).ab.numpy()
    return list(zip(frames, ab))


def assert_scores(row: dict, original: np.ndarray, colorized: np.ndarray, net) -> None:
    """The metrics of one row are those of `colorized` against `original`, computed here."""
    assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(original, colorized, data_range=255))
    assert row["ssim"] == pytest.approx(structural_similarity(
        original, colorized, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
        channel_axis=-1))
    with torch.no_grad():
        expected_lpips = float(net(lpips.im2tensor(original), lpips.im2tensor(colorized)))
    assert row["lpips"] == pytest.approx(expected_lpips, rel=1e-5) and row["lpips"] > 0
    assert row["colorfulness"] == pytest.approx(colorfulness_rgb(colorized))
    assert row["colorfulness_original"] == pytest.approx(colorfulness_rgb(np.ascontiguousarray(original)))


def label_counts(samples: list[dict]) -> dict[str, int]:
    counts = Counter("unlabeled" if label_id(sample) is None else str(label_id(sample)) for sample in samples)
    return dict(counts)


def assert_means_of_rows(result: dict, grey: bool = False) -> None:
    """Overall and per-label means are the means of the per-image values (the model's, or grey's)."""
    block = result["grey"] if grey else result
    rows = [row["grey"] if grey else row for row in result["per_image"]]
    labels = [row["label"] for row in result["per_image"]]
    for name, value in block["mean"].items():
        assert value == pytest.approx(np.mean([row[name] for row in rows]))
    for label, entry in block["per_label"].items():
        mine = [row for row, its in zip(rows, labels) if str(its) == label or (label == "unlabeled" and its is None)]
        assert entry["images"] == len(mine)
        for name, value in entry["mean"].items():
            assert value == pytest.approx(np.mean([row[name] for row in mine]))


# -- the protocols, one image -----------------------------------------------------------------------
def pinned_frame_and_ab() -> tuple[np.ndarray, np.ndarray]:
    """A 90x130 frame (not the model's size) and a predicted ab whose every value lies 0.3-0.9 of a level
    above an integer (truncating and rounding differ everywhere), varies across the image (the resize's
    interpolation shows) and leaves 0..1 in one corner (the clip shows)."""
    rng = np.random.default_rng(7)
    levels = np.stack(np.meshgrid(np.linspace(60, 200, IMAGE_SIZE), np.linspace(90, 170, IMAGE_SIZE)))
    ab = (np.floor(levels) + rng.uniform(0.3, 0.9, levels.shape)) / 255
    ab[:, :3, :3] = [[[1.2]], [[-0.2]]]
    return gradient_frame(2, 90, 130), ab.astype(np.float32)


def test_the_official_protocol_is_the_official_scripts_image_by_image(tmp_path):
    bgr, ab = pinned_frame_and_ab()
    reference = official_image(bgr, official_cast(ab), tmp_path)
    made = reconstructed(lightness(bgr), ab_levels(ab, truncate=True), PROTOCOLS["official"])
    assert made.shape == bgr.shape and made.dtype == np.uint8
    np.testing.assert_array_equal(made, reference)
    # every step shows in this image: a one-line change of any of them gives another one
    variants = {
        "rounded ab": official_image(bgr, official_cast(ab, lambda x: np.rint(x).astype(np.uint8)), tmp_path),
        "unclipped ab": official_image(bgr, (ab.transpose(1, 2, 0) * 255).astype(np.uint8), tmp_path),
        "nearest resize": official_image(bgr, official_cast(ab), tmp_path, interpolation=cv2.INTER_NEAREST),
        "area resize": official_image(bgr, official_cast(ab), tmp_path, interpolation=cv2.INTER_AREA),
        "JPEG quality 90": official_image(bgr, official_cast(ab), tmp_path, quality=90),
        "JPEG quality 100": official_image(bgr, official_cast(ab), tmp_path, quality=100),
        "no JPEG": official_image(bgr, official_cast(ab), tmp_path, jpeg=False),
        "L at the model's size": official_image(
            cv2.resize(cv2.resize(bgr, (IMAGE_SIZE, IMAGE_SIZE)), bgr.shape[1::-1]), official_cast(ab), tmp_path),
        "RGB for BGR": reference[..., ::-1],
    }
    for name, variant in variants.items():
        assert not np.array_equal(variant, reference), name


def test_the_rounded_protocol_rounds_and_keeps_the_image_as_it_is(tmp_path):
    bgr, ab = pinned_frame_and_ab()
    made = reconstructed(lightness(bgr), ab_levels(ab), PROTOCOLS["rounded"])
    np.testing.assert_array_equal(made, rounded_image(bgr, ab, tmp_path))
    assert not np.array_equal(made, official_image(bgr, official_cast(ab), tmp_path, jpeg=False))


# -- evaluate ---------------------------------------------------------------------------------------
def protocol_images(protocol: str, bgr: np.ndarray, ab: np.ndarray, folder) -> tuple[np.ndarray, np.ndarray]:
    """(the model's image, grey's image) of one frame, made here as `protocol` makes them."""
    if protocol == "official":
        return official_image(bgr, official_cast(ab), folder), official_image(bgr, grey_levels(), folder)
    return rounded_image(bgr, ab, folder), official_image(bgr, grey_levels(), folder, jpeg=False)


@pytest.mark.parametrize("protocol", ["official", "rounded"])
def test_evaluate_scores_the_protocols_images_and_greys_image_by_image(shards, checkpoint, random_alexnet, tmp_path,
                                                                        protocol):
    folder, samples = shards
    result = evaluate(folder, checkpoint, device="cpu", batch_size=SAMPLES, workers=0,
                      lpips_backbone=random_alexnet, per_image=True, protocol=protocol)
    assert result["images"] == SAMPLES and result["lpips_unavailable"] is None and result["protocol"] == protocol
    assert [row["key"] for row in result["per_image"]] == [s["__key__"] for s in samples]
    net = lpips_model(random_alexnet)
    for row, (bgr, ab) in zip(result["per_image"], predictions(checkpoint, samples)):
        colorized, grey = protocol_images(protocol, bgr, ab, tmp_path)
        assert_scores(row, bgr[..., ::-1], colorized, net)
        assert_scores(row["grey"], bgr[..., ::-1], grey, net)
        assert row["psnr"] != row["grey"]["psnr"]
    assert set(result["mean"]) == set(result["grey"]["mean"]) == {"psnr", "ssim", "lpips", "colorfulness",
                                                                  "colorfulness_original"}
    assert_means_of_rows(result)
    assert_means_of_rows(result, grey=True)
    assert {label: entry["images"] for label, entry in result["per_label"].items()} == label_counts(samples)
    assert result["per_label"]["3"]["name"] == "label_3" and result["per_label"]["unlabeled"]["name"] is None
    assert result["grey"]["per_label"].keys() == result["per_label"].keys()
    assert result["grey"]["per_label"]["3"]["name"] == "label_3"


def neutral_checkpoint(path) -> str:
    """A generator whose every ab is 128.25 / 255: no colour after the cast (128) and after rounding."""
    networks = build_networks("historynet", NUM_CLASSES, IMAGE_SIZE, WIDTH)
    last = networks.generator.g1.out_2[1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(float(torch.logit(torch.tensor(128.25 / 255, dtype=torch.float64))))
    config = {"variant": "historynet", "num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE, "width": WIDTH,
              "label_names": []}
    return save_checkpoint(path, networks, config)


@pytest.mark.parametrize("protocol", ["official", "rounded"])
def test_a_model_without_colour_scores_exactly_grey(shards, random_alexnet, tmp_path, protocol):
    folder, _ = shards
    result = evaluate(folder, neutral_checkpoint(tmp_path / "neutral.safetensors"), device="cpu", batch_size=5,
                      workers=0, lpips_backbone=random_alexnet, per_image=True, protocol=protocol)
    for row in result["per_image"]:
        assert {name: row[name] for name in row["grey"]} == row["grey"]
    assert result["mean"] == result["grey"]["mean"] and len(result["mean"]) == 5
    # no colour: a trace from OpenCV's 8-bit Lab -> RGB (neutral ab gives channels 1 apart at some L) and JPEG
    assert result["grey"]["mean"]["colorfulness"] < 1 < result["mean"]["colorfulness_original"]


def test_without_lpips_the_reason_is_given_and_psnr_ssim_are_computed(shards, checkpoint, tmp_path, monkeypatch,
                                                                      capsys):
    def offline(*_args, **_kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no cached AlexNet: torchvision downloads...
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # ...and cannot
    folder, samples = shards
    result = evaluate(folder, checkpoint, device="cpu", batch_size=5, workers=2)
    assert result["lpips_unavailable"].startswith("LPIPS cannot be computed: torchvision could not get the AlexNet")
    assert capsys.readouterr().out == ""  # torch.hub's "Downloading: ..." went to stderr, away from --json
    assert set(result["mean"]) == {"psnr", "ssim", "colorfulness", "colorfulness_original"}
    assert 0 < result["mean"]["ssim"] < 1 and result["mean"]["psnr"] > 10
    assert result["images"] == SAMPLES  # every sample once across the two workers
    assert {label: entry["images"] for label, entry in result["per_label"].items()} == label_counts(samples)
    assert result["settings"] == {"device": "cpu", "batch_size": 5, "workers": 2, "limit": None,
                                  "lpips_backbone": None, "metric_threads": result["settings"]["metric_threads"]}
    assert result["images_per_second"] > 0

    table = format_evaluation(result)
    assert f"no LPIPS: {result['lpips_unavailable']}" in table
    lines = table.splitlines()
    assert "official protocol" in lines[0]
    at = next(i for i, line in enumerate(lines) if line.startswith("all "))
    assert lines[at].split()[1:5] == [str(SAMPLES), "-", f"{result['mean']['psnr']:.3f}",
                                      f"{result['mean']['ssim']:.4f}"]
    grey = result["grey"]["mean"]
    assert lines[at + 1].split() == ["grey", str(SAMPLES), "-", f"{grey['psnr']:.3f}", f"{grey['ssim']:.4f}",
                                     f"{grey['colorfulness']:.1f}", f"{grey['colorfulness_original']:.1f}"]
    at = next(i for i, line in enumerate(lines) if line.startswith("3 label_3 "))
    assert lines[at + 1].split()[:4] == ["grey", str(label_counts(samples)["3"]), "-",
                                         f"{result['grey']['per_label']['3']['mean']['psnr']:.3f}"]


def test_limit_evaluates_the_first_samples_only(shards, checkpoint, random_alexnet):
    folder, samples = shards
    result = evaluate(folder, checkpoint, device="cpu", batch_size=4, workers=2, lpips_backbone=random_alexnet,
                      limit=5, per_image=True)
    # two workers: the first batch of worker 0 (shard 0), then the first of worker 1 (shard 1), cut at 5
    assert [row["key"] for row in result["per_image"]] == [s["__key__"] for s in samples[:5]]
    assert result["images"] == 5 and result["settings"]["limit"] == 5
    assert {label: entry["images"] for label, entry in result["per_label"].items()} == label_counts(samples[:5])
    assert_means_of_rows(result)


def test_a_split_without_shards_is_named(shards, checkpoint):
    folder, _ = shards
    with pytest.raises(FileNotFoundError, match=r"no shards match .*train-\*\.tar"):
        evaluate(folder, checkpoint, device="cpu", split="train")
