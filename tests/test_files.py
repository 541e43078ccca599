"""Every file peftc writes goes through rewrite.files: whole or not at all, and with the mode a
plain open() gives under the umask (adapters, ONNX with its external data, reports, plans)."""

import contextlib
import os
from pathlib import Path

import pytest

import lowering.onnx as lo
import peftc
from rewrite.files import plain_file_mode, staged, write_atomic
from tests.models import convnet, image_inputs

UMASK = 0o027  # not the usual 0o022, and not 0o077 (which gives mkstemp's private 0600 anyway)


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_plain_mode_follows_the_umask(tmp_path):
    with umask(UMASK):
        (tmp_path / "plain").write_text("x")
        assert plain_file_mode() == _mode(tmp_path / "plain") == 0o640


def test_private_writer_output_gets_the_plain_mode(tmp_path):
    with umask(UMASK), staged(tmp_path / "weights.bin") as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as mkstemp or a library might
        os.write(fd, b"w")
        os.close(fd)
    assert _mode(tmp_path / "weights.bin") == 0o640


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(OSError, match="No space"), staged(path) as tmp:
        tmp.write_bytes(b"half a model")  # a partial write, then the disk fills up
        (tmp.parent / "model.onnx.data").write_bytes(b"half the weights")
        raise OSError("No space left on device")
    assert path.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder .*nowhere does not exist"):
        write_atomic(tmp_path / "nowhere" / "plan.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_writes_nothing_fails(tmp_path):
    with pytest.raises(RuntimeError, match="wrote no file"), staged(tmp_path / "a.json"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_adapter_and_onnx_files_are_readable_like_plain_files(tmp_path, monkeypatch):
    model = convnet()
    spec = {"adapters": [{"method": "lora", "targets": ["*"], "rank": 2}]}
    adapted = peftc.compile(model, spec, image_inputs(2))
    # Force the external-data layout so the side file's mode is checked too.
    monkeypatch.setattr(lo, "EXTERNAL_DATA_BYTES", 0)
    with umask(UMASK):
        adapted.save_adapter(tmp_path / "adapter")
        adapted.export_onnx(tmp_path / "onnx" / "model.onnx")
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    names = [p.name for p in written]
    assert names == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "model.onnx",
        "model.onnx.data",
    ]
    assert {p.name: _mode(p) for p in written} == dict.fromkeys(names, 0o640)
