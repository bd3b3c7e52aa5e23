"""HistoryNet training on tiny shards, on the CPU (32x32 images, batches of 2, networks of width 0.25:
about 1/16 of the paper's weights, a checkpoint with Adam states of about 30 MB instead of 500)."""
from __future__ import annotations

import json
import os
import socket
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_colorize import WIDTH
from test_data import PER_SHARD, make_sample, write_shards

from mhmd_builder.historynet import train as train_module
from mhmd_builder.historynet.checkpoint import load_checkpoint, load_generator, read_progress
from mhmd_builder.historynet.data import eval_loader
from mhmd_builder.historynet.losses import LOSS_PRESETS
from mhmd_builder.historynet.model import build_networks
from mhmd_builder.historynet.train import (PRESET_SCHEDULES, HistoryNetError, TrainSettings, load_backbone, train,
                                           update_moving_average, validation_batches, validation_l2,
                                           with_moving_average, with_preset_defaults)
from mhmd_builder.shards import make_index, write_index
from mhmd_builder.taxonomy import load_taxonomy

SMALL = {"image_size": 32, "width": WIDTH, "batch_size": 2, "device": "cpu", "workers": 0, "vgg_weights": "none"}
GRID_TAG = "validation/L_predicted_truth"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two train shards of four samples and one test shard of two (for the validation grid)."""
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, [make_sample(i) for i in range(8)])
    write_shards(folder, [make_sample(i) for i in range(8, 10)], split="test")
    return folder


def write_shard_index(folder: Path, taxonomy_sha256: str) -> None:
    """index.json as `mhmd shard` writes it (no splits: training reads the tars' counts and the taxonomy)."""
    tars = [(p.name, p.name.split("-")[0], PER_SHARD) for p in sorted(folder.glob("*.tar"))]
    write_index(folder, make_index({}, taxonomy_sha256, tars, {}))


def log_lines(rundir: Path) -> list[dict]:
    return [json.loads(line) for line in (rundir / "train.log.jsonl").read_text().splitlines()]


def adam_steps(checkpoint, name: str = "generator") -> int:
    return int(checkpoint.optimizer_states[name]["state"][0]["step"])


def position(progress: dict) -> dict:
    return {key: progress[key] for key in ("step", "epoch", "epoch_step", "epoch_steps")}


def grey_l2(shards: Path) -> float:
    """Grey's mean squared ab error (ab / 255) over the test split at 32 px, one sample at a time."""
    errors = [((batch["ab"].double() - 128) / 255).square().mean().item()
              for batch in eval_loader(str(shards), len(load_taxonomy()), batch_size=1, num_workers=0, image_size=32)]
    assert len(errors) == 2
    return sum(errors) / len(errors)


def assert_best_is_the_lowest_validation(rundir: Path) -> None:
    scores = {path.name: read_progress(path)["validation/l2_ab"] for path in (rundir / "checkpoints").iterdir()}
    best = read_progress(rundir / "best.safetensors")
    assert best["validation/l2_ab"] == min(scores.values())
    assert f"step-{best['step']:08d}.safetensors" == min(scores, key=scores.get)


# -- a run, and its resumption ---------------------------------------------------------------------
def test_a_run_writes_checkpoints_logs_and_tensorboard_and_resumes_where_it_stopped(shards, tmp_path):
    rundir = tmp_path / "run"
    # 8 samples an epoch in batches of 2: 4 steps an epoch; a checkpoint every 3 steps and at each epoch end
    settings = TrainSettings(shards=str(shards), out=str(rundir), steps=4, epoch_samples=8, save_every=3,
                             log_every=1, **SMALL)
    summary = train(settings)

    assert (summary["step"], summary["epoch"], summary["epoch_steps"]) == (4, 1, 4)
    assert sorted(p.name for p in (rundir / "checkpoints").iterdir()) == ["step-00000003.safetensors",
                                                                          "step-00000004.safetensors"]
    last = load_checkpoint(rundir / "last.safetensors")
    assert position(last.progress) == {"step": 4, "epoch": 1, "epoch_step": 0, "epoch_steps": 4}
    # validation at every checkpoint: G's L2(ab) in eval mode and grey's, on the test split's 2 samples
    assert last.progress["validation/grey_l2_ab"] == pytest.approx(grey_l2(shards), rel=1e-5)
    assert last.progress["validation/l2_ab"] > 0
    assert_best_is_the_lowest_validation(rundir)
    assert last.config["variant"] == "historynet" and last.config["image_size"] == 32
    assert last.config["num_classes"] == len(load_taxonomy()) == len(last.config["label_names"])
    assert last.config["preset"] == "recommended" and last.config["loss_weights"]["wgan"] == 0.01
    assert last.config["settings"]["steps"] == 4
    # the preset's info term and warm-up, as the run used them
    assert (last.config["settings"]["info_term"], last.config["settings"]["warmup_steps"]) == ("softmax", 200)
    assert {name: adam_steps(last, name) for name in ("generator", "critic", "info_classifier")} == \
        {"generator": 4, "critic": 4, "info_classifier": 4}
    step_4 = load_checkpoint(rundir / "checkpoints" / "step-00000004.safetensors")
    assert step_4.optimizer_states == {} and step_4.progress == last.progress  # Adam's states: in last only
    for name in ("generator", "critic", "info_classifier"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(step_4.networks, name).state_dict().values(),
                                                     getattr(last.networks, name).state_dict().values()))

    lines = log_lines(rundir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and {line["epoch"] for line in lines} == {0}
    terms = {"generator/l2_ab", "generator/class_kl", "generator/parsing_l2", "generator/wgan", "generator/info_kl",
             "generator/total", "critic/real", "critic/fake", "critic/gradient_penalty", "critic/total",
             "info_classifier/loss"}
    assert terms <= set(lines[0]) and all(line["images_per_second"] > 0 for line in lines)
    assert all(torch.isfinite(torch.tensor([line[t] for t in terms])).all() for line in lines)

    events = EventAccumulator(str(rundir / "tensorboard"))
    events.Reload()
    assert terms | {"images_per_second"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("generator/l2_ab")] == [1, 2, 3, 4]
    assert [e.step for e in events.Images(GRID_TAG)] == [3, 4]  # a grid at every checkpoint
    assert [e.step for e in events.Scalars("validation/l2_ab")] == [3, 4]
    assert [e.value for e in events.Scalars("validation/grey_l2_ab")] == pytest.approx([grey_l2(shards)] * 2)

    with pytest.raises(HistoryNetError, match="holds a run already"):
        train(settings)  # a fresh start would overwrite it
    with pytest.raises(HistoryNetError, match="variant 'historynet', these settings 'no_parsing'") as error:
        train(replace(settings, variant="no_parsing", resume=True))
    assert "\n" not in str(error.value)
    with pytest.raises(HistoryNetError, match="width 0.25, these settings 0.5"):
        train(replace(settings, width=0.5, resume=True))

    with open(rundir / "train.log.jsonl", "a") as log:  # as if the run had gone on past its checkpoint
        log.write(json.dumps({"step": 5, "epoch": 1}) + "\n")
    resumed = train(replace(settings, steps=8, resume=True))
    assert (resumed["step"], resumed["epoch"]) == (8, 2)
    assert [Path(p).name for p in resumed["checkpoints"]] == ["step-00000006.safetensors", "step-00000008.safetensors"]
    last = load_checkpoint(rundir / "last.safetensors")
    assert position(last.progress) == {"step": 8, "epoch": 2, "epoch_step": 0, "epoch_steps": 4}
    assert_best_is_the_lowest_validation(rundir)  # the resumed run knew the best before it
    assert adam_steps(last) == 8 and adam_steps(last, "critic") == 8  # the optimiser states went on
    lines = log_lines(rundir)  # steps after the checkpoint resumed from are logged once, by the resumed run
    assert [(line["step"], line["epoch"]) for line in lines] == [(s, (s - 1) // 4) for s in range(1, 9)]
    assert all("generator/l2_ab" in line for line in lines)
    events = EventAccumulator(str(rundir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("generator/l2_ab")] == list(range(1, 9))


# -- learning, reproducibility, variants -----------------------------------------------------------
def test_the_colour_loss_falls_on_a_fixed_image(tmp_path):
    """The full loss (WGAN and info terms included): the L2(ab) term falls. At 1/16 of the paper's weights
    the paper's learning rate (2e-5) moved L2(ab) 16% in 20 steps: here 5x that, 40 steps (-62%)."""
    folder = tmp_path / "shards"
    write_shards(folder, [{**make_sample(0), "__key__": f"same_{i}"} for i in range(4)])
    train(TrainSettings(shards=str(folder), out=str(tmp_path / "run"), steps=40, epoch_samples=1000, save_every=1000,
                        log_every=1, lr=1e-4, **SMALL))
    l2 = [line["generator/l2_ab"] for line in log_lines(tmp_path / "run")]
    assert len(l2) == 40
    assert sum(l2[-3:]) < 0.6 * sum(l2[:3]), l2


def test_a_short_run_on_a_learnable_task_colours_held_out_frames_better_than_grey(shards, tmp_path):
    """The test split's 2 gradient frames are not trained on; their colours follow from position and L as
    the train frames' do. Measured: validation L2(ab) from 21.5e-3 (step 2) to 10.2e-3 (step 12), grey's 23.5e-3."""
    rundir = tmp_path / "run"
    train(TrainSettings(shards=str(shards), out=str(rundir), steps=14, epoch_samples=8, preset="l2", lr=1e-3,
                        log_every=100, **{**SMALL, "batch_size": 4}))
    best = read_progress(rundir / "best.safetensors")
    assert best["validation/l2_ab"] < 0.6 * best["validation/grey_l2_ab"], best


def test_the_recommended_preset_colours_held_out_frames_better_than_grey_after_the_critics_join(shards, tmp_path):
    """The same learnable task with the default preset, its critics joining after 4 of 14 steps. Measured:
    the last checkpoint's validation L2(ab) 10.2e-3 (as L2 alone's), grey's 23.5e-3."""
    rundir = tmp_path / "run"
    train(TrainSettings(shards=str(shards), out=str(rundir), steps=14, epoch_samples=8, lr=1e-3, warmup_steps=4,
                        log_every=1, **{**SMALL, "batch_size": 4}))
    supervised = replace(LOSS_PRESETS["recommended"], wgan=0.0, info_kl=0.0)
    alone = [line["generator/total"] == pytest.approx(weighted_total(line, supervised), rel=1e-5, abs=1e-9)
             for line in log_lines(rundir)]
    assert alone == [True] * 4 + [False] * 10  # the critics' terms count from step 5
    last = read_progress(rundir / "last.safetensors")
    assert last["validation/l2_ab"] < 0.6 * last["validation/grey_l2_ab"], last


@pytest.mark.parametrize("preset, given, expected", [
    ("paper", {}, ("official", 0)),  # the paper and the official code: the clipped KL, no warm-up
    ("official", {}, ("official", 0)),
    ("l2", {}, ("official", 0)),
    ("recommended", {}, ("softmax", 200)),
    ("recommended", {"info_term": "official", "warmup_steps": 0}, ("official", 0)),  # given: kept, 0 too
    ("paper", {"info_term": "softmax", "warmup_steps": 1}, ("softmax", 1)),
])
def test_each_preset_sets_its_info_term_and_warm_up_unless_they_are_given(preset, given, expected):
    settings = with_preset_defaults(TrainSettings(shards="s", out="o", preset=preset, **given))
    assert (settings.info_term, settings.warmup_steps) == expected
    assert set(PRESET_SCHEDULES) == set(LOSS_PRESETS)


def weighted_total(line: dict, weights) -> float:
    """G's loss as `weights` weigh the terms a log line holds."""
    return sum(weight * line[f"generator/{name}"] for name, weight in vars(weights).items())


def test_a_warm_up_trains_g_on_its_supervised_terms_alone_until_the_critics_join(shards, tmp_path):
    rundir = tmp_path / "run"
    train(TrainSettings(shards=str(shards), out=str(rundir), steps=4, epoch_samples=8, preset="paper", warmup_steps=2,
                        log_every=1, save_every=100, **SMALL))
    w = LOSS_PRESETS["paper"]
    for line in log_lines(rundir):
        supervised = weighted_total(line, replace(w, wgan=0.0, info_kl=0.0))
        critics = weighted_total(line, w) - supervised
        expected = supervised if line["step"] <= 2 else supervised + critics
        assert line["generator/total"] == pytest.approx(expected, rel=1e-5, abs=1e-7), line["step"]
        assert abs(critics) > 1e-3 * abs(supervised)  # the critics' terms would have counted
        assert line["critic/total"] != 0 and line["info_classifier/loss"] > 0  # D1 and D2 train all along


@pytest.mark.parametrize("option, term", [("critic_weight", "wgan"), ("info_weight", "info_kl")])
def test_a_critic_or_info_weight_replaces_the_presets_weight_in_g_s_loss_and_the_config(shards, tmp_path, option,
                                                                                          term):
    rundir = tmp_path / "run"
    train(TrainSettings(shards=str(shards), out=str(rundir), steps=2, epoch_samples=8, preset="paper", log_every=1,
                        save_every=100, **{option: 0.5}, **SMALL))
    w = LOSS_PRESETS["paper"]
    for line in log_lines(rundir):
        expected = weighted_total(line, replace(w, **{term: 0.5}))
        assert line["generator/total"] == pytest.approx(expected, rel=1e-5, abs=1e-7), line["step"]
        assert abs(line[f"generator/{term}"]) > 1e-4  # 0.5 instead of the preset's would show
    assert load_checkpoint(rundir / "last.safetensors").config["loss_weights"] == {**vars(w), term: 0.5}


def test_the_moving_average_decays_from_a_tenth_to_its_decay_and_copies_batch_counts():
    nets = with_moving_average(build_networks("chromagan", 5, 32, WIDTH), 0.9)
    average, current = nets.generator_ema.state_dict(), nets.generator.state_dict()
    weight, mean, count = next(k for k in average if k.endswith("weight")), next(
        k for k in average if k.endswith("running_mean")), next(k for k in average if k.endswith("num_batches_tracked"))
    for step, expected in [(0, 0.9), (70, 1 - 71 / 80), (90, 0.1)]:  # d = (1 + step) / (10 + step) until 0.9
        for key in (weight, mean):
            average[key].fill_(0.0)
            current[key].fill_(1.0)
        current[count].fill_(step)
        update_moving_average(nets, 0.9, step)
        for key in (weight, mean):  # the weights and BatchNorm's statistics alike
            assert torch.allclose(average[key], torch.full_like(average[key], expected)), (step, key)
        assert int(average[count]) == step
    assert not any(p.requires_grad for p in nets.generator_ema.parameters())


def test_a_run_with_ema_validates_and_colours_with_the_moving_average_and_keeps_it_on_resume(shards, tmp_path):
    rundir = tmp_path / "run"
    settings = TrainSettings(shards=str(shards), out=str(rundir), steps=3, epoch_samples=8, ema=0.5, lr=1e-3,
                             log_every=100, save_every=100, **SMALL)
    train(settings)
    last = load_checkpoint(rundir / "last.safetensors")
    ema, g = last.networks.generator_ema.state_dict(), last.networks.generator.state_dict()
    assert any(not torch.equal(ema[k], g[k]) for k in g)  # an average, not a copy of G
    generator, _ = load_generator(rundir / "last.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in generator.state_dict().items())  # colorize and evaluate use it
    val_urls = train_module.validation_shards(settings, train_module.train_shards(settings))
    measured = validation_l2(generator, validation_batches(val_urls, 42, settings), "cpu", nullcontext)
    assert last.progress["validation/l2_ab"] == pytest.approx(measured["validation/l2_ab"], rel=1e-6)
    train(replace(settings, steps=4, resume=True))  # resumed: the average goes on from the checkpoint's
    resumed = load_checkpoint(rundir / "last.safetensors").networks
    key = next(k for k in ema if k.endswith("weight"))
    d = 5 / 14  # step 4's decay, (1 + 4) / (10 + 4), below 0.5
    expected = d * ema[key] + (1 - d) * resumed.generator.state_dict()[key]
    assert torch.allclose(resumed.generator_ema.state_dict()[key], expected)
    assert with_moving_average(resumed, 0.0).generator_ema is None  # --ema 0 drops it


def test_a_cpu_run_is_reproducible(shards, tmp_path):
    for name in ("a", "b"):
        train(TrainSettings(shards=str(shards), out=str(tmp_path / name), variant="chromagan", steps=2,
                            epoch_samples=100, log_every=1, **SMALL))
    logs = [[{k: v for k, v in line.items() if k != "images_per_second"} for line in log_lines(tmp_path / name)]
            for name in ("a", "b")]
    assert logs[0] == logs[1]
    a, b = (load_checkpoint(tmp_path / name / "last.safetensors").networks.generator.state_dict() for name in "ab")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("variant", ["no_parsing", "chromagan"])
def test_variants_without_parsing_or_d2_train(shards, tmp_path, variant):
    folder = tmp_path / "shards"
    write_shards(folder, [make_sample(i) for i in range(8)])
    write_shard_index(folder, load_taxonomy().sha256)
    summary = train(TrainSettings(shards=str(folder / "train-*.tar"), out=str(tmp_path / "run"), variant=variant,
                                  steps=2, log_every=1, save_every=1, keep_checkpoints=1, **SMALL))
    assert summary["epoch_samples"] == 8 and summary["epoch_steps"] == 4  # the count in index.json
    # step 1's checkpoint made way for step 2's (neither ends an epoch)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002.safetensors"]
    lines = log_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == [1, 2]
    assert not any(key.endswith("parsing_l2") for key in lines[0])
    has_d2 = variant == "no_parsing"
    assert ("info_classifier/loss" in lines[0]) == ("generator/info_kl" in lines[0]) == has_d2
    last = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert set(last.optimizer_states) == {"generator", "critic"} | ({"info_classifier"} if has_d2 else set())
    assert last.networks.generator.g3 is None and (last.networks.info_classifier is not None) == has_d2


# -- refusals --------------------------------------------------------------------------------------
def test_what_cannot_be_trained_is_a_one_line_error(shards, tmp_path):
    foreign = tmp_path / "foreign"
    write_shards(foreign, [make_sample(i) for i in range(4)])
    write_shard_index(foreign, "0" * 64)
    cases = [
        (TrainSettings(shards=str(tmp_path / "none"), out=str(tmp_path / "r1"), **SMALL), "no shards match"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r2"), **SMALL), "give epoch_samples"),
        (TrainSettings(shards=str(foreign), out=str(tmp_path / "r3"), **SMALL), "another taxonomy"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r4"), epoch_samples=8, resume=True, **SMALL),
         "no checkpoint to resume from"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r5"), epoch_samples=8, variant="pix2pix", **SMALL),
         "unknown variant"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r6"), epoch_samples=8, preset="mine", **SMALL),
         "unknown loss preset"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r7"), epoch_samples=8, **{**SMALL, "width": 1.5}),
         r"network width 1.5 is not in \(0, 1\]"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r8"), epoch_samples=8,
                       **{**SMALL, "vgg_weights": "imagenet"}),
         "--vgg-weights imagenet: VGG-16 weights fit width 1 only; at width 0.25 train G0 from random weights"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r9"), epoch_samples=8, info_term="cosine", **SMALL),
         r"unknown info term 'cosine' \(available: official, softmax\)"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r10"), epoch_samples=8, warmup_steps=-1, **SMALL),
         r"warmup_steps must be 0 or more \(got -1\)"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r11"), epoch_samples=8, **{**SMALL, "image_size": 48}),
         r"image size 48 is not a multiple of 32 \(the paper's is 224\)"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r12"), epoch_samples=8, ema=1.0, **SMALL),
         r"ema is a decay in \[0, 1\) \(got 1.0\): 0 keeps no moving average"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r13"), epoch_samples=8, critic_weight=-0.1, **SMALL),
         r"critic_weight must be 0 or more \(got -0.1\)"),
        (TrainSettings(shards=str(shards), out=str(tmp_path / "r14"), epoch_samples=8, info_weight=-0.1, **SMALL),
         r"info_weight must be 0 or more \(got -0.1\)"),
    ]
    for settings, message in cases:
        with pytest.raises(HistoryNetError, match=message) as error:
            train(settings)
        assert "\n" not in str(error.value)
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 14))


def test_vgg_weights_come_from_torchvision_a_file_or_nowhere(tmp_path, monkeypatch):
    nets = build_networks("chromagan", 5, 32)
    asked = []

    def fake_load(g0, path=None):
        asked.append(path)

    monkeypatch.setattr(train_module, "load_vgg16_backbone", fake_load)
    assert load_backbone(nets, "imagenet") == "imagenet"  # offline: test_train_options.py
    (tmp_path / "vgg16.pth").write_bytes(b"")
    assert load_backbone(nets, str(tmp_path / "vgg16.pth")) == str(tmp_path / "vgg16.pth")
    assert load_backbone(nets, "none").startswith("random")
    assert asked == [None, str(tmp_path / "vgg16.pth")]
    with pytest.raises(HistoryNetError, match="no such file"):
        load_backbone(nets, str(tmp_path / "missing.pth"))
    monkeypatch.undo()
    with pytest.raises(HistoryNetError, match="not a torchvision VGG-16 state dict"):
        load_backbone(nets, str(tmp_path / "vgg16.pth"))  # empty


# -- two processes ---------------------------------------------------------------------------------
def ddp_rank(rank: int, port: int, settings: TrainSettings, results: Path) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})  # one core (and so one torch thread) per process
    summary = train(settings)
    (results / f"rank{rank}.json").write_text(json.dumps(summary))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_epoch_and_only_rank_0_writes(shards, tmp_path):
    """DistributedDataParallel over gloo on the CPU (the CUDA / NCCL path is not tested here)."""
    rundir = tmp_path / "run"
    settings = TrainSettings(shards=str(shards), out=str(rundir), variant="chromagan", epochs=1, epoch_samples=8,
                             log_every=1, **SMALL)
    mp.spawn(ddp_rank, args=(free_port(), settings, tmp_path), nprocs=2)
    summaries = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # each rank draws 4 samples an epoch: 2 steps of 2 images, 4 images a step in all
    assert [(s["step"], s["epoch"], s["epoch_steps"]) for s in summaries] == [(2, 1, 2), (2, 1, 2)]
    assert summaries[0]["last"] and summaries[1]["last"] is None and summaries[1]["checkpoints"] == []
    assert [line["step"] for line in log_lines(rundir)] == [1, 2]
    assert load_checkpoint(rundir / "last.safetensors").progress["epoch"] == 1


def test_the_defaults_are_the_papers_hyper_parameters_with_the_recommended_losses():
    s = TrainSettings(shards="s", out="o")
    assert (s.lr, s.betas, s.batch_size, s.epochs, s.preset) == (2e-5, (0.5, 0.999), 16, 8, "recommended")
    nets = SimpleNamespace(generator=torch.nn.Linear(1, 1), critic=torch.nn.Linear(1, 1), info_classifier=None)
    optimizers = train_module.make_optimizers(nets, s)
    assert set(optimizers) == {"generator", "critic"}  # none for a network the variant does not have
    for optimizer in optimizers.values():
        assert {k: optimizer.defaults[k] for k in ("lr", "betas")} == {"lr": 2e-5, "betas": (0.5, 0.999)}
