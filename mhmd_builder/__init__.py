"""mhmd_builder: build MHMD colorization training data from films."""
from pathlib import Path

__version__ = "0.1.0"


def shipped(relative: str) -> Path:
    """A file shipped with the project (data_manifests/, pipelines/): beside the package in a
    checkout, inside it in a wheel (pyproject.toml force-includes both folders)."""
    here = Path(__file__).resolve().parent
    inside = here / relative
    return inside if inside.exists() else here.parent / relative
