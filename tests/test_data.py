"""Data loading, download, shards and augmentation (localsgd.harness.data). Fixtures are generated in
tmp_path; downloads are served from a local http.server on 127.0.0.1 (no network)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from localsgd.harness import data
from localsgd.harness.data import (
    DataError,
    augment,
    default_data_dir,
    download,
    epoch_shards,
    load_dataset,
    normalize,
)

REAL_CIFAR10 = Path(__file__).resolve().parents[2] / "shared/data/cifar-10-batches-py"
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

# ---------------------------------------------------------------------------------------------- fixtures


def write_pickle(path: Path, obj: object) -> None:
    """Protocol 3: bytes stay bytes and numpy arrays use _reconstruct, as in the official files."""
    path.write_bytes(pickle.dumps(obj, protocol=3))


def cifar_batch(n: int, num_classes: int, seed: int, label_key: bytes = b"labels") -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in np.arange(n) % num_classes],
        b"batch_label": b"fixture batch",
    }


def write_cifar10(folder: Path, n: int = 20) -> Path:
    """The official cifar-10-batches-py layout with ``n`` images per file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, file in enumerate(CIFAR10_FILES):
        write_pickle(folder / file, cifar_batch(n, 10, seed=i))
    write_pickle(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    return folder


def write_cifar100(folder: Path, n_train: int = 40, n_test: int = 24) -> Path:
    """The official cifar-100-python layout (files train, test, meta; fine and coarse labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        batch = cifar_batch(n, 100, seed, label_key=b"fine_labels")
        batch[b"fine_labels"] = [int(v) for v in (np.arange(n) * 7 + seed) % 100]
        batch[b"coarse_labels"] = [v % 20 for v in batch[b"fine_labels"]]  # type: ignore[attr-defined]
        write_pickle(folder / file, batch)
    write_pickle(folder / "meta", {b"fine_label_names": [b"f%d" % i for i in range(100)]})
    return folder


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, gz: bool, n_train: int = 30, n_test: int = 10) -> Path:
    """The four IDX files, plain or gzip-compressed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {
            f"{prefix}-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n, 28, 28)), 2051),
            f"{prefix}-labels-idx1-ubyte": idx_bytes(np.arange(n) % 10, 2049),
        }
        for name, raw in files.items():
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
    return folder


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(base url, served folder): an http.server thread on 127.0.0.1, bypassing any proxy."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "*")
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def error_message(call: functools.partial[object]) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.skipif(not REAL_CIFAR10.is_dir(), reason=f"real CIFAR-10 not found at {REAL_CIFAR10}")
def test_real_cifar10_shapes_dtypes_and_class_balance() -> None:
    """The real CIFAR-10 loads through the restricted unpickler: 50000/10000 uint8 (3, 32, 32) images,
    int64 labels 0..9 with every class present, exactly 1000 test images per class."""
    ds = load_dataset("cifar10", REAL_CIFAR10)
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert ds.train_x.dtype == ds.test_x.dtype == torch.uint8
    assert ds.train_x.is_contiguous() and ds.test_x.is_contiguous()
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    assert ds.train_y.shape == (50000,) and ds.test_y.shape == (10000,)
    assert torch.bincount(ds.train_y, minlength=10).min() > 0 and int(ds.train_y.max()) == 9
    assert torch.bincount(ds.test_y, minlength=10).tolist() == [1000] * 10
    assert ds.num_classes == 10 and ds.mean == (0.4914, 0.4822, 0.4465)


def test_cifar10_fixture_loads_from_folder_or_parent(tmp_path: Path) -> None:
    """The batch folder and its parent give the same dataset; rows are R, G, B planes of 32x32."""
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", n=20)
    a, b = load_dataset("cifar10", folder), load_dataset("cifar10", tmp_path)
    assert a.train_x.shape == (100, 3, 32, 32) and a.test_x.shape == (20, 3, 32, 32)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    first = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    assert torch.equal(a.train_x[0], torch.from_numpy(first.reshape(3, 32, 32)))


def test_cifar100_fixture_loads_fine_labels(tmp_path: Path) -> None:
    """The official cifar-100-python layout loads with 100 classes and labels from b"fine_labels"."""
    folder = write_cifar100(tmp_path / "cifar-100-python")
    for path in (folder, tmp_path):
        ds = load_dataset("cifar100", path)
        assert ds.num_classes == 100 and ds.train_x.shape == (40, 3, 32, 32) and ds.test_x.shape[0] == 24
        assert ds.train_y.tolist() == [int(v) for v in (np.arange(40) * 7 + 1) % 100]
        assert ds.mean == (0.5071, 0.4867, 0.4408) and ds.std == (0.2675, 0.2565, 0.2761)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_fixture_loads_plain_and_gz(tmp_path: Path, name: str, gz: bool) -> None:
    """IDX files (plain or .gz) load as uint8 (N, 1, 28, 28) images with int64 labels."""
    write_mnist(tmp_path, gz=gz)
    ds = load_dataset(name, tmp_path)
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == [i % 10 for i in range(30)] and ds.num_classes == 10
    assert len(ds.mean) == len(ds.std) == 1


@pytest.mark.parametrize("gz", [False, True])
def test_idx_wrong_magic_and_truncation_are_data_errors(tmp_path: Path, gz: bool) -> None:
    """A wrong magic number and a truncated file (plain or gzip) give a one-line DataError naming the file."""
    write_mnist(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images = tmp_path / f"train-images-idx3-ubyte{suffix}"
    good = images.read_bytes()
    raw = gzip.decompress(good) if gz else good
    bad_magic = (2049).to_bytes(4, "big") + raw[4:]
    images.write_bytes(gzip.compress(bad_magic) if gz else bad_magic)
    message = error_message(functools.partial(load_dataset, "mnist", tmp_path))
    assert images.name in message and "magic" in message and "2051" in message
    images.write_bytes(good[: len(good) // 2])
    message = error_message(functools.partial(load_dataset, "mnist", tmp_path))
    assert images.name in message and "truncated" in message


class Exploit:
    """Pickles as a call to os.system that would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_os_system(tmp_path: Path) -> None:
    """A pickle whose reduce calls os.system is refused before anything runs: DataError names the global
    and the marker file the command would create does not exist."""
    folder = write_cifar10(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    write_pickle(folder / "data_batch_1", {b"data": Exploit(marker), b"labels": []})
    message = error_message(functools.partial(load_dataset, "cifar10", folder))
    assert "refused" in message and f"{os.system.__module__}.system" in message
    assert not marker.exists()


def _missing_dir(folder: Path) -> str:
    return "directory not found"


def _missing_file(folder: Path) -> str:
    (folder / "data_batch_3").unlink()
    return "data_batch_3: file not found"


def _truncated(folder: Path) -> str:
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    return "truncated"


def _wrong_keys(folder: Path) -> str:
    write_pickle(folder / "data_batch_2", {b"images": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    return "missing key(s) b'data'"


def _wrong_length(folder: Path) -> str:
    write_pickle(folder / "data_batch_2", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})
    return "shape (2, 3000), expected uint8 array of shape (N, 3072)"


def _labels_out_of_range(folder: Path) -> str:
    write_pickle(folder / "data_batch_4", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    return "labels out of range"


def _label_count(folder: Path) -> str:
    write_pickle(folder / "data_batch_4", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    return "expected (2,)"


def _cifar100_layout(folder: Path) -> str:
    for file in [*CIFAR10_FILES, "batches.meta"]:
        (folder / file).unlink()
    write_cifar100(folder)
    return "holds the cifar100 layout, not cifar10"


@pytest.mark.parametrize(
    "corrupt",
    [
        _missing_dir,
        _missing_file,
        _truncated,
        _wrong_keys,
        _wrong_length,
        _labels_out_of_range,
        _label_count,
        _cifar100_layout,
    ],
)
def test_cifar_problems_give_one_line_data_errors(tmp_path: Path, corrupt: object) -> None:
    """Each kind of missing or corrupt CIFAR data raises DataError with one line naming the problem."""
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", n=4)
    if corrupt is _missing_dir:
        folder = tmp_path / "nowhere"
    expected = corrupt(folder)  # type: ignore[operator]
    message = error_message(functools.partial(load_dataset, "cifar10", folder))
    assert expected in message
    assert str(folder) in message


def test_missing_data_message_says_how_to_download(tmp_path: Path) -> None:
    """A missing dataset names the path and the download command; unknown names list the valid ones."""
    message = error_message(functools.partial(load_dataset, "mnist", tmp_path))
    assert (
        "train-images-idx3-ubyte" in message and f"localsgd download mnist --data-dir {tmp_path}" in message
    )
    assert "cifar10" in error_message(functools.partial(load_dataset, "imagenet", tmp_path))


def test_cifar10_folder_given_for_cifar100_is_refused(tmp_path: Path) -> None:
    """Asking for cifar100 in a CIFAR-10 folder says which layout it holds."""
    write_cifar10(tmp_path / "cifar-10-batches-py", n=4)
    assert "holds the cifar10 layout" in error_message(functools.partial(load_dataset, "cifar100", tmp_path))


# ---------------------------------------------------------------------------------------------- download


def test_default_data_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """LOCALSGD_DATA/<name> when set, else ~/.cache/localsgd/<name>."""
    monkeypatch.setenv("LOCALSGD_DATA", str(tmp_path))
    assert default_data_dir("cifar10") == tmp_path / "cifar10"
    monkeypatch.delenv("LOCALSGD_DATA")
    assert default_data_dir("mnist") == Path.home() / ".cache" / "localsgd" / "mnist"


def cifar10_archive(tmp_path: Path, target: Path) -> Path:
    folder = write_cifar10(tmp_path / "build" / "cifar-10-batches-py", n=4)
    members = {f"cifar-10-batches-py/{f.name}": f.read_bytes() for f in sorted(folder.iterdir())}
    return make_tar(target, members)


def test_download_checks_md5_then_extracts(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive whose md5 matches the table is extracted, the archive removed, and the result loads;
    a second call finds the data and fetches nothing."""
    url, root = server
    archive = cifar10_archive(tmp_path, root / "cifar-10-python.tar.gz")
    monkeypatch.setitem(data.CHECKSUMS, "cifar10", {archive.name: md5(archive)})
    dest = tmp_path / "dest"
    folder = download("cifar10", dest, base_url=url, progress=False)
    assert folder == dest / "cifar-10-batches-py"
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-batches-py"]
    assert load_dataset("cifar10", dest).train_x.shape == (20, 3, 32, 32)
    archive.unlink()  # nothing to serve: a refetch would fail
    assert download("cifar10", dest, base_url=url, progress=False) == folder


def test_download_through_the_command_line(
    server: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`localsgd download` fetches into --data-dir from --base-url and prints the folder; a bad
    name or a checksum mismatch is one line and exit code 2 (catches the CLI ignoring --data-dir
    or --base-url, which would reach the real server: none in this test)."""
    from localsgd.harness.cli import main

    url, root = server
    archive = cifar10_archive(tmp_path, root / "cifar-10-python.tar.gz")
    monkeypatch.setitem(data.CHECKSUMS, "cifar10", {archive.name: md5(archive)})
    dest = tmp_path / "dest"
    assert main(["download", "cifar10", "--data-dir", str(dest), "--base-url", url]) == 0
    assert capsys.readouterr().out.strip() == str(dest / "cifar-10-batches-py")
    assert load_dataset("cifar10", dest).train_x.shape == (20, 3, 32, 32)
    assert main(["download", "imagenet", "--data-dir", str(dest), "--base-url", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "imagenet" in err and "cifar10" in err
    monkeypatch.setitem(data.CHECKSUMS, "cifar10", {archive.name: "0" * 32})
    assert main(["download", "cifar10", "--data-dir", str(tmp_path / "other"), "--base-url", url]) == 2
    err = capsys.readouterr().err  # the progress bar, then the error on a line of its own
    ours = [line for line in err.splitlines() if line.startswith("localsgd: error: ")]
    assert len(ours) == 1 and "md5 mismatch" in ours[0] and "Traceback" not in err


def test_download_idx_files(
    server: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """MNIST-style downloads fetch the four .gz files, verified, into data_dir, which then loads; progress
    goes to stderr."""
    url, root = server
    write_mnist(root, gz=True)
    monkeypatch.setitem(data.CHECKSUMS, "fashion-mnist", {p.name: md5(p) for p in root.iterdir()})
    dest = download("fashion-mnist", tmp_path / "fm", base_url=url, progress=True)
    assert dest == tmp_path / "fm"
    assert sorted(p.name for p in dest.iterdir()) == sorted(data.CHECKSUMS["fashion-mnist"])
    assert load_dataset("fashion-mnist", dest).test_x.shape == (10, 1, 28, 28)
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err


def test_download_md5_mismatch_is_refused_and_removed(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong checksum raises DataError naming the file, expected and actual md5; nothing is left behind."""
    url, root = server
    archive = cifar10_archive(tmp_path, root / "cifar-10-python.tar.gz")
    wrong = "0" * 32
    monkeypatch.setitem(data.CHECKSUMS, "cifar10", {archive.name: wrong})
    dest = tmp_path / "dest"
    message = error_message(functools.partial(download, "cifar10", dest, base_url=url, progress=False))
    assert archive.name in message and wrong in message and md5(archive) in message
    assert list(dest.iterdir()) == []


def test_download_missing_file_on_server(server: tuple[str, Path], tmp_path: Path) -> None:
    """An HTTP error becomes a one-line DataError naming the URL, with no partial file left."""
    url, _ = server
    message = error_message(
        functools.partial(download, "mnist", tmp_path / "m", base_url=url, progress=False)
    )
    assert url in message and "404" in message
    assert list((tmp_path / "m").iterdir()) == []


@pytest.mark.parametrize("evil", ["../evil", "ABSOLUTE", "ok/../../evil"])
def test_download_refuses_unsafe_tar_members(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evil: str
) -> None:
    """A verified archive with an absolute or '..' member is refused before anything is written
    (the absolute member points into this test's own folder, never a shared system path)."""
    absolute = tmp_path / "evil-absolute"
    evil = str(absolute) if evil == "ABSOLUTE" else evil
    url, root = server
    archive = make_tar(root / "cifar-10-python.tar.gz", {"cifar-10-batches-py/x": b"fine", evil: b"owned"})
    monkeypatch.setitem(data.CHECKSUMS, "cifar10", {archive.name: md5(archive)})
    dest = tmp_path / "a" / "dest"
    message = error_message(functools.partial(download, "cifar10", dest, base_url=url, progress=False))
    assert "unsafe" in message and evil in message
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "a" / "evil").exists() and not absolute.exists()


# ---------------------------------------------------------------------------------------------- shards


@pytest.mark.parametrize(("n", "workers"), [(103, 4), (50000, 16), (7, 7)])
def test_epoch_shards_are_disjoint_equal_and_cover(n: int, workers: int) -> None:
    """K disjoint shards of floor(n/K) int64 indices each, together floor(n/K)*K distinct indices < n."""
    shards = epoch_shards(n, workers, epoch=3, seed=11)
    size = n // workers
    assert len(shards) == workers and all(s.shape == (size,) and s.dtype == torch.int64 for s in shards)
    union = torch.cat(shards)
    assert union.unique().numel() == size * workers and int(union.min()) >= 0 and int(union.max()) < n


def test_epoch_shards_depend_only_on_seed_and_epoch() -> None:
    """The same (seed, epoch) gives identical shards; another epoch or seed gives different ones."""
    a = epoch_shards(1000, 4, epoch=0, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, epoch_shards(1000, 4, epoch=0, seed=5), strict=True))
    for other in (epoch_shards(1000, 4, epoch=1, seed=5), epoch_shards(1000, 4, epoch=0, seed=6)):
        assert not torch.equal(torch.cat(a), torch.cat(other))
        assert not torch.equal(a[0].sort().values, other[0].sort().values)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0, 2, 0, 0), "n=0"),
        ((10, 0, 0, 0), "workers=0"),
        ((10, 2, -1, 0), "epoch=-1"),
        ((10, 2, 0, -3), "seed=-3"),
        ((3, 4, 0, 0), "workers=4"),
    ],
)
def test_epoch_shards_bad_values(args: tuple[int, int, int, int], name: str) -> None:
    """Bad values raise ValueError naming the value."""
    with pytest.raises(ValueError, match=name):
        epoch_shards(*args)


# ---------------------------------------------------------------------------------------------- augment

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def images(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def match_crops(x: torch.Tensor, out: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force over every (dy, dx) offset and flip: per image, the index of the first candidate equal to
    the output (-1 if none) and whether that candidate is flipped."""
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    found = torch.full((x.shape[0],), -1)
    flipped = torch.zeros(x.shape[0], dtype=torch.bool)
    index = 0
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, :, dy : dy + h, dx : dx + w]
            for flip in (False, True):
                candidate = normalize(crop.flip(-1) if flip else crop, MEAN, STD)
                hit = (candidate == out).flatten(1).all(1) & (found < 0)
                found[hit], flipped[hit] = index, flip
                index += 1
    return found, flipped


def test_augment_shape_dtype_and_identity_case() -> None:
    """float32 output of the input's shape; without padding and flips it is exactly normalize."""
    x = images(8)
    g = torch.Generator().manual_seed(0)
    out = augment(x, g, MEAN, STD)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(augment(x, g, MEAN, STD, crop_padding=0, flip=False), normalize(x, MEAN, STD))
    expected = (x[0, 1].float() / 255 - MEAN[1]) / STD[1]
    assert torch.allclose(normalize(x, MEAN, STD)[0, 1], expected)


def test_augment_outputs_are_padded_crops_possibly_flipped() -> None:
    """Every output image equals one of the 81 crops x 2 flips of its zero-padded input (brute force)."""
    x = images(12)
    out = augment(x, torch.Generator().manual_seed(1), MEAN, STD, crop_padding=4)
    found, _ = match_crops(x, out, pad=4)
    assert (found >= 0).all()


def test_augment_offsets_and_flips_are_per_image() -> None:
    """Over a large batch, about half the images are flipped and all 81 offsets occur."""
    x = images(3000, size=8, seed=2)
    out = augment(x, torch.Generator().manual_seed(3), MEAN, STD, crop_padding=4)
    found, flipped = match_crops(x, out, pad=4)
    assert (found >= 0).all()
    assert 0.45 < flipped.float().mean().item() < 0.55
    assert (found // 2).unique().numel() == 81


def test_augment_is_deterministic_given_the_generator() -> None:
    """The same generator seed gives the same batch; another seed gives a different one."""
    x = images(16)
    a = augment(x, torch.Generator().manual_seed(7), MEAN, STD)
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(7), MEAN, STD))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(8), MEAN, STD))


def test_normalize_and_augment_reject_bad_input() -> None:
    """Float input or a mean of the wrong length is a ValueError."""
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 3, 4, 4), MEAN, STD)
    with pytest.raises(ValueError, match="channels"):
        augment(images(2), torch.Generator(), (0.5,), (0.5,))
