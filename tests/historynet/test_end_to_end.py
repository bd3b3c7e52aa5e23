"""train -> checkpoint -> resume -> evaluate -> colorize through the `mhmd historynet` commands, on the
demo's shards (small model size: the pipeline, not the model's quality, is under test)."""
import json

import cv2
from click.testing import CliRunner

from mhmd_builder.cli import main

SMALL = ["--image-size", "32", "--width", "0.25", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--vgg-weights", "none",
         "--save-every", "1", "--log-every", "1"]


def run(*args):
    result = CliRunner().invoke(main, ["historynet", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout  # stderr (notices, progress) apart


def test_train_resume_evaluate_colorize_on_the_demo_shards(demo_run, tmp_path, monkeypatch):
    out, output, code = demo_run
    assert code == 0, output
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no LPIPS backbone here: it must say so
    shards, rundir = out / "shards", tmp_path / "run"

    assert "step 2, epoch" in run("train", "--shards", shards, "-o", rundir, "--steps", "2", *SMALL)
    assert "step 4, epoch" in run("train", "--shards", shards, "-o", rundir, "--steps", "4", "--resume", *SMALL)
    steps = [json.loads(line)["step"] for line in (rundir / "train.log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    checkpoint = rundir / "last.safetensors"

    result = json.loads(run("evaluate", "--shards", shards, "--checkpoint", checkpoint, "--json", "--device", "cpu",
                            "--workers", "0"))
    index = json.loads((shards / "index.json").read_text())
    assert result["images"] == index["splits"]["test"]["samples"]
    assert result["lpips_unavailable"].startswith("LPIPS cannot be computed")
    assert 5 < result["mean"]["psnr"] < 60 and 0 < result["mean"]["ssim"] <= 1
    assert sum(label["images"] for label in result["per_label"].values()) == result["images"]
    assert result["protocol"] == "official" and result["grey"]["mean"].keys() == result["mean"].keys()
    rounded = json.loads(run("evaluate", "--shards", shards, "--checkpoint", checkpoint, "--json", "--device", "cpu",
                             "--workers", "0", "--protocol", "rounded"))
    assert rounded["protocol"] == "rounded" and rounded["grey"]["mean"]["psnr"] != result["grey"]["mean"]["psnr"]

    frames = sorted((out / "work" / "frames").rglob("*.jpg"))[:3]
    run("colorize", *frames, "--checkpoint", checkpoint, "-o", tmp_path / "colour", "--device", "cpu")
    for frame in frames:
        original, colorized = cv2.imread(str(frame)), cv2.imread(str(tmp_path / "colour" / f"{frame.stem}.png"))
        assert colorized.shape == original.shape
        difference = cv2.absdiff(cv2.cvtColor(original, cv2.COLOR_BGR2LAB)[..., 0],
                                 cv2.cvtColor(colorized, cv2.COLOR_BGR2LAB)[..., 0])
        assert difference.mean() < 1.5  # its own L, up to the 8-bit round trip (clipped colours move it)
