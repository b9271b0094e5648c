"""Files that cannot be lost or silently wrong: atomic writes, checkpoint checksums, and the
messages for unreadable checkpoints (issue 13)."""

import argparse
import json

import numpy as np
import pytest
import torch

from cmkernels import images
from cmkernels.checkpoint import (
    CheckpointError,
    check_writable,
    load_file,
    save_atomic,
    save_checkpoint,
    write_text_atomic,
)


def _state():
    return {"format": "cmkernels", "model": {"w": torch.randn(64, 8), "b": torch.randn(8)},
            "step": 3, "config": {"lr": 1e-4, "rates": (0.9999,)}}  # fmt: skip


def test_checksum_is_verified_on_load(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "ck.pt")
    loaded = load_file(path)
    assert "checksum" not in loaded and loaded["step"] == 3
    raw = bytearray(path.read_bytes())
    at = raw.find(loaded["model"]["w"].numpy().tobytes())
    raw[at + 100:at + 164] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"ck\.pt is corrupt") as err:
        load_file(path)
    assert "\n" not in str(err.value)


def test_a_file_without_a_checksum_loads_as_before(tmp_path):
    torch.save(_state(), tmp_path / "old.pt")
    assert load_file(tmp_path / "old.pt")["step"] == 3
    plain = {"checksum": torch.ones(2), "w": torch.zeros(1)}  # a tensor may be called that
    torch.save(plain, tmp_path / "plain.pt")
    assert set(load_file(tmp_path / "plain.pt")) == {"checksum", "w"}


def test_a_failed_verification_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(_state(), tmp_path / "ck.pt")
    before = path.read_bytes()
    import cmkernels.checkpoint as ck

    def mismatch(state, source):  # what reached the disk does not match what was written
        raise CheckpointError(f"{source} is corrupt")

    monkeypatch.setattr(ck, "verify_checksum", mismatch)
    with pytest.raises(CheckpointError):
        save_checkpoint(_state(), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_empty_and_pickled_files_get_our_message(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)"):
        load_file(tmp_path / "empty.pt")
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError) as err:
        load_file(tmp_path / "pickle.pt")
    msg = str(err.value)
    assert "argparse.Namespace" in msg and "never unpickles" in msg
    assert "weights_only" not in msg and "\n" not in msg


@pytest.mark.parametrize("writer", ["text", "torch", "npz", "png"])
def test_writes_are_atomic(tmp_path, monkeypatch, writer):
    path = tmp_path / {"text": "m.json", "torch": "w.pt", "npz": "s.npz", "png": "s.png"}[writer]
    arr = np.zeros((2, 4, 4, 1), np.uint8)
    write = {
        "text": lambda: write_text_atomic(path, json.dumps({"step": 1})),
        "torch": lambda: save_atomic({"w": torch.ones(1)}, path),
        "npz": lambda: images.save_npz(path, arr),
        "png": lambda: images.save_grid(arr, path),
    }[writer]
    write()
    before = path.read_bytes()
    import os

    def crash(src, dst):  # the process dies before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_check_writable_names_the_flag(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="--json .*cannot write there"):
        check_writable(tmp_path / "file" / "sub", "--json")
    assert check_writable(tmp_path / "new" / "dir").is_dir()


def test_check_writable_without_creating(tmp_path):
    # create=False tries the nearest folder that exists and leaves the path as it was.
    assert check_writable(tmp_path / "a" / "b", "--out", create=False) == tmp_path
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"--out .*file/sub: the folder .*file is a file"):
        check_writable(tmp_path / "file" / "sub", "--out", create=False)
