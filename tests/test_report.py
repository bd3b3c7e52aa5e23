"""`mhmd report` on the demo's work directory and shards; the page rendered in headless Chromium."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from collections import Counter

import cv2
import numpy as np
import pytest
import webdataset as wds

from mhmd_builder import report
from mhmd_builder.build import PIPELINES
from mhmd_builder.filter import refilter
from mhmd_builder.labeler import default_checkpoint, metrics_path
from mhmd_builder.manifest import manifest, status
from mhmd_builder.quality import QualityThresholds
from mhmd_builder.report import ReportError, write_report
from mhmd_builder.taxonomy import MHMD_TOTAL, load_taxonomy
from mhmd_builder.workdir import WorkDir

CHROMIUM = shutil.which("chromium")
# Records every image's naturalWidth (0: not loaded) on <body> once the page has loaded.
IMAGE_PROBE = ('<script>addEventListener("load", () => { document.body.dataset.imageWidths = '
               'JSON.stringify(Array.from(document.images, image => image.naturalWidth)); });</script>')


@pytest.fixture(scope="module")
def demo_report(demo_run, tmp_path_factory):
    """(demo output folder, report path, its text, seconds it took)."""
    out, output, code = demo_run
    assert code == 0, output
    path = tmp_path_factory.mktemp("report") / "report.html"
    started = time.monotonic()
    write_report(out / "work", path, recipe=PIPELINES / "demo.yaml")
    return out, path, path.read_text(), time.monotonic() - started


def attrs(text: str, key: str) -> dict[str, dict[str, str]]:
    """{data-KEY value: all data-* attributes of that element} for every element with data-KEY."""
    found = {}
    for tag in re.findall(rf"<[a-z]+ [^>]*data-{key}=[^>]*>", text):
        values = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag))
        found[values[key]] = values
    return found


def test_funnel_and_reject_reasons_are_the_manifests(demo_report):
    out, _, text, seconds = demo_report
    work = WorkDir(out / "work")
    frames, stages = manifest(work), status(work)
    index = json.loads((out / "shards" / "index.json").read_text())
    kept = frames[frames.kept.astype(bool)]
    steps = {step: int(a["frames"]) for step, a in attrs(text, "step").items()}
    assert steps == {"sampled": len(frames), "kept after quality": stages["extract"]["frames_out"],
                     "kept after persons": stages["detect"]["frames_out"], "labeled": int(kept.label.notna().sum()),
                     "in shards": sum(split["samples"] for split in index["splits"].values())}
    reasons = {reason: int(a["frames"]) for reason, a in attrs(text, "reason").items()}
    assert reasons == frames.reject_reason.value_counts().to_dict()
    assert {"grayscale", "tinted", "blurry", "no_person"} <= set(reasons)
    assert set(attrs(text, "movie")) == set(frames.movie_id)
    assert seconds < 30, seconds  # a few seconds on a quiet machine


def test_label_table_holds_the_manifests_counts_beside_the_papers(demo_report):
    out, _, text, _ = demo_report
    taxonomy = load_taxonomy()
    frames = manifest(WorkDir(out / "work"))
    kept = frames[frames.kept.astype(bool) & frames.label.notna()]
    table = attrs(text, "label")
    assert list(table) == taxonomy.names
    assert {name: int(a["frames"]) for name, a in table.items() if int(a["frames"])} == Counter(kept.label)
    assert sum(int(a["paper"]) for a in table.values()) == sum(label.paper_count for label in taxonomy.labels) \
        == MHMD_TOTAL
    assert "the paper 829 (290,870 / 351)" in text


def test_report_sections_say_what_they_show(demo_report):
    out, _, text, _ = demo_report
    assert re.search(r"https?:", text) is None and "<script" not in text and "<link" not in text
    for section in ("funnel", "labels", "hue", "samples", "rejected", "labeler", "shards", "settings"):
        assert f'<section id="{section}">' in text
    assert "weighted by its saturation" in text and "ImageNet" in text and "not drawn" in text
    metrics = json.loads(metrics_path(default_checkpoint(WorkDir(out / "work"))).read_text())
    assert f'data-accuracy="{metrics["accuracy"]}"' in text and "confusion matrix" in text
    assert f"Labelling every frame {metrics['majority']['label']} scores accuracy" in text
    assert "Recipe " in text and "fraction: 0.5" in text and '"sample": 0' in text.replace("&quot;", '"')
    # Every inline image decodes: plots (PNG) and thumbnails (JPEG), also of frames never encoded.
    images = re.findall(r'src="data:image/(png|jpeg);base64,([^"]+)"', text)
    assert len(images) >= 20
    assert all(cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR) is not None
               for _, data in images)
    assert "not readable" not in text


def test_report_on_a_shard_folder(demo_run, tmp_path):
    out, _, _ = demo_run
    index = json.loads((out / "shards" / "index.json").read_text())
    text = write_report(out / "shards", tmp_path / "shards.html").read_text()
    assert "needs the work directory" in text and re.search(r"https?:", text) is None
    total = sum((Counter(split["labels"]) for split in index["splits"].values()), Counter())
    assert {name: int(a["frames"]) for name, a in attrs(text, "label").items() if int(a["frames"])} == total
    per_split = {name: {split: int(a[split]) for split in index["splits"]}
                 for name, a in attrs(text, "split-label").items()}
    assert per_split == {name: {split: index["splits"][split]["labels"].get(name, 0) for split in index["splits"]}
                         for name in total}
    assert {split: int(a["samples"]) for split, a in attrs(text, "split").items()} == \
        {split: info["samples"] for split, info in index["splits"].items()}
    # The sample grid: up to 8 thumbnails per label of the first tar.
    first = Counter(json.loads(s["json"])["label"] for s in wds.WebDataset(
        str(out / "shards" / index["shards"][0]["name"]), shardshuffle=False))
    assert text.count("data:image/jpeg") == sum(min(n, 8) for n in first.values())


def test_missing_stages_get_a_section_saying_so(demo_run, tmp_path):
    out, _, _ = demo_run
    work = tmp_path / "work"
    for part in ("extract", "frames"):  # extracted, nothing after
        shutil.copytree(out / "work" / part, work / part)
    text = write_report(work, tmp_path / "r.html").read_text()
    assert "no frame has passed detection yet" in text and "no shards yet" in text
    assert "no frame is labeled yet" in text and "no labeler checkpoint at" in text
    assert attrs(text, "step")["kept after persons"]["frames"] == "0" and "not run yet" in text


def test_nothing_to_report_is_a_one_line_error(tmp_path):
    with pytest.raises(ReportError, match="no extracted frames here: run `mhmd extract`") as error:
        write_report(tmp_path / "empty", tmp_path / "r.html")
    assert "\n" not in str(error.value) and not (tmp_path / "r.html").exists()


def chromium(tmp_path, *args: str) -> str:
    """Headless Chromium with its own profile, no name resolving anything, a net log of what it
    fetched; returns what it printed on stdout."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
               f"--log-net-log={tmp_path / 'net.json'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def page_requests(tmp_path) -> list[str]:
    """URLs the page asked for: requests started for a page carry its origin ("null" for a file);
    the browser's own background requests carry none."""
    log = json.loads((tmp_path / "net.json").read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    begun = [e["params"] for e in log["events"] if e["type"] == start and "url" in e.get("params", {})]
    return [params["url"] for params in begun if params.get("initiator") != "not an origin"]


def image_widths(tmp_path, html_text: str) -> list[int]:
    probed = tmp_path / "probed.html"
    probed.write_text(html_text.replace("</body>", IMAGE_PROBE + "</body>"))
    dom = chromium(tmp_path, "--dump-dom", probed.as_uri())
    return json.loads(re.search(r'data-image-widths="([^"]*)"', dom).group(1).replace("&quot;", '"'))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_page_renders_offline_in_chromium(demo_report, tmp_path):
    _, path, text, _ = demo_report
    # The probes, on a page that loads something from outside: they see the request and the missing image.
    control = '<!doctype html><html><body><img src="https://example.com/x.png"></body></html>'
    assert image_widths(tmp_path, control) == [0]
    assert page_requests(tmp_path) == ["https://example.com/x.png"]

    widths = image_widths(tmp_path, text)
    assert len(widths) == text.count("<img ") >= 20 and all(w > 0 for w in widths)
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", path.as_uri())
    assert page_requests(tmp_path) == []
    image = cv2.imread(str(shot))
    assert image.shape[:2] == (3000, 1200)
    colours = np.unique(image.reshape(-1, 3) // 16, axis=0)
    assert image.std() > 20 and len(colours) > 50 and (image.min(axis=2) < 200).mean() > 0.05


def test_a_work_directory_is_counted_and_sampled_movie_by_movie_as_a_whole(synthetic_copy, tmp_path):
    """The page counts and picks its examples one movie at a time: the same numbers and the same
    frames as from the whole manifest at once."""
    work = synthetic_copy
    refilter(work, QualityThresholds())  # the decisions of a filter
    frames = manifest(work)
    text = write_report(work.root, tmp_path / "r.html").read_text()
    masks = report.funnel_masks(frames)
    assert {step: int(a["frames"]) for step, a in attrs(text, "step").items()} == \
        {step: int(mask.sum()) for step, mask in masks.items()}
    assert {reason: int(a["frames"]) for reason, a in attrs(text, "reason").items()} == \
        frames.reject_reason.value_counts().to_dict()
    assert list(attrs(text, "movie")) == sorted(frames.movie_id.unique())
    labeled = frames[masks["labeled"]]
    assert {name: int(a["frames"]) for name, a in attrs(text, "label").items() if int(a["frames"])} == \
        Counter(labeled.label)

    tally = report.Tally.of(work)
    groups = report.example_groups(frames)
    wanted = {key: 7 for key in groups}
    examples = report.spread_examples(work, tally, wanted)
    for key, positions in groups.items():
        group = frames.iloc[positions]
        assert tally.group_size(key) == len(group)
        expected = group.iloc[np.unique(np.linspace(0, len(group) - 1, 7).round().astype(int))] if len(group) > 7 \
            else group
        assert examples[key].frame_id.tolist() == expected.frame_id.tolist(), key


def test_examples_hold_their_own_rows_not_their_films(synthetic_work):
    """An example kept from each of the 6 films holds its row, not the film: pandas' rows of list
    columns are views of the whole film's Arrow buffers, which kept every film with an example alive
    (59 KB here then, against 9 KB; ~2.5 MB a film at the paper's 23,000 frames a film)."""
    import gc

    import pyarrow as pa

    tally = report.Tally.of(synthetic_work)
    film = next(report.movie_tables(synthetic_work))[1]
    gc.collect()
    before = pa.total_allocated_bytes()
    examples = report.spread_examples(synthetic_work, tally, {report.HUE: 6})
    gc.collect()
    assert examples[report.HUE].movie_id.nunique() == 6
    assert pa.total_allocated_bytes() - before < film.nbytes / 4
