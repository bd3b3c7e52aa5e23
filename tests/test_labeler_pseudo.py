"""Self-training's pseudo labels: which frames may get one, which do, and a training run with them
(on test_labeler_train's generated films, whose label is their dominant colour)."""
import numpy as np
import pandas as pd
import pytest

from mhmd_builder.labeler_pseudo import UNLABELLED, confident_per_class, unlabelled_pool
from mhmd_builder.labeler_train import TrainSettings, labeled_frames, train
from test_labeler_train import (FILMS, PER_CLASS, REJECTED, SMALL, TAXONOMY, copy_workdir, set_human_labels,
                                trained)  # noqa: F401 (trained: the fixture)

POOL = pd.DataFrame({"frame_id": ["a", "b", "c", "d", "e", "f"], "label_id": UNLABELLED})


def test_a_pseudo_label_needs_the_threshold_exactly_and_each_label_keeps_only_its_most_confident():
    label_ids = np.array([7, 7, 7, 3, 3, 7])
    confidences = np.array([0.95, 0.9, np.nextafter(0.9, 0), 0.99, 0.6, 0.95])
    chosen = confident_per_class(POOL, label_ids, confidences, per_class=2, threshold=0.9)
    # 7: a and f (0.95, tied: frame order) before b (0.9, at the threshold: in, but past the cap of 2);
    # c just under the threshold; 3: d, not e.
    assert chosen.frame_id.tolist() == ["a", "d", "f"] and chosen.label_id.tolist() == [7, 3, 7]
    at_threshold = confident_per_class(POOL, label_ids, confidences, per_class=3, threshold=0.9)
    assert at_threshold.frame_id.tolist() == ["a", "b", "d", "f"]
    assert confident_per_class(POOL, label_ids, confidences, per_class=3, threshold=1.0).empty


def test_the_pool_leaves_out_human_labels_and_every_frame_of_a_validating_film(trained):
    work, truth, _ = trained
    labeled = labeled_frames(work)
    some = labeled[labeled.frame_id.str.endswith(("0000", "0001"))].reset_index(drop=True)
    val = some.movie_id.eq(FILMS[1]).to_numpy()
    pool = unlabelled_pool(work, some, val)
    assert not set(pool.frame_id) & set(some.frame_id)
    assert set(pool.movie_id) == set(FILMS) - {FILMS[1]}
    kept_per_film = PER_CLASS * 3  # every frame but the last, which detection rejected
    assert len(pool) == (len(FILMS) - 1) * (kept_per_film - 2) and (pool.label_id == UNLABELLED).all()


def test_self_training_adds_pseudo_labels_only_from_films_that_do_not_validate_and_records_them(trained, tmp_path):
    work = copy_workdir(trained[0], tmp_path)
    truth = trained[1]
    # Three frames per class of each film labelled; the rest are for pseudo labels.
    set_human_labels(work, {f: n for f, n in truth.items() if int(f[-4:]) < 9 and not f.endswith(REJECTED)})
    settings = TrainSettings(**SMALL, epochs=3, val_fraction=0.25, output=str(tmp_path / "l.safetensors"),
                             pseudo_label_rounds=1, pseudo_label_per_class=5, pseudo_label_confidence=0.5)
    config = train(work, settings, TAXONOMY)
    [round_one] = config["pseudo_label_rounds"]
    assert config["settings"]["pseudo_label_rounds"] == 1 and round_one["round"] == 1
    unlabelled_per_film = PER_CLASS * 3 - 9
    assert round_one["pool_frames"] == (len(FILMS) - len(config["val_movies"])) * unlabelled_per_film
    assert 0 < round_one["pseudo_frames"] <= 5 * 3 and all(n <= 5 for n in round_one["per_label"].values())
    assert config["train_frames"] == 9 * (len(FILMS) - 1) and config["metrics"]["accuracy"] >= 0.9


@pytest.mark.parametrize("option, value", [("--pseudo-label-rounds", "-1"), ("--pseudo-label-per-class", "0"),
                                           ("--pseudo-label-confidence", "1.5")])
def test_the_cli_refuses_pseudo_label_settings_out_of_range(option, value, tmp_path):
    from click.testing import CliRunner

    from mhmd_builder.cli import main

    labels = tmp_path / "labels.csv"
    labels.write_text("frame_id,label\n")
    result = CliRunner().invoke(main, ["labeler", "train", "-w", str(tmp_path), "--labels", str(labels),
                                       option, value])
    assert result.exit_code == 2 and option in result.output


def test_a_recipe_sets_self_training_and_its_ranges_hold_there_too(tmp_path):
    from mhmd_builder.build import PipelineError, load_pipeline

    recipe = tmp_path / "r.yaml"
    recipe.write_text("labeler: {pseudo_label_rounds: 2, pseudo_label_confidence: 0.8}\n")
    labeler = load_pipeline(recipe).labeler
    assert (labeler.pseudo_label_rounds, labeler.pseudo_label_per_class, labeler.pseudo_label_confidence) == (2, 10, 0.8)
    recipe.write_text("labeler: {pseudo_label_rounds: -1}\n")
    with pytest.raises(PipelineError, match="labeler.pseudo_label_rounds: -1 is not in the range 0 <= x"):
        load_pipeline(recipe)
