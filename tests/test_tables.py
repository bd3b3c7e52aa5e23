from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from mhmd_builder.labels import load_movie_metadata
from mhmd_builder.tables import EXTRACT, movie_paths, values_digest
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.workdir import WorkDir


def test_a_film_renamed_after_extraction_is_found_under_its_new_name(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.begin(EXTRACT, "film-0a1b2c3d")
    wd.commit(EXTRACT, "film-0a1b2c3d", pa.table({"frame_id": ["film-0a1b2c3d_0"]}), {"path": "/old/film.mp4"})
    assert movie_paths(wd) == {"film-0a1b2c3d": Path("/old/film.mp4")}
    wd.plan(EXTRACT, "film-0a1b2c3d", {"path": "/new/Zulu (1964).mp4"})  # the next run was given the new name
    assert movie_paths(wd) == {"film-0a1b2c3d": Path("/new/Zulu (1964).mp4")}
    movies = tmp_path / "movies.csv"
    movies.write_text("movie,era,nationality\nZulu (1964).mp4,before_ww2,britain_france\n")
    assert load_movie_metadata(movies, wd, load_taxonomy()) == {
        "film-0a1b2c3d": {"era": "before_ww2", "nationality": "britain_france"}}


BOXES = pa.list_(pa.list_(pa.float32(), 4))


def digest_table(**changes) -> pa.Table:
    columns = {"frame_id": pa.array(["a_0", None, "", "é_2"]), "timestamp": pa.array([0.5, None, 1.0, 2.0]),
               "width": pa.array([640, 640, None, 320], pa.int32()), "kept": pa.array([True, None, False, True]),
               "boxes": pa.array([[[0.1, 0.2, 0.3, 0.4]], None, [], [[0.5, 0.5, 0.6, 0.6], [0, 0, 1, 1]]], BOXES),
               "key": pa.array([3, 2, 1, 0], pa.uint64()), "mask": pa.nulls(4)}
    return pa.table({**columns, **changes})


def test_the_values_digest_is_of_the_values_not_of_how_arrow_holds_them():
    table = digest_table()
    digest = values_digest(table, ["out", "sha"])
    doubled = pa.concat_tables([table, table])
    assert values_digest(doubled.slice(4, 4), ["out", "sha"]) == digest  # a slice of another table
    assert values_digest(pa.Table.from_batches(table.to_batches(max_chunksize=1)), ["out", "sha"]) == digest
    refilled = pc.if_else(pc.is_valid(table["timestamp"]), table["timestamp"], None)  # rebuilt buffers
    assert values_digest(table.set_column(1, "timestamp", refilled), ["out", "sha"]) == digest
    assert values_digest(table.take([0, 1, 2, 3]), ["out", "sha"]) == digest
    # One value, one null, one box, one column's name, the head or the order: another digest each.
    others = [digest_table(frame_id=pa.array(["a_0", "", "", "é_2"])),  # null -> empty string
              digest_table(frame_id=pa.array(["a_0", None, None, "é_2"])),  # empty string -> null
              digest_table(frame_id=pa.array(["a_", None, "0", "é_2"])),  # the same bytes cut elsewhere
              digest_table(timestamp=pa.array([0.5, None, 1.0, 2.5])),
              digest_table(width=pa.array([640, 640, 0, 320], pa.int32())),  # null -> 0
              digest_table(kept=pa.array([True, False, False, True])),
              digest_table(boxes=pa.array([[[0.1, 0.2, 0.3, 0.4]], [], [], [[0.5, 0.5, 0.6, 0.6], [0, 0, 1, 1]]], BOXES)),
              digest_table(boxes=pa.array([[[0.1, 0.2, 0.3, 0.4]], None, [[0.5, 0.5, 0.6, 0.6]], [[0, 0, 1, 1]]], BOXES)),
              digest_table(mask=pa.array([None, None, None, "m.png"])),
              table.rename_columns([*table.column_names[:-1], "parsing"]), table.take([1, 0, 2, 3])]
    assert len({digest, *(values_digest(other, ["out", "sha"]) for other in others)}) == len(others) + 1
    assert values_digest(table, ["out", "other"]) != digest


def test_the_values_digest_of_columns_without_nulls_read_from_their_buffers_is_the_same_at_any_offset():
    table = pa.table({"frame_id": ["a_0", "", "é_2", "b"], "width": pa.array([1, 2, 3, 4], pa.int32()),
                      "kept": [True, False, True, True], "boxes": pa.array([[[0.1, 0.2, 0.3, 0.4]], [], [], []], BOXES)})
    digest = values_digest(table, [])
    doubled = pa.concat_tables([table.slice(1), table, table]).combine_chunks()  # one chunk: offsets 3 and 7
    assert values_digest(doubled.slice(3, 4), []) == values_digest(doubled.slice(7, 4), []) == digest
    assert values_digest(pa.Table.from_batches(table.to_batches(max_chunksize=3)), []) == digest
    assert values_digest(doubled.slice(4, 4), []) != digest  # the same values in another order
    assert values_digest(table.set_column(0, "frame_id", pa.array(["a_0", "", "é_", "2b"])), []) != digest
