"""Dataset loaders and the sharded batch iterator (CPU, a few seconds)."""

import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cmkernels import data
from cmkernels.data import ImageData, batches, load_dataset


def test_mnist_splits_shapes_and_range():
    data.clear_cache()
    start = time.process_time()  # CPU time: robust to other jobs sharing the cores.
    train = load_dataset("mnist")
    assert time.process_time() - start < 2.0  # Decoding the CSV from the wheel, uncached.
    test, full = load_dataset("mnist", "test"), load_dataset("mnist", "all")
    for d, n in ((train, 4000), (test, 1000), (full, 5000)):
        assert d.images.shape == (n, 1, 32, 32) and d.images.dtype == torch.float32
        assert d.labels.shape == (n,) and d.labels.dtype == torch.long and d.num_classes == 10
        assert d.images.min() == -1 and d.images.max() == 1
    assert torch.equal(full.labels.bincount(), torch.full((10,), 500))
    # train = first 4,000 of the permutation, test = the last 1,000.
    assert torch.equal(full.images[:4000], train.images)
    assert torch.equal(full.labels[4000:], test.labels)
    # The 28 -> 32 padding is background (-1).
    assert (train.images[..., :2, :] == -1).all() and (train.images[..., :, -2:] == -1).all()
    # Shuffled (stored sorted by class) yet each split holds every class.
    assert len(train.labels[:20].unique()) > 5 and len(test.labels.unique()) == 10


def test_mnist_permutation_is_fixed_and_seeded():
    a, b = load_dataset("mnist", "test"), load_dataset("mnist", "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    a.images.zero_()  # Callers get their own copy: the cache is not touched.
    assert torch.equal(load_dataset("mnist", "test").images, b.images)
    assert torch.equal(load_dataset("mnist", "all").labels[:8],
                       torch.tensor([4, 2, 0, 9, 6, 6, 2, 1]))
    assert not torch.equal(load_dataset("mnist", "test", seed=1).labels, b.labels)


def test_mnist_28():
    d = load_dataset("mnist", "train", image_size=28)
    assert d.images.shape == (4000, 1, 28, 28)
    assert torch.equal(d.images, load_dataset("mnist", "train").images[..., 2:30, 2:30])


def test_twemoji():
    train, test = load_dataset("twemoji"), load_dataset("twemoji", "test")
    assert train.images.shape == (3608, 3, 32, 32) and test.images.shape == (401, 3, 32, 32)
    assert train.labels is None and train.num_classes is None
    assert train.images.min() >= -1 and train.images.max() <= 1
    corners = train.images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (N, 3, 4)
    assert corners.median() == 1.0  # Transparent corners composited on white.
    assert torch.equal(load_dataset("twemoji", "test").images, test.images)
    big = load_dataset("twemoji", "test", image_size=64)
    assert big.images.shape == (401, 3, 64, 64)
    # Same split and order at both sizes: downsampled 64 px images stay close to the 32 px ones.
    small = torch.nn.functional.avg_pool2d(big.images, 2)
    assert (small - test.images).abs().mean() < 0.05


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        for i in range(3):
            pixels = rng.integers(0, 256, (8, 8, 3), np.uint8)
            _png(tmp_path / "labelled" / cls / f"{i}.png", pixels)
    d = load_dataset(tmp_path / "labelled")
    assert d.images.shape == (6, 3, 8, 8) and d.num_classes == 2
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.array(Image.open(tmp_path / "labelled" / "cat" / "0.png"))
    assert torch.allclose(d.images[0], torch.from_numpy(first).permute(2, 0, 1) / 127.5 - 1)

    # Root images: unlabelled, grayscale stays 1 channel.
    for i in range(2):
        _png(tmp_path / "gray" / f"{i}.png", rng.integers(0, 256, (8, 8), np.uint8))
    g = load_dataset(tmp_path / "gray", image_size=4)
    assert g.images.shape == (2, 1, 4, 4) and g.labels is None

    # RGBA: transparent pixels become white.
    rgba = np.zeros((8, 8, 4), np.uint8)
    _png(tmp_path / "rgba" / "a.png", rgba)
    assert (load_dataset(tmp_path / "rgba").images == 1).all()

    # Mixed sizes need image_size.
    _png(tmp_path / "gray" / "big.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="image_size"):
        load_dataset(tmp_path / "gray")
    assert load_dataset(tmp_path / "gray", image_size=8).images.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="no test split"):
        load_dataset(tmp_path / "gray", "test")

    # A folder with train/ and test/ gives those splits.
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            _png(tmp_path / "split" / split / "x" / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    assert len(load_dataset(tmp_path / "split", "test")) == 2
    assert len(load_dataset(tmp_path / "split", "all")) == 5


def test_corrupt_png_names_the_file(tmp_path):
    _png(tmp_path / "ok.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw"])
def test_npz(tmp_path, layout):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (5, 6, 6, 3 if layout != "nhw" else 1), np.uint8)
    array = {"nhwc": nhwc, "nchw": nhwc.transpose(0, 3, 1, 2), "nhw": nhwc[..., 0]}[layout]
    np.savez(tmp_path / "x.npz", images=array, labels=np.arange(5) % 2)
    d = load_dataset(tmp_path / "x.npz")
    expect = torch.from_numpy(nhwc).permute(0, 3, 1, 2) / 127.5 - 1
    assert torch.allclose(d.images, expect) and d.labels.tolist() == [0, 1, 0, 1, 0]
    assert d.num_classes == 2


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "first.npz", np.zeros((2, 4, 4, 3), np.uint8))  # Key arr_0: taken.
    assert load_dataset(tmp_path / "first.npz").images.shape == (2, 3, 4, 4)
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(tmp_path / "float.npz")
    raw = (tmp_path / "first.npz").read_bytes()
    (tmp_path / "broken.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="broken.npz"):
        load_dataset(tmp_path / "broken.npz")
    with pytest.raises(ValueError, match="test split"):
        load_dataset(tmp_path / "first.npz", "test")
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_dataset(tmp_path / "nothing")


def _cifar_batch(path, n, offset):
    rng = np.random.default_rng(offset)
    batch = {b"batch_label": b"fake batch", b"labels": [(offset + i) % 10 for i in range(n)],
             b"data": rng.integers(0, 256, (n, 3072), np.uint8),
             b"filenames": [b"img%d.png" % i for i in range(n)]}
    path.write_bytes(pickle.dumps(batch, protocol=2))  # Protocol of the real files.
    return batch


def test_cifar_folder(tmp_path):
    batches_ = [_cifar_batch(tmp_path / f"data_batch_{i}", 4, 4 * i) for i in range(1, 6)]
    test_batch = _cifar_batch(tmp_path / "test_batch", 3, 100)
    train = load_dataset(tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.num_classes == 10
    expect = torch.from_numpy(batches_[0][b"data"].reshape(4, 3, 32, 32)) / 127.5 - 1
    assert torch.allclose(train.images[:4], expect)
    assert train.labels[:8].tolist() == [4, 5, 6, 7, 8, 9, 0, 1]
    test = load_dataset(tmp_path, "test")
    assert test.labels.tolist() == test_batch[b"labels"]
    assert len(load_dataset(tmp_path, "all")) == 23


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_refuses_foreign_pickles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _cifar_batch(tmp_path / "test_batch", 2, 0)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match="data_batch_1.*refusing"):
        load_dataset(tmp_path, "train")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset(tmp_path, "test")


def test_unknown_inputs():
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "valid")


def test_batches_shard_disjointly_and_cover():
    n, batch_size, world_size = 30, 4, 3
    d = ImageData(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n), 10, "ids")
    global_iter = batches(d, batch_size * world_size, torch.Generator().manual_seed(5))
    ranks = [batches(d, batch_size, torch.Generator().manual_seed(5), r, world_size)
             for r in range(world_size)]
    seen = []
    for step in range(5):
        whole, whole_labels = next(global_iter)
        shards = [next(it) for it in ranks]
        for images, labels in shards:
            assert images.shape == (batch_size, 1, 1, 1)
            assert torch.equal(images.view(-1).long(), labels)
        ids = torch.cat([labels for _, labels in shards])
        assert torch.equal(ids, whole_labels)  # The shards tile the global batch in rank order.
        if step < 2:  # Inside the first epoch: no index twice across ranks.
            assert len(set(ids.tolist())) == batch_size * world_size
        seen.append(ids)
    stream = torch.cat(seen)  # 60 indices = two epochs; step 2 straddles them.
    for epoch in range(2):
        assert sorted(stream[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n:])  # Reshuffled each epoch.
    unlabelled = ImageData(d.images, None, None, "x")
    assert next(batches(unlabelled, 2, torch.Generator()))[1] is None
    with pytest.raises(ValueError):
        next(batches(d, 2, torch.Generator(), rank=3, world_size=3))
