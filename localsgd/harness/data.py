"""Datasets for the experiments: loading (CIFAR-10/100 pickles, MNIST/Fashion-MNIST IDX files), download
with checksums, per-epoch worker shards and vectorised augmentation.

Everything is held in memory as uint8 tensors; ``augment`` / ``normalize`` turn a batch into float32.
Every data problem raises :class:`DataError` with a one-line message naming the file or value.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[attr-defined,no-redef]

ImageDataset = Literal["cifar10", "cifar100", "mnist", "fashion-mnist"]
DATASETS: tuple[str, ...] = get_args(ImageDataset)


class DataError(ValueError):
    """A missing, corrupt or unexpected data file or value (the message is one line)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory: images uint8 (N, C, H, W) contiguous, labels int64 (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per-channel normalisation, in [0, 1] pixel units
    std: tuple[float, ...]


# ---------------------------------------------------------------------------------------------- tables

MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

BASE_URLS: dict[str, str] = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

# dataset -> {file name on the server: md5}. Module level so tests can substitute fixture checksums.
CHECKSUMS: dict[str, dict[str, str]] = {
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "cifar100": {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# CIFAR layouts: folder inside the archive, (train files, test files), label key, classes.
_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return name


def _hint(name: str, data_dir: Path) -> str:
    return f"get it with `localsgd download {name} --data-dir {data_dir}`"


# ---------------------------------------------------------------------------------------------- pickles

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only numpy's array reconstruction; any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"refused global {module}.{name} in pickle (only numpy array reconstruction is allowed)"
            ) from None


def _load_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    except Exception as err:  # truncated / corrupt: EOFError, UnpicklingError, ValueError, ...
        raise DataError(
            f"{path}: unreadable pickle, file truncated or corrupt ({type(err).__name__}: {_one_line(err)})"
        ) from None


def _read_cifar_file(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = _load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    entry = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
    missing = [k for k in (b"data", label_key) if k not in entry]
    if missing:
        found = sorted(repr(k) for k in entry)
        raise DataError(f"{path}: missing key(s) {', '.join(map(repr, missing))}; found {', '.join(found)}")
    data, labels = entry[b"data"], entry[label_key]
    if not (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
    ):
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{path}: b'data' is {desc}, expected uint8 array of shape (N, 3072)")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: {label_key!r} is not a list of ints") from None
    if y.shape != (data.shape[0],):
        raise DataError(
            f"{path}: {label_key!r} has shape {y.shape}, expected ({data.shape[0]},) like b'data'"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels out of range [{y.min()}, {y.max()}], expected 0..{num_classes - 1}")
    return data, y


def _cifar_dir(name: str, data_dir: Path) -> Path:
    folder, train, _, _, _ = _CIFAR[name]
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: directory not found; {_hint(name, data_dir)}")
    if (data_dir / folder).is_dir():
        data_dir = data_dir / folder
    for other, (other_folder, other_train, _, _, _) in _CIFAR.items():
        if other == name or (data_dir / train[0]).exists():
            continue
        if (data_dir / other_folder).is_dir() or (data_dir / other_train[0]).is_file():
            raise DataError(f"{data_dir}: holds the {other} layout, not {name}; load it as {other!r}")
    return data_dir


def _load_cifar(name: str, data_dir: Path) -> Dataset:
    directory = _cifar_dir(name, data_dir)
    _, train_files, test_files, label_key, num_classes = _CIFAR[name]

    def split(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for file in files:
            path = directory / file
            if not path.is_file():
                raise DataError(f"{path}: file not found; {_hint(name, data_dir)}")
            x, y = _read_cifar_file(path, label_key, num_classes)
            xs.append(x)
            ys.append(y)
        x = np.concatenate(xs).reshape(-1, 3, 32, 32)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = split(train_files)
    test_x, test_y = split(test_files)
    mean, std = MEAN_STD[name]
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes, mean, std)


# ---------------------------------------------------------------------------------------------- IDX


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file (plain or gzip): unsigned-byte payload with big-endian int32 magic and dims."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: unreadable, file truncated or corrupt ({_one_line(err)})") from None
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: IDX magic number {found}, expected {magic}")
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: truncated or corrupt, {len(raw) - header} data bytes"
            f" where shape {dims} needs {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(name: str, data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{data_dir / stem}: file not found (nor .gz); {_hint(name, data_dir)}")


def _load_idx(name: str, data_dir: Path) -> Dataset:
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: directory not found; {_hint(name, data_dir)}")
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, (image_stem, label_stem) in _IDX_FILES.items():
        image_path = _idx_path(name, data_dir, image_stem)
        label_path = _idx_path(name, data_dir, label_stem)
        images, labels = _read_idx(image_path, 2051), _read_idx(label_path, 2049)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{image_path}: images of shape {images.shape[1:]}, expected (28, 28)")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{label_path}: {labels.shape[0]} labels for {images.shape[0]} images")
        if labels.size and labels.max() >= 10:
            raise DataError(f"{label_path}: labels out of range (max {labels.max()}), expected 0..9")
        x = torch.from_numpy(images.reshape(-1, 1, 28, 28).copy())
        tensors[split] = x, torch.from_numpy(labels.astype(np.int64))
    mean, std = MEAN_STD[name]
    return Dataset(name, *tensors["train"], *tensors["test"], num_classes=10, mean=mean, std=std)


def load_dataset(name: str, data_dir: str | Path) -> Dataset:
    """Load a whole dataset into memory. For CIFAR, ``data_dir`` is the folder of the batch files or its
    parent; for (Fashion-)MNIST, the folder of the four IDX files (each optionally ``.gz``)."""
    _check_name(name)
    data_dir = Path(data_dir).expanduser()
    return _load_cifar(name, data_dir) if name in _CIFAR else _load_idx(name, data_dir)


# ---------------------------------------------------------------------------------------------- download


def default_data_dir(name: str) -> Path:
    """``$LOCALSGD_DATA/<name>`` if the variable is set, else ``~/.cache/localsgd/<name>``."""
    _check_name(name)
    root = os.environ.get("LOCALSGD_DATA")
    return (Path(root) if root else Path.home() / ".cache" / "localsgd").expanduser() / name


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, md5: str, progress: bool) -> None:
    """Download ``url`` to a temp file next to ``dest``, check its md5, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = tqdm(total=total, desc=dest.name, unit="B", unit_scale=True, disable=not progress)
            with bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        actual = digest.hexdigest()
        if actual != md5:
            raise DataError(f"{url}: md5 mismatch for {dest.name}: expected {md5}, got {actual}")
        os.replace(tmp, dest)
    except DataError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:
        if isinstance(err, urllib.error.HTTPError):
            err.close()  # it holds the open response
        raise DataError(f"could not download {url} ({_one_line(err)})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _extract_tar(archive: Path, dest: Path) -> None:
    """Extract the regular files of ``archive`` under ``dest``; refuse links, devices, absolute paths and
    ``..`` anywhere (checked for all members before anything is written). Each file is renamed into place."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name.replace("\\", "/")).parts
                if m.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise DataError(f"{archive}: refused unsafe member path {m.name!r}")
                if not (m.isfile() or m.isdir()):
                    raise DataError(f"{archive}: refused member {m.name!r} (not a regular file or folder)")
            for m in members:
                target = dest.joinpath(*PurePosixPath(m.name).parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(m)
                assert source is not None  # regular file
                fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as out:
                        while block := source.read(1 << 20):
                            out.write(block)
                    os.replace(tmp_name, target)
                finally:
                    Path(tmp_name).unlink(missing_ok=True)
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise DataError(f"{archive}: corrupt archive ({_one_line(err)})") from None


def download(name: str, data_dir: str | Path, base_url: str | None = None, progress: bool = True) -> Path:
    """Fetch the official files into ``data_dir`` (md5-checked), extract CIFAR archives safely, and return the
    directory ``load_dataset`` should be given. Files already present (and complete) are not fetched again.
    ``base_url`` replaces the official server."""
    _check_name(name)
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    base = (base_url or BASE_URLS[name]).rstrip("/") + "/"
    files = CHECKSUMS[name]
    if name in _CIFAR:
        folder, train, test, _, _ = _CIFAR[name]
        target = data_dir / folder
        if all((target / f).is_file() for f in train + test):
            return target
        for file, md5 in files.items():
            archive = data_dir / file
            _fetch(base + file, archive, md5, progress)
            try:
                _extract_tar(archive, data_dir)
            finally:
                archive.unlink(missing_ok=True)
        return target
    for file, md5 in files.items():
        dest = data_dir / file
        if not (dest.is_file() and _md5(dest) == md5):
            _fetch(base + file, dest, md5, progress)
    return data_dir


# ---------------------------------------------------------------------------------------------- batches


def _seed_from(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch); the same in every process and on every platform."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]) >> 1


def epoch_shards(n: int, workers: int, epoch: int, seed: int) -> list[torch.Tensor]:
    """A fresh permutation of ``range(n)`` per (seed, epoch), cut into ``workers`` disjoint contiguous
    slices of ``n // workers`` indices each (int64); the remainder is dropped, as in the paper's code."""
    for label, value, low in (("n", n, 1), ("workers", workers, 1), ("epoch", epoch, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"epoch_shards: {label}={value!r}, expected an int >= {low}")
    if workers > n:
        raise ValueError(f"epoch_shards: workers={workers} is more than n={n} samples")
    generator = torch.Generator().manual_seed(_seed_from(int(seed), int(epoch)))
    size = int(n) // int(workers)
    perm = torch.randperm(int(n), generator=generator)
    return [perm[k * size : (k + 1) * size].clone() for k in range(int(workers))]


def _channel_stats(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, ...]:
    if x.dtype != torch.uint8 or x.dim() < 3:
        raise ValueError(
            f"expected a uint8 image tensor (..., C, H, W), got {x.dtype} of shape {tuple(x.shape)}"
        )
    channels = x.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries, expected {channels} (channels)")
    return _per_channel(tuple(mean), x.device), _per_channel(tuple(std), x.device)


@functools.lru_cache(maxsize=32)
def _per_channel(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A (C, 1, 1) float32 tensor on ``device``, made once (a copy to a GPU waits for it to finish)."""
    return torch.tensor(values, device=device).view(len(values), 1, 1)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    m, s = _channel_stats(x, mean, std)
    return (x.to(torch.float32) / 255 - m) / s


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int = 4,
    flip: bool = True,
) -> torch.Tensor:
    """Standard CIFAR augmentation of a uint8 batch (B, C, H, W), vectorised: each image gets its own random
    crop of size (H, W) from the image zero-padded by ``crop_padding`` on every side, a horizontal flip with
    probability 1/2 (if ``flip``), then :func:`normalize`. Deterministic given ``generator``."""
    _channel_stats(x, mean, std)
    if x.dim() != 4:
        raise ValueError(f"augment expects a batch (B, C, H, W), got shape {tuple(x.shape)}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding={crop_padding}, expected >= 0")
    b, _, h, w = x.shape
    p = crop_padding
    padded = F.pad(x, (p, p, p, p)) if p else x
    dev = x.device  # the generator must live there too
    dy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=dev)
    rows = dy + torch.arange(h, device=dev)  # (B, H)
    cols = dx + torch.arange(w, device=dev)  # (B, W)
    if flip:
        flipped = torch.rand(b, 1, generator=generator, device=dev) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    index = (
        torch.arange(b, device=dev).view(b, 1, 1, 1),
        torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1),
    )
    crops = padded[index[0], index[1], rows[:, None, :, None], cols[:, None, None, :]]
    return normalize(crops, mean, std)
