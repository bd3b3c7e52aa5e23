import csv
import hashlib

import pytest

from mhmd_builder.weights import PINNED_FILE, PINNED_SHA256, WeightsError, check_pinned, sha256_of, verify_sha256


def test_pinned_hashes_are_data_in_the_package():
    with open(PINNED_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert PINNED_FILE.parent.name == "mhmd_builder"
    assert {row["file"] for row in rows} >= {"yolo11n.pt", "yolo11n-seg.pt", "resnet18-f37072fd.pth",
                                             "resnet50-0676ba61.pth"}
    assert PINNED_SHA256["yolo11n.pt"] == "0ebbc80d4a7680d14987a577cd21342b65ecfd94632bd9a8da63ae6417644ee1"
    # torchvision names its files after the first hex digits of their SHA-256
    assert PINNED_SHA256["resnet18-f37072fd.pth"].startswith("f37072fd")
    assert all(len(row["sha256"]) == 64 and int(row["bytes"]) > 0 for row in rows)


def test_a_pinned_name_must_have_its_hash_other_files_are_taken(tmp_path):
    fake = tmp_path / "yolo11n.pt"
    fake.write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match=r"yolo11n.pt: SHA-256 .* does not match the published 0ebbc80d4a7680d1"):
        check_pinned(fake)
    own = tmp_path / "finetuned.pt"
    own.write_bytes(b"mine")
    assert check_pinned(own) == own
    assert sha256_of(own) == hashlib.sha256(b"mine").hexdigest()
    assert verify_sha256(own, hashlib.sha256(b"mine").hexdigest()) == own
