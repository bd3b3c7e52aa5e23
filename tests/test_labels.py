import csv
import io
import json
import os

import pytest

from mhmd_builder.labels import MAX_LABEL_FILE_BYTES, LabelFileError, check_label_file, import_labels, labelable_frames
from mhmd_builder.tables import human_labels_path, read_human_labels
from mhmd_builder.manifest import manifest
from test_sample import TAXONOMY, copy_films, movie_ids


@pytest.fixture
def films(tmp_path_factory, tmp_path):
    return copy_films(tmp_path_factory, tmp_path)


@pytest.fixture
def kept(films):
    """Frame ids that passed detection, per film title."""
    frames, ids = labelable_frames(films), movie_ids(films)
    return {title: frames[frames.movie_id == movie].frame_id.tolist() for title, movie in ids.items()}


def write(path, text):
    path.write_text(text)
    return path


def json_list(items, **options) -> str:
    """A JSON list with each element starting its own line (the line an element's problem names)."""
    return "[\n" + ",\n".join(json.dumps(item, **options) for item in items) + "\n]"


def test_bad_label_files_report_every_problem_by_line_and_write_nothing(films, kept, tmp_path):
    good = write(tmp_path / "first.csv", f"frame_id,label\n{kept['Zidane'][0]},during_ww2/usa/military\n")
    import_labels(films, good, TAXONOMY)
    before = human_labels_path(films).read_bytes()
    rejected = manifest(films).query("reject_reason == 'no_person'").frame_id.iloc[0]
    z, b = kept["Zidane"], kept["Bus"]
    bad = write(tmp_path / "bad.csv", "\n".join([
        "frame_id,label,era,nationality,garment",
        f"{z[1]},during_ww2/usa/militery,,,",                  # 2 unknown label (a typo)
        f"{z[2]},,during_ww2,usa,cowboy",                      # 3 unknown garment
        f"{z[3]},,before_ww2,japan,military",                  # 4 parts that make no label
        "stranger_0,after_ww2/usa/formal,,,",                  # 5 no such frame
        f"{rejected},after_ww2/usa/formal,,,",                 # 6 rejected by detection
        f"{b[0]},after_ww2/usa/formal,,,",                     # 7 fine alone...
        f"{b[0]},after_ww2/usa/formal,,,",                     # 8 ...but here twice
        f"{z[0]},during_ww2/usa/formal,,,",                    # 9 first.csv says military
        f"{b[1]},after_ww2/usa/formal,extra",                  # 10 malformed
        f"{b[2]},,1940s,usa,formal",                           # 11 unknown era
        f"{b[5]},,during_ww2,usa,",                            # a TODO row not done yet: skipped
        f"{b[3]},after_ww2/usa/formal,during_ww2,,",           # 13 label and era disagree
        f"{b[4]},,,,formal",                                   # 14 no era, no nationality, no metadata
    ]) + "\n")
    with pytest.raises(LabelFileError) as error:
        import_labels(films, bad, TAXONOMY)
    p = str(bad)
    assert error.value.problems == [
        f"{p}:2: frame {z[1]}: unknown label 'during_ww2/usa/militery' (did you mean during_ww2/usa/military?)",
        f"{p}:3: frame {z[2]}: unknown garment 'cowboy'",
        f"{p}:4: frame {z[3]}: before_ww2/japan/military is not a label of the taxonomy",
        f"{p}:5: frame stranger_0: no such frame in the work directory",
        f"{p}:6: frame {rejected}: was not kept (no_person)",
        f"{p}:8: frame {b[0]}: also on line 7",
        f"{p}:9: frame {z[0]}: during_ww2/usa/formal here, but during_ww2/usa/military in {good.resolve()}:2",
        f"{p}:10: 3 fields, the header has 5",
        f"{p}:11: frame {b[2]}: unknown era '1940s'",
        f"{p}:13: frame {b[3]}: label after_ww2/usa/formal but era 'during_ww2'",
        f"{p}:14: frame {b[4]}: no era and no nationality (and the movie metadata does not say)",
    ]
    assert str(error.value).startswith(f"{p}: 11 problems, nothing imported\n")
    assert human_labels_path(films).read_bytes() == before


def test_conflicts_with_movie_metadata_are_reported(films, kept, tmp_path):
    ids = movie_ids(films)
    metadata = {ids["Zidane"]: {"era": "during_ww2", "nationality": "germany"}}
    path = write(tmp_path / "labels.csv", "frame_id,label,era,nationality,garment\n"
                                          f"{kept['Zidane'][0]},during_ww2/usa/military,,,\n"
                                          f"{kept['Zidane'][1]},,after_ww2,,formal\n"
                                          f"{kept['Zidane'][2]},,,,informal\n")
    with pytest.raises(LabelFileError) as error:
        import_labels(films, path, TAXONOMY, metadata)
    assert [p.split(": ", 2)[2] for p in error.value.problems] == [
        "during_ww2/usa/military conflicts with the movie metadata (nationality germany)",
        "after_ww2/germany/formal conflicts with the movie metadata (era during_ww2)",
    ]
    assert [p.split(":")[1] for p in error.value.problems] == ["2", "3"]
    assert read_human_labels(films) is None


def test_reimport_is_idempotent_a_file_may_correct_itself_and_later_files_add(films, kept, tmp_path):
    z = kept["Zidane"]
    path = write(tmp_path / "a.csv", f"frame_id,label\n{z[0]},during_ww2/usa/military\n{z[1]},during_ww2/usa/formal\n")
    assert import_labels(films, path, TAXONOMY)["new"] == 2
    before = human_labels_path(films).read_bytes()
    summary = import_labels(films, path, TAXONOMY)
    assert (summary["new"], summary["changed"], summary["unchanged"], summary["total"]) == (0, 0, 2, 2)
    assert human_labels_path(films).read_bytes() == before
    # The same file, corrected: its own earlier label gives way.
    write(path, f"frame_id,label\n{z[0]},during_ww2/usa/military\n{z[1]},during_ww2/usa/informal\n")
    assert import_labels(films, path, TAXONOMY)["changed"] == 1
    # Another file: agreeing on z[0] is fine, and adds z[2].
    other = write(tmp_path / "b.csv", f"frame_id,label\n{z[0]},during_ww2/usa/military\n{z[2]},after_ww2/usa/formal\n")
    summary = import_labels(films, other, TAXONOMY)
    assert (summary["new"], summary["unchanged"], summary["total"]) == (1, 1, 3)
    human = read_human_labels(films).set_index("frame_id")
    assert human.label.to_dict() == {z[0]: "during_ww2/usa/military", z[1]: "during_ww2/usa/informal",
                                     z[2]: "after_ww2/usa/formal"}
    assert human.loc[z[0], "source"] == str(path.resolve())  # first to say it keeps the credit
    assert human.label_id.tolist() == [TAXONOMY.by_name(n).id for n in human.label]


def test_bad_label_studio_exports_report_task_lines(films, kept, tmp_path):
    def task(n, frame, choices, cancelled=False):
        result = [{"from_name": part, "to_name": "image", "type": "choices", "value": {"choices": values}}
                  for part, values in choices.items()]
        return {"id": n, "data": {"image": f"/data/local-files/?d=frames/x/{frame}.jpg"},
                "annotations": [{"id": n, "result": result, "was_cancelled": cancelled}]}

    z = kept["Zidane"]
    tasks = [task(1, z[0], {"era": ["during_ww2"], "nationality": ["usa"], "garment": ["military"]}),
             task(2, z[1], {"era": ["during_ww2", "after_ww2"], "nationality": ["usa"], "garment": ["formal"]}),
             task(3, "stranger_0", {"era": ["during_ww2"], "nationality": ["usa"], "garment": ["formal"]}),
             {"id": 4, "annotations": []},
             task(5, z[2], {"era": ["during_ww2"], "nationality": ["mars"], "garment": ["formal"]}, cancelled=True)]
    path = write(tmp_path / "export.json", json.dumps(tasks, indent=2))
    lines = path.read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line == "  {"]
    with pytest.raises(LabelFileError) as error:
        import_labels(films, path, TAXONOMY)
    assert error.value.problems == [
        f"{path}:{starts[1]}: task 2: 2 era choices, need one",
        f"{path}:{starts[1]}: frame {z[1]}: no era (and the movie metadata does not say)",
        f"{path}:{starts[2]}: frame stranger_0: no such frame in the work directory",
        f"{path}:{starts[3]}: not a Label Studio task (no data, or annotations not a list)",
    ]  # task 5 was skipped in Label Studio: not a label, not a problem
    write(path, '[\n {"id": 1,\n  "data": {}\n ]')
    with pytest.raises(LabelFileError, match=r"export.json:4: not JSON"):
        import_labels(films, path, TAXONOMY)
    assert read_human_labels(films) is None


def test_a_label_file_needs_frame_ids_and_labels(films, tmp_path):
    with pytest.raises(LabelFileError, match=r"no_ids.csv:1: need a frame_id column"):
        import_labels(films, write(tmp_path / "no_ids.csv", "image,label\nx.jpg,a/b/c\n"), TAXONOMY)
    with pytest.raises(LabelFileError, match=r"missing.csv: cannot read"):
        import_labels(films, tmp_path / "missing.csv", TAXONOMY)


def test_a_file_with_many_problems_lists_the_first_twenty_and_how_many_more(tmp_path):
    path = write(tmp_path / "big.csv", "frame_id,label\n" + "a,b,c\n" * 100_000)
    with pytest.raises(LabelFileError) as error:
        check_label_file(path)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{path}: 100000 problems, nothing imported"
    assert lines[1:] == [f"{path}:{n}: 3 fields, the header has 2" for n in range(2, 22)] + ["... and 99980 more"]
    assert len(error.value.problems) == 100_000


def test_semicolon_and_tab_separated_files_are_named_as_such(tmp_path):
    for name, separator in [("semicolon", ";"), ("tab", "\t")]:
        path = write(tmp_path / f"{name}.csv", f"frame_id{separator}label\nx_0{separator}a/b/c\n")
        with pytest.raises(LabelFileError, match=rf"^{path}:1: looks {name}-separated: save it comma-separated "
                                                 rf"\(nothing imported\)$"):
            check_label_file(path)


def test_label_studio_results_of_the_wrong_shape_are_problems_with_their_lines(tmp_path):
    def task(n, result):
        return {"id": n, "data": {"frame_id": f"x_{n}"}, "annotations": [{"id": n, "result": result}]}

    era = {"from_name": "era", "type": "choices"}
    tasks = [task(1, ["era: during_ww2"]), task(2, {"era": "during_ww2"}), task(3, [era]),
             task(4, [{**era, "value": "during_ww2"}]), task(5, [{**era, "value": {"choices": "during_ww2"}}])]
    path = write(tmp_path / "export.json", json_list(tasks))
    with pytest.raises(LabelFileError) as error:
        check_label_file(path)
    assert error.value.problems == [f"{path}:2: task 1: a result that is not an object ('era: during_ww2')",
                                    f"{path}:3: task 2: its annotation's result is not a list",
                                    f"{path}:4: task 3: no era choices, need one",
                                    f"{path}:5: task 4: no era choices, need one",
                                    f"{path}:6: task 5: no era choices, need one"]


# -- Label Studio's three exports, shaped as Label Studio writes them -------------------------------
# JSON: the tasks as Label Studio 1.x stores them. JSON-MIN and CSV: what label_studio_sdk's converter
# makes of those tasks (Converter.annotation_result_from_task and get_data, convert_to_json_min,
# utils.prettify_result and get_annotator, exports.csv2.convert and prepare_annotation), rewritten
# here for the Choices of our labeling config: the SDK itself drags in dozens of packages.

def annotation(n, parts, created, updated=None, cancelled=False, ground_truth=False, by=1):
    result = [{"value": {"choices": [value] if isinstance(value, str) else value}, "id": f"r{n}{part}",
               "from_name": part, "to_name": "image", "type": "choices", "origin": "manual"}
              for part, value in parts.items()]
    return {"id": n, "completed_by": by, "result": result, "was_cancelled": cancelled, "ground_truth": ground_truth,
            "created_at": created, "updated_at": updated or created, "draft_created_at": None, "lead_time": 4.2,
            "prediction": {}, "result_count": 0, "unique_id": f"u-{n}", "import_id": None, "last_action": None,
            "project": 1, "updated_by": by, "parent_prediction": None, "parent_annotation": None,
            "last_created_by": None}


def task(n, data, annotations=()):
    cancelled = sum(a["was_cancelled"] for a in annotations)
    return {"id": n, "annotations": [{**a, "task": n} for a in annotations], "file_upload": "tasks.json",
            "drafts": [], "predictions": [], "data": data, "meta": {}, "created_at": "2025-03-01T09:00:00.000000Z",
            "updated_at": "2025-03-01T09:00:00.000000Z", "inner_id": n, "total_annotations": len(annotations) - cancelled,
            "cancelled_annotations": cancelled, "total_predictions": 0, "comment_count": 0,
            "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1, "updated_by": 1,
            "comment_authors": []}


def converted(tasks):
    """annotation_result_from_task + get_data: an item per annotation not skipped, the newest created
    first; a task without annotations gives one item without one, a task with only skipped ones none."""
    for t in tasks:
        if not t["annotations"]:
            yield {"id": t["id"], "input": t["data"], "output": {}, "completed_by": {}, "annotation_id": None,
                   "created_at": None, "updated_at": None, "lead_time": None}
        kept = [a for a in t["annotations"] if not (a.get("skipped") or a.get("was_cancelled"))]
        for a in sorted(kept, key=lambda a: a.get("created_at", 0), reverse=True):
            output = {}
            for r in a["result"]:
                output.setdefault(r["from_name"], []).append({**r["value"], "type": "Choices"})
            yield {"id": t["id"], "input": t["data"], "output": output, "completed_by": a["completed_by"],
                   "annotation_id": a["id"], "created_at": a["created_at"], "updated_at": a["updated_at"],
                   "lead_time": a["lead_time"]}


def prettified(values):
    """prettify_result for Choices: one choice as a string, several as {"choices": [...]}."""
    out = [v["choices"][0] if len(v["choices"]) == 1 else {"choices": v["choices"]} for v in values]
    return out[0] if len(out) == 1 else out


def annotator(item, int_id):
    """get_annotator: the email of a user object, else the id (as text in the CSV)."""
    who = item["completed_by"]
    return who.get("email") if isinstance(who, dict) else who if int_id and isinstance(who, int) else str(who)


def annotation_fields(item, int_id):
    return {"annotator": annotator(item, int_id), "annotation_id": item["annotation_id"],
            "created_at": item["created_at"], "updated_at": item["updated_at"], "lead_time": item["lead_time"]}


def json_min_export(tasks):
    """convert_to_json_min: the task's data, its id, a key per control, the annotation's fields."""
    records = [{**item["input"], "id": item["id"], **{k: prettified(v) for k, v in item["output"].items()},
                **annotation_fields(item, int_id=True)} for item in converted(tasks)]
    return json_list(records, indent=2, ensure_ascii=False)


def csv_export(tasks):
    """csv2.convert: sorted columns, text quoted, several choices as compact JSON, \\r\\n line ends."""
    def cell(value):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    records = [{"id": item["id"], **{k: cell(prettified(v)) for k, v in item["output"].items()}, **item["input"],
                **annotation_fields(item, int_id=False)} for item in converted(tasks)]
    out = io.StringIO()
    writer = csv.DictWriter(out, sorted(set().union(*records)), quoting=csv.QUOTE_NONNUMERIC)
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


EXPORTS = {"json": lambda tasks: json.dumps(tasks, indent=2), "json-min": json_min_export, "csv": csv_export}


def export(tmp_path, fmt, tasks, name=None):
    path = tmp_path / (name or f"export.{fmt.replace('-min', '')}")
    path.write_text(EXPORTS[fmt](tasks))
    return path


def frame_data(films, frame):
    movie = frame.rsplit("_", 1)[0]
    assert (films.root / "frames" / movie / f"{frame}.jpg").is_file()
    return {"image": f"/data/local-files/?d=frames/{movie}/{frame}.jpg", "frame_id": frame, "movie_id": movie,
            "timestamp": 1.5}


def at(hour):
    return f"2025-03-02T{hour:02d}:00:00.000000Z"


def parts(era, nationality, garment):
    return {"era": era, "nationality": nationality, "garment": garment}


@pytest.mark.parametrize("fmt", EXPORTS)
def test_label_studio_exports_pick_one_annotation_per_task(films, kept, tmp_path, fmt):
    z, b = kept["Zidane"], kept["Bus"]
    war, peace = (lambda g: parts("during_ww2", "usa", g)), (lambda g: parts("after_ww2", "usa", g))
    image_only = {"image": frame_data(films, b[1])["image"]}  # a task made elsewhere: known by its image
    tasks = [
        # Corrected after the other annotator's: the latest change counts, not the latest created.
        task(1, frame_data(films, z[0]), [annotation(11, war("informal"), at(10), updated=at(12)),
                                          annotation(12, war("military"), at(11), by={"id": 2, "email": "b@x.org"})]),
        # A reviewer's ground truth, older: it wins where the export says so (JSON only).
        task(2, frame_data(films, z[1]), [annotation(21, war("formal"), at(10), ground_truth=True),
                                          annotation(22, war("military"), at(11), by=2)]),
        # Skipped later: the skip is no label, the earlier annotation counts.
        task(3, frame_data(films, z[2]), [annotation(31, war("military"), at(10)),
                                          annotation(32, war("formal"), at(11), cancelled=True, by=2)]),
        task(4, frame_data(films, z[3]), [annotation(41, war("formal"), at(10), cancelled=True)]),  # only skipped
        task(5, frame_data(films, z[4])),                                                            # not labelled
        # Same time: the higher id is the later one (10 > 9, though "10" < "9" as text).
        task(6, frame_data(films, b[0]), [annotation(10, peace("formal"), at(10)),
                                          annotation(9, peace("informal"), at(10), by=2)]),
        task(7, image_only, [annotation(71, peace("military"), at(10))]),
    ]
    summary = import_labels(films, export(tmp_path, fmt, tasks), TAXONOMY)
    human = read_human_labels(films).set_index("frame_id").label.to_dict()
    assert human == {z[0]: "during_ww2/usa/informal",
                     z[1]: "during_ww2/usa/formal" if fmt == "json" else "during_ww2/usa/military",
                     z[2]: "during_ww2/usa/military", b[0]: "after_ww2/usa/formal", b[1]: "after_ww2/usa/military"}
    # JSON-MIN and CSV leave out a task whose annotations were all skipped.
    assert (summary["new"], summary["unlabelled"]) == (5, 2 if fmt == "json" else 1)


def element_lines(path):
    """The line each task (JSON) or row (JSON-MIN, CSV) of an export starts on."""
    lines = path.read_text().splitlines()
    return [i + 1 for i, line in enumerate(lines) if line in ("{", "  {") or line[:1].isdigit() or line[:2] == '""']


def test_json_min_and_csv_have_a_row_per_annotation_and_the_one_that_counts_gives_the_line(films, kept, tmp_path):
    z = kept["Zidane"]

    def tasks(frame):  # 11 was changed last, 12 created last: the converter writes 12's row first
        return [task(1, frame_data(films, frame), [annotation(11, parts("during_ww2", "usa", "formal"), at(10), at(12)),
                                                   annotation(12, parts("during_ww2", "usa", "military"), at(11))])]

    rows = json.loads(json_min_export(tasks(z[0])))
    assert [(r["id"], r["annotation_id"], r["garment"]) for r in rows] == [(1, 12, "military"), (1, 11, "formal")]
    for fmt, frame in (("json-min", z[0]), ("csv", z[1])):
        path = export(tmp_path, fmt, tasks(frame))
        assert len(element_lines(path)) == 2
        import_labels(films, path, TAXONOMY)
        assert tuple(read_human_labels(films).set_index("frame_id").loc[frame, ["label", "line"]]) == \
            ("during_ww2/usa/formal", element_lines(path)[1])


@pytest.mark.parametrize("fmt", EXPORTS)
def test_label_studio_export_problems_are_reported_with_their_lines(films, kept, tmp_path, fmt):
    z, war = kept["Zidane"], parts("during_ww2", "usa", "military")
    tasks = [task(1, frame_data(films, z[0]), [annotation(11, war, at(10))]),
             task(2, frame_data(films, z[1]), [annotation(21, {"era": "during_ww2", "nationality": "usa"}, at(10))]),
             task(3, frame_data(films, z[2]), [annotation(31, {**war, "garment": ["formal", "military"]}, at(10))]),
             task(4, frame_data(films, z[3]), [annotation(41, war, "yesterday"), annotation(42, war, at(10))])]
    path = export(tmp_path, fmt, tasks)
    starts = element_lines(path)
    # JSON: a line per task; JSON-MIN and CSV: per annotation, task 4's "yesterday" sorting first.
    line = dict(zip([11, 21, 31, 41], starts)) if fmt == "json" else dict(zip([11, 21, 31, 41, 42], starts))
    with pytest.raises(LabelFileError) as error:
        import_labels(films, path, TAXONOMY)
    assert error.value.problems == [
        f"{path}:{line[21]}: frame {z[1]}: no garment (and the movie metadata does not say)",
        f"{path}:{line[31]}: task 3: 2 garment choices, need one",
        f"{path}:{line[31]}: frame {z[2]}: no garment (and the movie metadata does not say)",
        f"{path}:{line[41]}: task 4: annotation 41 was changed at 'yesterday', not a time: which annotation is "
        "the latest is unknown",
    ]
    assert read_human_labels(films) is None


def test_label_studio_before_1_0_completions_skipped_and_times_in_seconds(films, kept, tmp_path):
    z = kept["Zidane"]

    def completion(n, garment, created, **flags):
        result = [{"id": f"r{n}{part}", "from_name": part, "to_name": "image", "type": "choices",
                   "value": {"choices": [value]}} for part, value in parts("during_ww2", "usa", garment).items()]
        return {"id": n, "lead_time": 3.1, "result": result, "created_at": created, **flags}

    tasks = [{"completions": [completion(1001, "formal", 1596116000), completion(1002, "military", 1596117000)],
              "data": frame_data(films, z[0]), "id": 1},
             {"completions": [completion(2001, "formal", 1596116000), completion(2002, "military", 1596117000,
                                                                                 skipped=True)],
              "data": frame_data(films, z[1]), "id": 2}]
    import_labels(films, write(tmp_path / "completions.json", json.dumps(tasks, indent=2)), TAXONOMY)
    assert read_human_labels(films).set_index("frame_id").label.to_dict() == {
        z[0]: "during_ww2/usa/military", z[1]: "during_ww2/usa/formal"}


def test_the_format_is_told_from_the_content_whatever_the_name(films, kept, tmp_path):
    tasks = [task(1, frame_data(films, kept["Zidane"][0]), [annotation(11, parts("during_ww2", "usa", "military"), at(10))])]
    for fmt, name in (("json", "labels.csv"), ("json-min", "labels.csv"), ("csv", "labels.json")):
        path = export(tmp_path, fmt, tasks, name)
        summary = import_labels(films, path, TAXONOMY)
        assert (summary["labelled"], summary["unlabelled"]) == (1, 0)
    for name, content, reason in [
        ("object.json", '{"tasks": []}', ":1: not a Label Studio export (a JSON list of tasks or JSON-MIN rows)"),
        ("numbers.json", "\n[1, 2]", ":2: neither a Label Studio task (data, annotations) nor a JSON-MIN row "
                                     "(annotation_id): not a label file"),
        ("other.csv", "name,score\nx,1\n", ":1: need a frame_id column and a label column or era,nationality,garment "
                                          "columns, or a Label Studio export (JSON, JSON-MIN or CSV)"),
        ("image.csv", b"\x89PNG\r\n\x1a\n\0\0", ": not UTF-8 text (byte 0), so not a label file"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, ": JSON nested too deeply for a label file"),
        ("long.json", "[" + "9" * 5000 + "]", ": a number too long for a label file"),
        ("wide.csv", 'frame_id,label\nx_0,"' + "a" * 200_000 + '"\n', ":2: not CSV (field larger than field limit "
                                                                      "(131072))"),
    ]:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(LabelFileError) as error:
            check_label_file(path)
        assert str(error.value) == f"{path}{reason} (nothing imported)"


def test_label_files_too_large_or_not_regular_are_refused_unread(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as file:
        file.truncate(MAX_LABEL_FILE_BYTES + 1)  # sparse: takes no disk
    with pytest.raises(LabelFileError) as error:
        check_label_file(big)
    assert str(error.value) == (f"{big}: {MAX_LABEL_FILE_BYTES + 1:,} bytes, more than the {MAX_LABEL_FILE_BYTES:,} "
                                "a label file may have (nothing imported)")
    fifo = tmp_path / "labels.csv"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer for ever
    with pytest.raises(LabelFileError, match=rf"^{fifo}: not a regular file \(nothing imported\)$"):
        check_label_file(fifo)


def test_json_min_rows_of_the_wrong_shape_are_problems_with_their_lines(tmp_path):
    rows = [{"frame_id": "x_1", "id": [1], "annotation_id": 5, "era": 3, "nationality": ["usa", {"choices": "x"}],
             "garment": {"choices": ["formal", "military"]}},
            ["not", "a", "row"],
            {"frame_id": "x_2", "id": 2, "era": "during_ww2"}]
    path = write(tmp_path / "export.json", json_list(rows))
    with pytest.raises(LabelFileError) as error:
        check_label_file(path)
    assert error.value.problems == [f"{path}:2: task [1]: no era choices, need one",
                                    f"{path}:2: task [1]: no nationality choices, need one",
                                    f"{path}:2: task [1]: 2 garment choices, need one",
                                    f"{path}:3: not a Label Studio JSON-MIN row (no annotation_id)",
                                    f"{path}:4: not a Label Studio JSON-MIN row (no annotation_id)"]
