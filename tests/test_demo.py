from click.testing import CliRunner

from mhmd_builder.cli import main
from mhmd_builder.workdir import WorkDir


def test_demo_makes_its_films_and_rejects_the_bad_segments(tmp_path):
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "out"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "2 movies extracted, 0 failed" in result.output
    frames = WorkDir(tmp_path / "out" / "work").read_table("extract")
    colour_film = frames[frames.movie_id.str.startswith("colour-flashback")].set_index("timestamp")
    # 4 s colour, 3 s black-and-white, 3 s sepia, 2 s black, 3 s blurred (sampled at 2 fps)
    assert colour_film.loc[0:3.5].kept.all()
    assert not colour_film.loc[4:6.5].kept.any()
    assert set(colour_film.loc[4:6.5].reject_reason) == {"grayscale"}
    assert not colour_film.loc[12:14.5].kept.any()
    scope = WorkDir(tmp_path / "out" / "work").done("extract")
    crops = {s["movie_id"].split("-")[0]: s["crop"] for s in scope.values()}
    assert crops["colour"] is None and crops["scope"]["h"] == 272
