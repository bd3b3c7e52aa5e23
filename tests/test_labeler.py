"""The ResNet labeler's model: architectures, initial weights, checkpoints and inference."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mhmd_builder.labeler import (Labeler, LabelerError, build_model, fit_rgb, initial_weights, load_checkpoint,
                                  model_input, persons_box, save_checkpoint)
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.weights import WeightsError

TAXONOMY = load_taxonomy()
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, RGB


def checkpoint_of(model, path: Path, image_size: int = 32, **config) -> Path:
    save_checkpoint(model, {"arch": "resnet18", "image_size": image_size, "taxonomy_sha256": TAXONOMY.sha256,
                            "label_names": TAXONOMY.names, **config}, path)
    return path


def constant_checkpoint(path: Path, logits) -> Path:
    """A labeler whose logits are `logits` whatever the image: its last layer's weights are zero and
    its bias the logits. What it says of any frame is known without running it."""
    torch.manual_seed(0)
    model = build_model("resnet18", len(TAXONOMY)).eval()
    torch.nn.init.zeros_(model.fc.weight)
    model.fc.bias.data = torch.as_tensor(logits, dtype=torch.float32)
    return checkpoint_of(model, path)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def images(count: int, size: int = 32) -> list[np.ndarray]:
    return list(np.random.default_rng(1).integers(0, 256, (count, size, size, 3), dtype=np.uint8))


def test_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", len(TAXONOMY)).eval()
    save_checkpoint(model, {"arch": "resnet18", "image_size": 64, "taxonomy_sha256": TAXONOMY.sha256,
                            "label_names": TAXONOMY.names}, tmp_path / "m.safetensors")
    loaded, config = load_checkpoint(tmp_path / "m.safetensors", TAXONOMY)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert config["image_size"] == 64


def test_weights_offline_pinned_and_none(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MHMD_WEIGHTS_DIR", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert initial_weights("resnet18", "imagenet")[0] is None
    assert "random initialisation" in caplog.text
    fake = tmp_path / "resnet18-f37072fd.pth"
    fake.write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match="does not match the published"):
        initial_weights("resnet18", str(fake))
    local = tmp_path / "my_resnet18.pth"
    torch.save(build_model("resnet18", 5).state_dict(), local)
    state, source = initial_weights("resnet18", str(local))
    assert source == str(local) and not any(k.startswith("fc.") for k in state)
    assert initial_weights("resnet18", "none") == (None, "random (--weights none)")


def test_predict_batch_gives_the_most_probable_allowed_labels_and_their_probabilities(tmp_path):
    logits = np.random.default_rng(0).normal(0, 2, len(TAXONOMY))
    labeler = Labeler(constant_checkpoint(tmp_path / "c.safetensors", logits), TAXONOMY, "cpu")
    frames = [{"frame_id": "f-0", "movie_id": "f"}, {"frame_id": "f-1", "movie_id": "f"}]
    allowed = [int(i) for i in np.argsort(logits)[:2]]  # the two least likely labels
    for restrict, ids in ((None, np.arange(len(TAXONOMY))), (allowed, np.array(allowed))):
        probabilities = softmax(logits[ids])  # over the allowed labels only
        top = np.argsort(-probabilities)[:3]
        rows = labeler.predict_batch(list(zip(frames, images(2))), restrict)
        assert [(r["frame_id"], r["movie_id"]) for r in rows] == [("f-0", "f"), ("f-1", "f")]
        for row in rows:
            assert (row["label_id"], row["label"], row["label_source"]) == \
                (ids[top[0]], TAXONOMY.names[ids[top[0]]], "model")
            assert row["label_confidence"] == pytest.approx(probabilities[top[0]], abs=1e-6)
            assert row["top3"] == [TAXONOMY.names[i] for i in ids[top]]
            np.testing.assert_allclose(row["top3_confidence"], probabilities[top], atol=1e-6)
    assert len(rows[0]["top3"]) == 2  # only two labels allowed


def test_predict_batch_scores_the_imagenet_normalised_rgb_image(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", len(TAXONOMY)).eval()
    labeler = Labeler(checkpoint_of(model, tmp_path / "m.safetensors"), TAXONOMY, "cpu")
    batch = images(3)
    rows = labeler.predict_batch([({"frame_id": str(i), "movie_id": "m"}, image) for i, image in enumerate(batch)],
                                 None)
    x = (torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2) / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(x).softmax(1).topk(3)
    for row, confidence, ids in zip(rows, expected.values.numpy(), expected.indices.numpy(), strict=True):
        assert row["top3"] == [TAXONOMY.names[i] for i in ids]
        np.testing.assert_allclose(row["top3_confidence"], confidence, atol=1e-5)


def test_loader_threads_grow_to_one_per_core_only_for_a_labeler_on_cuda(tmp_path):
    from mhmd_builder.devices import machine_cores
    from mhmd_builder.label import LabelStage, PredictSettings
    from mhmd_builder.workdir import WorkDir

    stage = LabelStage(WorkDir(tmp_path / "work"), str(constant_checkpoint(tmp_path / "c.safetensors", [0.0] * len(TAXONOMY))),
                       TAXONOMY, PredictSettings(device="cpu"))
    stage.setup()
    assert stage.loader_threads(4) == 4 and stage.loader_threads(64) == 64
    stage.labeler.device = "cuda:0"  # as a worker whose labeler runs on a GPU has it
    assert stage.loader_threads(1) == max(1, machine_cores()) and stage.loader_threads(10_000) == 10_000


@pytest.mark.parametrize("boxes, expected", [
    (None, (0, 0, 1, 1)),  # detect found no person: the whole frame
    (float("nan"), (0, 0, 1, 1)),  # the manifest's missing value
    ([], (0, 0, 1, 1)),
    ([[0.4, 0.4, 0.6, 0.6]], (0.37, 0.37, 0.63, 0.63)),  # 15% of the box's width and height on each side
    ([[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.7, 0.4]], (0.01, 0.025, 0.79, 0.675)),  # union (0.1, 0.1, 0.7, 0.6)
    ([[0.0, 0.5, 0.3, 1.0]], (0.0, 0.425, 0.345, 1.0)),  # at the frame's border: clamped
    (np.array([np.array([0.4, 0.4, 0.6, 0.6], np.float32)], dtype=object), (0.37, 0.37, 0.63, 0.63)),  # as parquet reads
])
def test_the_persons_box_is_their_union_widened_by_the_margin_and_clamped_to_the_frame(boxes, expected):
    assert persons_box(boxes) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("boxes", ["oops", 0.5, 7, {"x0": 0.1}, [[0.1, 0.2, 0.3]], [["a", 0, 1, 1]],
                                   [[0.1, float("nan"), 0.5, 0.5]], [[0.1, 0.2, float("inf"), 0.5]]])
def test_boxes_that_are_not_lists_of_four_finite_numbers_are_refused_in_one_line(boxes):
    with pytest.raises(LabelerError, match=r"person boxes .* are not a list of \[x0, y0, x1, y1\] numbers$"):
        persons_box(boxes)


def halves() -> np.ndarray:
    """A 100x200 BGR frame, its left half red, its right half blue."""
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, :100, 2], frame[:, 100:, 0] = 255, 255
    return frame


def test_a_persons_input_is_the_persons_box_and_a_frame_input_the_whole_frame():
    frame, right = halves(), [[0.6, 0.1, 0.9, 0.9]]  # widened: x 0.555-0.945, all blue
    persons = model_input(frame, 32, "persons", right)
    assert persons.shape == (32, 32, 3) and (persons[..., 2] == 255).all() and (persons[..., 0] == 0).all()
    whole = model_input(frame, 32, "frame", right)
    assert np.array_equal(whole, fit_rgb(frame, 32)) and whole[..., 0].max() == 255  # red seen too
    assert np.array_equal(model_input(frame, 32, "persons", []), whole)
    edge = model_input(frame, 32, "persons", [[1.0, 1.0, 1.0, 1.0]])  # a box of no size at the corner
    assert edge.shape == (32, 32, 3) and (edge[..., 2] == 255).all()
    with pytest.raises(LabelerError, match="unknown labeler input 'face'"):
        model_input(frame, 32, "face", right)


def test_a_checkpoint_sees_frames_as_its_config_says_and_one_with_an_unknown_input_is_refused(tmp_path):
    model, frame, boxes = build_model("resnet18", len(TAXONOMY)), halves(), [[0.6, 0.1, 0.9, 0.9]]
    old = Labeler(checkpoint_of(model, tmp_path / "old.safetensors"), TAXONOMY, "cpu")  # before the choice existed
    assert old.input == "frame" and np.array_equal(old.image(frame, boxes), fit_rgb(frame, 32))
    persons = Labeler(checkpoint_of(model, tmp_path / "p.safetensors", input="persons"), TAXONOMY, "cpu")
    assert np.array_equal(persons.image(frame, boxes), model_input(frame, 32, "persons", boxes))
    checkpoint_of(model, tmp_path / "bad.safetensors", input="face")
    with pytest.raises(LabelerError, match=r"bad\.json: input 'face' is not one of frame, persons"):
        load_checkpoint(tmp_path / "bad.safetensors", TAXONOMY)
