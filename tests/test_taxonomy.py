import pytest

from mhmd_builder.taxonomy import DEFAULT_TAXONOMY, MHMD_TOTAL, TaxonomyError, load_taxonomy


def test_mhmd_taxonomy_has_the_papers_42_labels_and_counts():
    taxonomy = load_taxonomy()
    assert len(taxonomy) == 42 and [label.id for label in taxonomy.labels] == list(range(42))
    assert sum(label.paper_count for label in taxonomy.labels) == MHMD_TOTAL
    era_totals = {era: sum(l.paper_count for l in taxonomy.labels if l.era == era)
                  for era in ("before_ww2", "during_ww2", "after_ww2")}
    assert era_totals == {"before_ww2": 66_900, "during_ww2": 547_318, "after_ww2": 738_948}
    counts = [label.paper_count for label in taxonomy.labels]
    assert round(max(counts) / min(counts)) == 829  # the imbalance the paper reports
    assert taxonomy.by_name("during_ww2/japan/military").paper_count == 110_562
    assert {l.era for l in taxonomy.labels if l.nationality == "japan"} == {"during_ww2"}
    assert taxonomy.find("after_ww2", "china", "communist_military").paper_count == 290_870
    assert len(taxonomy.consistent_with(era="during_ww2", nationality="usa")) == 3
    assert len(taxonomy.sha256) == 64


def write(tmp_path, text):
    path = tmp_path / "taxonomy.csv"
    path.write_text(text)
    return path


def test_a_users_own_taxonomy_loads_without_paper_counts(tmp_path):
    path = write(tmp_path, "id,name,era,nationality,garment\n0,1870s/france/military,1870s,france,military\n"
                           "1,1870s/prussia/military,1870s,prussia,military\n")
    taxonomy = load_taxonomy(path)
    assert taxonomy.names == ["1870s/france/military", "1870s/prussia/military"]
    assert taxonomy.sha256 != load_taxonomy().sha256


@pytest.mark.parametrize("text,message", [
    ("id,name,era,nationality\n", "missing column(s) garment"),
    ("id,name,era,nationality,garment\n0,a/b/c,a,b,c\n0,a/b/d,a,b,d\n", "ids must be 0..1"),
    ("id,name,era,nationality,garment\n0,a/b/c,a,b,c\n1,a/b/c,a,b,c\n", "duplicate label names: a/b/c"),
    ("id,name,era,nationality,garment\n0,a/b/c,a,b,c\n1,x/y/z,a,b,d\n", ":3: name 'x/y/z' is not a/b/d"),
    ("id,name,era,nationality,garment\nzero,a/b/c,a,b,c\n", ":2: id and paper_count must be whole numbers"),
])
def test_bad_taxonomies_are_rejected_with_file_and_line(tmp_path, text, message):
    with pytest.raises(TaxonomyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_taxonomy(write(tmp_path, text))


def test_shipped_file_is_where_the_loader_looks():
    assert DEFAULT_TAXONOMY.is_file() and DEFAULT_TAXONOMY.parent.name == "data_manifests"
