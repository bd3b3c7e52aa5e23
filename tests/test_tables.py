from pathlib import Path

import pyarrow as pa

from mhmd_builder.labels import load_movie_metadata
from mhmd_builder.tables import EXTRACT, movie_paths
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
