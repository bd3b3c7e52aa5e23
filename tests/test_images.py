import os
import resource
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from ultralytics.utils import ASSETS

from mhmd_builder import images
from mhmd_builder.images import ImageError, open_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(path, width: int = 30000, height: int = 30000):
    """A valid black 1-bit PNG of width x height pixels in a small file (rows compressed one by one,
    so making it costs no memory): decoding it would take width x height bytes or more."""
    packer, row, idat = zlib.compressobj(9), bytes(1 + (width + 7) // 8), []
    for _ in range(height):
        idat.append(packer.compress(row))
    idat.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(idat))
                     + _chunk(b"IEND", b""))
    return path


def peak_rss_growth(action) -> int:
    """How many bytes the process's peak memory grew while `action` ran."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    action()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # Linux: kB


@pytest.mark.parametrize("width, height", [(30000, 30000), (9000, 9000)])
def test_a_small_file_claiming_a_huge_size_is_refused_from_its_header(tmp_path, width, height):
    bomb = huge_png(tmp_path / "bomb.png", width, height)
    assert bomb.stat().st_size < 1 << 20

    def refuse():
        with pytest.raises(ImageError, match=rf"^{bomb}: .*more pixels than the 67,108,864 an image may have$"):
            open_image(bomb)

    assert peak_rss_growth(refuse) < 100 << 20


@pytest.mark.timeout(20)
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match=rf"^{fifo}: not a regular file$"):
        open_image(fifo)


def test_files_too_large_or_not_images_are_refused_and_images_decode(tmp_path, monkeypatch):
    good, garbage = tmp_path / "good.png", tmp_path / "garbage.jpg"
    cv2.imwrite(str(good), np.full((3, 5, 3), 7, np.uint8))
    garbage.write_bytes(b"not an image at all")
    image = open_image(good)
    assert (image.width, image.height) == (5, 3) and image.decode().shape == (3, 5, 3)
    with pytest.raises(ImageError, match=rf"^{garbage}: cannot be read as an image$"):
        open_image(garbage)
    with pytest.raises(ImageError, match=rf"^{tmp_path / 'missing.png'}: cannot read"):
        open_image(tmp_path / "missing.png")
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(ImageError, match=rf"^{good}: \d+ bytes, more than the 10 an image may have$"):
        open_image(good)


def test_decode_jpegs_gives_load_frames_pixels_and_none_for_each_bad_jpeg(tmp_path):
    """On the CPU, torchvision and OpenCV decode with libjpeg alike: the same pixels, RGB CHW. A
    corrupt JPEG in the batch is None in its place and the others still come out."""
    paths = []
    for i, (size, quality) in enumerate([((160, 120), 95), ((161, 121), 50), ((64, 64), 95)]):
        frame = cv2.resize(cv2.imread(str(ASSETS / "bus.jpg")), size, interpolation=cv2.INTER_AREA)
        paths.append(tmp_path / f"{i}.jpg")
        cv2.imwrite(str(paths[-1]), frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    good = paths[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "text.jpg").write_text("not a jpeg")
    paths[1:1] = [tmp_path / "cut.jpg", tmp_path / "text.jpg"]
    decoded = images.decode_jpegs([images.read_frame(p) for p in paths], "cpu")
    assert decoded[1] is None and decoded[2] is None and images.load_frame(paths[1]) is None
    for path, image in zip(paths[::3] + paths[3:4], decoded[::3] + decoded[3:4]):
        expected = images.load_frame(path)[:, :, ::-1].transpose(2, 0, 1)
        assert image.dtype == torch.uint8 and np.abs(image.numpy().astype(int) - expected).max() <= 1
    assert images.decode_jpegs([], "cpu") == []
    assert images.read_frame(tmp_path / "missing.jpg") is None
