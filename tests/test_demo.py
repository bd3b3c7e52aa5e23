from click.testing import CliRunner

from mhmd_builder.cli import main
from mhmd_builder.manifest import manifest
from mhmd_builder.workdir import WorkDir


def test_demo_makes_its_films_and_keeps_only_colour_frames_of_persons(tmp_path, monkeypatch):
    monkeypatch.setenv("MHMD_WEIGHTS_DIR", str(tmp_path / "no-weights"))  # offline: the OpenCV detector
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "out"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "2 movies extracted, 0 failed" in result.output and "uses the OpenCV detector" in result.output
    work = WorkDir(tmp_path / "out" / "work")
    frames = manifest(work)
    colour_film = frames[frames.movie_id.str.startswith("colour-flashback")].set_index("timestamp")
    # 4 s zidane.jpg, 3 s black-and-white, 3 s sepia, 2 s black, 3 s blurred, 4 s bus.jpg (at 2 fps)
    segments = {"zidane": (0, 3.9), "grey": (4, 6.9), "sepia": (7, 9.9), "black": (10, 11.9),
                "blurred": (12, 14.9), "bus": (15, 18.9)}
    reasons = {name: set(colour_film.loc[a:b].reject_reason.dropna()) for name, (a, b) in segments.items()}
    assert reasons["grey"] == {"grayscale"} and reasons["sepia"] == {"tinted"}
    assert reasons["blurred"] == {"blurry"} and reasons["black"] <= {"grayscale", "dark"}
    for name in ("zidane", "bus"):
        kept = colour_film.loc[slice(*segments[name])].query("kept")
        assert len(kept) >= 1 and (kept.persons >= 1).all(), name
        assert reasons[name] <= {"duplicate"}, name  # a slow zoom gives near-duplicates, nothing worse
    scope = frames[frames.movie_id.str.startswith("scope")].set_index("timestamp")
    assert set(scope.loc[0:3.9].reject_reason.dropna()) <= {"no_person", "duplicate"} and not scope.loc[0:3.9].kept.any()
    assert scope.loc[4:].kept.any()
    crops = {s["movie_id"].split("-")[0]: s["crop"] for s in work.done("extract").values()}
    assert crops["colour"] is None and crops["scope"]["h"] == 272
    assert "detect rejected: no_person" in result.output
