import os

import cv2
import numpy as np
import pandas as pd
import pytest

from mhmd_builder.parsing import ParsingError, check_maps
from test_images import huge_png, peak_rss_growth


def frames(*ids: str) -> pd.DataFrame:
    return pd.DataFrame({"frame_id": list(ids), "width": 8, "height": 6, "kept": True, "reject_reason": None})


@pytest.mark.timeout(60)
def test_huge_maps_and_fifos_are_refused_without_decoding_or_waiting(tmp_path):
    cv2.imwrite(str(tmp_path / "m_0.png"), np.zeros((6, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "m_1.png"), np.zeros((7, 8), np.uint8))
    huge_png(tmp_path / "m_2.png", 9000, 9000)
    os.mkfifo(tmp_path / "m_3.png")
    problems = []
    growth = peak_rss_growth(lambda: problems.extend(check_maps(tmp_path, frames("m_0", "m_1", "m_2", "m_3"))))
    assert problems == ["m_1.png: 8x7, but the frame is 8x6",
                        f"{tmp_path / 'm_2.png'}: 9000x9000, more pixels than the 67,108,864 an image may have",
                        f"{tmp_path / 'm_3.png'}: not a regular file"]
    assert growth < 100 << 20


def test_a_long_list_of_problems_shows_the_first_ones_and_how_many_more():
    message = str(ParsingError([f"m_{i}.png: no extracted frame has the id m_{i}" for i in range(100)]))
    lines = message.splitlines()
    assert lines[0] == "100 invalid parsing maps, nothing attached:"
    assert lines[1:] == [f"m_{i}.png: no extracted frame has the id m_{i}" for i in range(20)] + ["... and 80 more"]
