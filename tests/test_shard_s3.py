"""`mhmd shard -o s3://...`: shards published to an S3-compatible server (moto's, started here on
127.0.0.1: offline), compared byte for byte with a local run of the same work directory."""
import io
import socket
import sys
from pathlib import PurePosixPath
from types import SimpleNamespace

import fsspec
import pytest
import s3fs
from click.testing import CliRunner
from moto.server import ThreadedMotoServer
from PIL import Image

from mhmd_builder.cli import main
from mhmd_builder.errors import InputError
from mhmd_builder.manifest import manifest
from mhmd_builder.runners import LocalRunner
from mhmd_builder.shard import ShardSettings, shard
from mhmd_builder.shards import SHARD_NAME, folder_sizes, shard_output

from test_sample import copy_films
from test_shard import WIDS, expected_cls, run_recipe, tar_samples

BUCKET = "shards"


@pytest.fixture
def films(tmp_path_factory, tmp_path):
    return copy_films(tmp_path_factory, tmp_path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with an empty bucket, and the environment that points s3fs (botocore) at it,
    as a user would for an S3-compatible store: fs (an s3fs file system) and objects(prefix), what
    the prefix holds (name -> bytes)."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for variable, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                "AWS_DEFAULT_REGION": "us-east-1",
                                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            patch.setenv(variable, value)
        s3fs.S3FileSystem.clear_instance_cache()  # made before the environment above: not for this server
        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)

        def objects(prefix: str) -> dict[str, bytes]:
            fs.invalidate_cache()
            return {PurePosixPath(path).name: fs.cat_file(path) for path in fs.find(f"{BUCKET}/{prefix}")}

        yield SimpleNamespace(fs=fs, objects=objects)
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def test_shard_to_s3_publishes_a_local_runs_bytes_and_nothing_else_readable_with_the_recipe(films, s3, tmp_path,
                                                                                           capsys):
    local, url = tmp_path / "local", f"s3://{BUCKET}/cli"
    for out in (str(local), url):  # the CLI's own runner: forked writers, each uploading its tars
        result = CliRunner().invoke(main, ["shard", "-w", str(films.root), "-o", out, "--maxcount", "4"])
        assert result.exit_code == 0, result.output
    assert f"({url}/train-000000.tar .." in result.output and f"index: {url}/index.json" in result.output
    published = s3.objects("cli")
    assert len(published) > 5  # several tars, both wids indexes and index.json; no temporary object
    assert published == {path.name: path.read_bytes() for path in local.iterdir()}

    run_recipe("webdataset-s3", url, placeholder="s3://bucket/prefix")
    lines = capsys.readouterr().out.splitlines()
    train = [sample for tar in sorted(local.glob("train-*.tar")) for sample in tar_samples(tar)]
    assert lines == [f"{s['__key__']} {Image.open(io.BytesIO(s['jpg'])).size} {expected_cls(s)}"
                     for s in train]


@pytest.fixture
def uploads(monkeypatch):
    """The names of the objects s3fs puts, in order (tars and index files alike)."""
    names = []
    for method, where in (("_put_file", 1), ("_pipe_file", 0)):  # where: the argument that is the object's path
        original = getattr(s3fs.S3FileSystem, method)

        async def recorded(self, *args, _original=original, _where=where, **kwargs):
            names.append(PurePosixPath(args[_where]).name)
            return await _original(self, *args, **kwargs)

        monkeypatch.setattr(s3fs.S3FileSystem, method, recorded)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance binds its sync methods when it is made
    yield names
    s3fs.S3FileSystem.clear_instance_cache()


def test_index_json_goes_last_a_rerun_uploads_only_what_is_missing_and_a_failed_run_leaves_no_index(
        films, s3, uploads):
    url, settings = f"s3://{BUCKET}/run", ShardSettings(maxcount=4, test_fraction=0.3, seed=1)
    index = shard(films, url, settings, runner=LocalRunner(1))
    tars = [entry["name"] for entry in index["shards"]]
    assert sorted(uploads[:len(tars)]) == sorted(tars)
    assert sorted(uploads[len(tars):-1]) == WIDS and uploads[-1] == "index.json"
    first = s3.objects("run")

    uploads.clear()
    s3.fs.rm_file(f"{BUCKET}/run/{tars[1]}")
    assert shard(films, url, settings, runner=LocalRunner(1)) == index
    assert uploads[0] == tars[1] and sorted(uploads[1:-1]) == WIDS and uploads[-1] == "index.json"
    assert s3.objects("run") == first  # the missing tar again, the same bytes

    frame = manifest(films).query("kept").iloc[0]
    written = films.read_table("shard").set_index("frame_id").shard
    s3.fs.rm_file(f"{BUCKET}/run/{written[frame.frame_id]}")  # a tar to write again, whose JPEG is gone:
    (films.root / frame.jpeg).unlink()  # it fails, the run stops before the index, and the earlier one is gone
    with pytest.raises(InputError, match="tars could not be written"):
        shard(films, url, settings, runner=LocalRunner(1))
    assert "index.json" not in s3.objects("run")
    assert all(SHARD_NAME.match(name) or name in WIDS for name in s3.objects("run"))

    s3.fs.pipe_file(f"{BUCKET}/run/notes.txt", b"mine")
    with pytest.raises(InputError, match="holds files that are not shards"):
        shard(films, url, settings, runner=LocalRunner(1))
    assert s3.objects("run")["notes.txt"] == b"mine"


def test_s3_without_s3fs_names_the_extra_and_other_schemes_are_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)  # the class fsspec keeps
    with pytest.raises(InputError, match=r"s3fs.*install mhmd-builder's `s3` extra"):
        folder_sizes("s3://bucket/prefix")
    with pytest.raises(InputError, match="not to sftp://"):
        shard_output("sftp://host/shards")
    assert shard_output("s3://bucket/prefix/") == "s3://bucket/prefix"
