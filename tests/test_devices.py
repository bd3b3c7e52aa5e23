import pytest
import torch
from click.testing import CliRunner

from mhmd_builder.cli import main
from mhmd_builder.devices import DeviceError, fixed_cpu_threads, machine_cores, pick_decoder, pick_device
from mhmd_builder.media import cuda_decoding_problem


def test_device_selection():
    assert pick_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            pick_device("cuda:0")


def test_decoder_selection_follows_what_ffmpeg_can_open():
    problem = cuda_decoding_problem()
    assert pick_decoder("cpu") == "cpu"
    assert pick_decoder("auto") == ("cpu" if problem else "cuda")
    if problem:
        assert "\n" not in problem and problem
        with pytest.raises(DeviceError, match=r"^--decoder cuda: ffmpeg cannot open a CUDA device on this machine \("):
            pick_decoder("cuda")
    else:
        assert pick_decoder("cuda") == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_gpu_is_one_line_for_every_command(tmp_path):
    """The device error is no detector's: colorize says it the same way detect does."""
    image = tmp_path / "photo.png"
    image.write_bytes(b"")
    result = CliRunner().invoke(main, ["historynet", "colorize", str(image), "--checkpoint", str(image),
                                       "-o", str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --device cuda: CUDA is not available on this machine (use --device cpu)"


def test_fixed_cpu_threads_sets_one_per_core_and_restores():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fixed_cpu_threads():
            assert torch.get_num_threads() == machine_cores()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
