"""The labeler's validation split: every class keeps training frames, held-out films first, a time
split for classes no held-out film covers."""
import pandas as pd
import pytest

from mhmd_builder.errors import InputError
from mhmd_builder.labeler_split import split_for_validation

NAMES = [f"label_{i}" for i in range(6)]


def labelled(films: dict[str, dict[int, int]]) -> pd.DataFrame:
    """One row per labelled frame: films -> {label id: frames}, a frame a second in that order."""
    rows = []
    for film, counts in films.items():
        labels = [label for label, n in counts.items() for _ in range(n)]
        rows += [{"frame_id": f"{film}-{t:04d}", "movie_id": film, "label_id": label, "timestamp": float(t)}
                 for t, label in enumerate(labels)]
    return pd.DataFrame(rows)


def sides(split, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return table[~split.val], table[split.val]


@pytest.mark.parametrize("seed", range(8))
def test_every_class_keeps_a_training_film_and_each_shared_class_is_validated_by_a_held_out_film(seed):
    # Class 0 in four films, class 1 in two, class 2 in one film only (film "c", beside class 0).
    table = labelled({"a": {0: 10, 1: 5}, "b": {0: 10}, "c": {0: 10, 2: 6}, "d": {0: 10, 1: 5}})
    split = split_for_validation(table, NAMES, 0.2, seed)
    train, val = sides(split, table)
    assert set(train.label_id) == {0, 1, 2}
    for label in (0, 1):  # classes with several films: validated by whole films, one kept for training
        assert set(val[val.label_id == label].movie_id).isdisjoint(train[train.label_id == label].movie_id)
        assert not val[val.label_id == label].empty
    assert (val.movie_id == "c").sum() == 2  # c is class 2's only film: never held out whole
    row = {r["label"]: r for r in split.per_class}["label_2"]
    assert row["validated_by"] == "its latest frames in c" and (row["train_frames"], row["val_frames"]) == (4, 2)


def test_a_class_in_one_film_validates_on_its_latest_frames_and_keeps_the_earlier_ones():
    table = labelled({"only": {3: 10, 4: 2, 5: 1}})
    split = split_for_validation(table, NAMES, 0.2, 0)
    train, val = sides(split, table)
    assert sorted(val[val.label_id == 3].timestamp) == [8.0, 9.0]  # ceil(0.2 * 10) latest of class 3
    assert len(val[val.label_id == 4]) == 1 and val[val.label_id == 4].timestamp.max() == 11.0
    assert set(train.label_id) == {3, 4, 5}  # a one-frame class trains; nothing validates it
    assert {r["label"]: r["validated_by"] for r in split.per_class}["label_5"].startswith("nothing")
    assert split.how == "0 of 1 films held out, 2 classes split by time within a film"


def test_the_three_films_of_three_classes_case_splits_each_film_by_time():
    # The failure this split exists for: holding out a film whose class has no other film.
    table = labelled({"bus": {0: 14}, "zidane": {1: 14}, "dancer": {2: 13}})
    split = split_for_validation(table, NAMES, 0.2, 0)
    train, val = sides(split, table)
    assert set(train.label_id) == set(val.label_id) == {0, 1, 2}
    for film, latest in (("bus", [11.0, 12.0, 13.0]), ("dancer", [10.0, 11.0, 12.0])):
        assert sorted(val[val.movie_id == film].timestamp) == latest


def test_films_are_held_out_until_the_fraction_is_reached():
    table = labelled({f"f{i}": {0: 10} for i in range(10)})
    split = split_for_validation(table, NAMES, 0.25, 0)
    assert split.val.sum() == 30 and split.how == "3 of 10 films held out"  # 20 < 25% of 100 <= 30


def test_the_frame_split_takes_a_seeded_share_of_random_frames():
    table = labelled({"a": {0: 50}, "b": {1: 50}})
    runs = [split_for_validation(table, NAMES, 0.2, seed, by="frames").val for seed in (1, 1, 2)]
    assert runs[0].sum() == 20 and (runs[0] == runs[1]).all() and not (runs[0] == runs[2]).all()
    with pytest.raises(InputError, match="unknown validation split 'time'"):
        split_for_validation(table, NAMES, 0.2, 0, by="time")
