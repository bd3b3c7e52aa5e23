"""mhmd_builder: build MHMD colorization training data from films."""
__version__ = "0.1.0"
