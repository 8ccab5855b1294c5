"""Tests for datasets.py: seeded 70/10/20 task splits, loaders on canonical-format fakes, checksums, augmentation."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D


def _md5(path: Path) -> str:
    """md5 hex digest of a file."""
    return hashlib.md5(path.read_bytes()).hexdigest()


def _all_batches(split: D.Split, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every batch of a split: x [n, C, H, W], y [n]."""
    xs, ys = zip(*split.batches(16, **kw))
    return torch.cat(xs), torch.cat(ys)


def _check_splits(task: D.Task, pool: torch.Tensor) -> None:
    """Assert the task's splits are disjoint, cover ``pool`` and are sized 70/10/20 within rounding."""
    parts = [task.train.indices, task.val.indices, task.test.indices]
    together = torch.cat(parts)
    assert len(set(together.tolist())) == len(together)
    assert sorted(together.tolist()) == sorted(pool.tolist())
    n = len(pool)
    for part, frac in zip(parts, D.SPLIT_FRACTIONS):
        assert abs(len(part) - frac * n) <= 1.5


# ----------------------------------------------------------------------------- fake MNIST

def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """Write a gzipped IDX file: big-endian magic, dims, uint8 data."""
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 50 + 20 image MNIST in the canonical raw/ layout, its md5s patched into datasets.MD5."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28))
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    for name in D.MNIST_FILES:
        monkeypatch.setitem(D.MD5, name, _md5(raw / name))
    return tmp_path


def test_pmnist_identity_first_task_and_distinct_permutations(fake_mnist: Path) -> None:
    images, labels = D.load_mnist(fake_mnist)
    assert images.shape == (70, 1, 28, 28) and images.dtype == torch.uint8
    bench = D.get_benchmark("pmnist", 3, seed=0, data_dir=str(fake_mnist), download=False)
    assert (bench.num_tasks, bench.classes_per_task, bench.input_shape) == (3, 10, (1, 28, 28))
    base = (images.float() / 255 - 0.1307) / 0.3081
    firsts = []
    for task in bench.tasks:
        assert task.classes == list(range(10))
        _check_splits(task, torch.arange(70))
        x, y = _all_batches(task.test)
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
        assert torch.equal(y, labels[task.test.indices])  # local label = digit
        firsts.append(x[0].flatten())
        ref = base[task.test.indices]
        if task.index == 0:
            assert torch.allclose(x, ref)
        else:
            assert not torch.allclose(x, ref)
            assert torch.equal(x.flatten(1).sort(1).values, ref.flatten(1).sort(1).values)  # a pixel permutation
    perms = [t.train.source.perm for t in bench.tasks[1:]]
    assert not torch.equal(perms[0], perms[1])
    permuted = D.get_benchmark("pmnist", 3, seed=0, data_dir=str(fake_mnist), pmnist_first="permuted")
    assert permuted.tasks[0].train.source.perm is not None
    assert torch.equal(permuted.tasks[1].train.source.perm, perms[0])
    x0, _ = _all_batches(permuted.tasks[0].test)
    assert not torch.allclose(x0, base[permuted.tasks[0].test.indices])


def test_splitmnist_seeded_class_order(fake_mnist: Path) -> None:
    a = D.get_benchmark("splitmnist", None, seed=1, data_dir=str(fake_mnist))
    b = D.get_benchmark("splitmnist", None, seed=1, data_dir=str(fake_mnist))
    c = D.get_benchmark("splitmnist", None, seed=2, data_dir=str(fake_mnist))
    assert a.num_tasks == 5 and a.classes_per_task == 2
    assert sorted(sum((t.classes for t in a.tasks), [])) == list(range(10))
    assert [t.classes for t in a.tasks] == [t.classes for t in b.tasks] != [t.classes for t in c.tasks]
    _, labels = D.load_mnist(fake_mnist)
    for task in a.tasks:
        _check_splits(task, torch.nonzero(torch.isin(labels, torch.tensor(task.classes))).flatten())
        _, y = _all_batches(task.train, augment=True)
        assert torch.equal(torch.tensor(task.classes)[y], labels[task.train.indices])
    with pytest.raises(D.DataError, match=r"valid task counts: \[1, 2, 5, 10\]"):
        D.get_benchmark("splitmnist", 3, seed=0, data_dir=str(fake_mnist))


def test_corrupt_mnist_rejected_by_md5(fake_mnist: Path) -> None:
    target = fake_mnist / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    expected = D.MD5[target.name]
    with open(target, "r+b") as f:
        f.seek(10)
        f.write(b"\xff\x00garbage")
    with pytest.raises(D.DataError, match="md5") as err:
        D.get_benchmark("pmnist", 2, seed=0, data_dir=str(fake_mnist))
    assert str(target) in str(err.value) and expected in str(err.value) and "re-download" in str(err.value)
    with pytest.raises(D.DataError, match="md5"):
        D.check_data("splitmnist", str(fake_mnist))


def test_missing_mnist_lists_expected_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(D.DataError) as err:
        D.get_benchmark("pmnist", None, seed=0, data_dir=str(tmp_path), download=False)
    for name in D.MNIST_FILES:
        assert str(tmp_path / "MNIST" / "raw" / name) in str(err.value)
    assert "--data-dir" in str(err.value) and "SNV_DATA_DIR" in str(err.value)

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(D.DataError, match="ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"):
        D.get_benchmark("splitmnist", None, seed=0, data_dir=str(tmp_path))
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # no partial file left
    with pytest.raises(D.DataError, match="MNIST"):
        D.check_data("pmnist", str(tmp_path))


def test_download_verifies_md5_and_renames(fake_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = fake_mnist / "MNIST" / "raw"
    payload = {name: (raw / name).read_bytes() for name in D.MNIST_FILES}
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload[url.rsplit("/", 1)[1]]))
    root = tmp_path / "fresh"
    bench = D.get_benchmark("splitmnist", 5, seed=0, data_dir=str(root))
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(D.MNIST_FILES)
    assert len(bench.tasks) == 5
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not mnist"))
    bad = tmp_path / "bad"
    with pytest.raises(D.DataError, match="md5"):
        D.get_benchmark("splitmnist", 5, seed=0, data_dir=str(bad))
    assert not any(p.is_file() for p in bad.rglob("*"))


def test_real_mnist() -> None:
    root = os.environ.get("SNV_DATA_DIR")
    if not root or not all((Path(root) / "MNIST" / "raw" / n).is_file() for n in D.MNIST_FILES):
        pytest.skip("real MNIST not available (set SNV_DATA_DIR to the folder containing MNIST/raw)")
    D.check_data("pmnist", None)
    images, labels = D.load_mnist(D.resolve_data_dir(None))
    assert images.shape == (70000, 1, 28, 28) and labels.bincount().tolist()[1] == 6742 + 1135
    bench = D.get_benchmark("pmnist", None, seed=42, data_dir=None)
    assert bench.num_tasks == 10
    task = bench.tasks[3]
    assert (len(task.train), len(task.val), len(task.test)) == (49000, 7000, 14000)
    x, y = next(task.train.batches(10, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (10, 1, 28, 28) and y.dtype == torch.int64 and int(y.max()) < 10
    assert abs(float(_all_batches(bench.tasks[0].val)[0].mean())) < 0.05  # normalised


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_splits_determinism_and_labels() -> None:
    a, b, c = (D.get_benchmark("synthetic", None, seed=s) for s in (0, 0, 1))
    assert (a.num_tasks, a.classes_per_task, a.input_shape) == (3, 2, (3, 8, 8))
    assert sorted(sum((t.classes for t in a.tasks), [])) == list(range(6))
    for ta, tb in zip(a.tasks, b.tasks):
        assert ta.classes == tb.classes
        assert all(torch.equal(sa.indices, sb.indices) for sa, sb in
                   ((ta.train, tb.train), (ta.val, tb.val), (ta.test, tb.test)))
    assert any(not torch.equal(ta.train.indices, tc.train.indices) for ta, tc in zip(a.tasks, c.tasks))
    source = a.tasks[0].train.source
    prototypes = torch.stack([source.data[c * 60:(c + 1) * 60].mean(0) for c in range(6)])
    assert torch.cdist(prototypes.flatten(1), prototypes.flatten(1)).add(torch.eye(6) * 1e3).min() > 5
    for task in a.tasks:
        _check_splits(task, torch.cat([torch.arange(c * 60, (c + 1) * 60) for c in task.classes]))
        assert (len(task.train), len(task.val), len(task.test)) == (84, 12, 24)
        x, y = _all_batches(task.train)
        assert x.dtype == torch.float32 and set(y.tolist()) == {0, 1}
        assert torch.equal(torch.tensor(task.classes)[y], task.train.indices // 60)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    y1 = _all_batches(a.tasks[0].train, shuffle=True, generator=g1)[1]
    assert torch.equal(y1, _all_batches(a.tasks[0].train, shuffle=True, generator=g2)[1])
    assert D.get_benchmark("synthetic", 5, seed=0).num_tasks == 5
    D.check_data("synthetic", "/nonexistent")


def test_synthetic_learnable_by_small_mlp() -> None:
    torch.manual_seed(0)
    bench = D.get_benchmark("synthetic", None, seed=3)
    for task in bench.tasks:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 2))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(5):
            for x, y in task.train.batches(16, shuffle=True):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        x, y = _all_batches(task.test)
        assert (model(x).argmax(1) == y).float().mean() > 0.9


# ----------------------------------------------------------------------------- augmentation

def test_random_crop_flip() -> None:
    x = torch.rand(8, 3, 32, 32)
    a = D.random_crop_flip(x, 4, torch.Generator().manual_seed(1))
    b = D.random_crop_flip(x, 4, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):  # each output is some (possibly flipped) 32x32 window of the padded input
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)  # [9, 9, 3, 32, 32]
        assert any(torch.equal(a[i], w) or torch.equal(a[i].flip(2), w) for w in windows.reshape(-1, 3, 32, 32))
    flipped = D.random_crop_flip(x, 0, torch.Generator().manual_seed(2))
    is_flip = [torch.equal(f, xi.flip(2)) for f, xi in zip(flipped, x)]
    assert all(f or torch.equal(o, xi) for f, o, xi in zip(is_flip, flipped, x)) and 0 < sum(is_flip) < 8


# ----------------------------------------------------------------------------- CIFAR-100

CIFAR_CLASSES = [3, 11, 25, 30, 47, 52, 68, 71, 88, 99]


def _write_cifar(root: Path) -> np.ndarray:
    """Write cifar-100-python/{train,test} pickles with 4 + 2 images of 10 classes; returns images [60, 3, 32, 32]."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = []
    for name, per in (("train", 4), ("test", 2)):
        labels = [c for c in CIFAR_CLASSES for _ in range(per)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, f)
    return np.concatenate(images)


def test_cifar100_fake_folder_and_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _write_cifar(tmp_path)
    D.check_data("cifar100", str(tmp_path))
    bench = D.get_benchmark("cifar100", 5, seed=0, data_dir=str(tmp_path))
    assert (bench.num_tasks, bench.classes_per_task, bench.input_shape) == (5, 2, (3, 32, 32))
    assert sorted(sum((t.classes for t in bench.tasks), [])) == CIFAR_CLASSES
    data, labels = D.load_cifar100(tmp_path)
    assert torch.equal(data, torch.from_numpy(images))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in D.MEAN_STD["cifar100"])
    for task in bench.tasks:
        _check_splits(task, torch.nonzero(torch.isin(labels, torch.tensor(task.classes))).flatten())
        x, y = _all_batches(task.val)
        assert torch.allclose(x * std + mean, data[task.val.indices].float() / 255, atol=1e-5)
        assert torch.equal(torch.tensor(task.classes)[y], labels[task.val.indices])
        xa, _ = _all_batches(task.train, augment=True, generator=torch.Generator().manual_seed(0))
        xb, _ = _all_batches(task.train, augment=True, generator=torch.Generator().manual_seed(0))
        xe, _ = _all_batches(task.train)
        assert xa.shape == xe.shape == (len(task.train), 3, 32, 32) and torch.equal(xa, xb) and not torch.equal(xa, xe)
    with pytest.raises(D.DataError, match="valid task counts"):
        D.get_benchmark("cifar100", 3, seed=0, data_dir=str(tmp_path))

    archive_root = tmp_path / "archive"
    archive_root.mkdir()
    with tarfile.open(archive_root / D.CIFAR100_ARCHIVE, "w:gz") as tar:
        tar.add(tmp_path / "cifar-100-python", arcname="cifar-100-python")
    with pytest.raises(D.DataError, match="md5"):
        D.get_benchmark("cifar100", 5, seed=0, data_dir=str(archive_root), download=False)
    monkeypatch.setitem(D.MD5, D.CIFAR100_ARCHIVE, _md5(archive_root / D.CIFAR100_ARCHIVE))
    D.check_data("cifar100", str(archive_root))
    from_archive = D.get_benchmark("cifar100", 5, seed=0, data_dir=str(archive_root), download=False)
    assert all(torch.equal(a.test.indices, b.test.indices) for a, b in zip(bench.tasks, from_archive.tasks))
    with pytest.raises(D.DataError, match="cifar-100-python.tar.gz"):
        D.check_data("cifar100", str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- TinyImageNet

TINY_WNIDS = ["n01443537", "n01629819", "n01641577"]


def _write_tiny(root: Path) -> dict[str, tuple[int, int, int]]:
    """Write a tiny-imagenet-200 folder (3 wnids, 4 train + 2 val solid-colour JPEGs each); returns name -> colour."""
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(reversed(TINY_WNIDS)) + "\n")
    colours, annotations = {}, []
    for c, wnid in enumerate(TINY_WNIDS):
        (folder / "train" / wnid / "images").mkdir(parents=True)
        for i in range(6):
            colour = (40 * c + 10 * i, 200 - 30 * i, 60 + 50 * c)
            name = f"train/{wnid}/images/{wnid}_{i}.JPEG" if i < 4 else f"val/images/val_{c * 2 + i - 4}.JPEG"
            if i >= 4:
                annotations.append(f"val_{c * 2 + i - 4}.JPEG\t{wnid}\t0\t0\t63\t63")
            Image.new("RGB" if i != 1 else "L", (64, 64), colour if i != 1 else 128).save(folder / name, "JPEG")
            colours[name] = colour if i != 1 else (128, 128, 128)
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return colours


def test_tinyimagenet_fake_folder_cache_and_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    colours = _write_tiny(tmp_path)
    D.check_data("tinyimagenet", str(tmp_path))
    data, labels = D.load_tinyimagenet(tmp_path)
    assert data.shape == (18, 3, 64, 64) and data.dtype == torch.uint8
    assert labels.bincount().tolist() == [6, 6, 6]
    cache = tmp_path / "tiny-imagenet-200.uint8.pt"
    assert cache.is_file()
    cached, _ = D.load_tinyimagenet(tmp_path)
    assert torch.equal(cached, data)
    names = sorted(colours)
    train_names = [n for n in names if n.startswith("train/")]
    val_names = sorted((n for n in names if n.startswith("val/")), key=lambda n: int(n.split("_")[1].split(".")[0]))
    for row, name in enumerate(train_names + val_names):
        mean_colour = data[row].float().mean((1, 2))
        assert torch.allclose(mean_colour, torch.tensor(colours[name], dtype=torch.float32), atol=3)
        val_index = int(name.split("_")[-1].split(".")[0])
        wnid = name.split("/")[1] if name.startswith("train/") else TINY_WNIDS[val_index // 2]
        assert int(labels[row]) == TINY_WNIDS.index(wnid)

    bench = D.get_benchmark("tinyimagenet", 3, seed=0, data_dir=str(tmp_path))
    assert (bench.classes_per_task, bench.input_shape) == (1, (3, 64, 64))
    for task in bench.tasks:
        _check_splits(task, torch.nonzero(labels == task.classes[0]).flatten())
        x, y = _all_batches(task.train, augment=True, generator=torch.Generator().manual_seed(0))
        assert x.shape == (len(task.train), 3, 64, 64) and set(y.tolist()) == {0}

    archive_root = tmp_path / "archive"
    archive_root.mkdir()
    with zipfile.ZipFile(archive_root / D.TINY_ARCHIVE, "w") as zf:
        for path in sorted((tmp_path / "tiny-imagenet-200").rglob("*")):
            zf.write(path, path.relative_to(tmp_path).as_posix())
    with pytest.raises(D.DataError, match="md5"):
        D.load_tinyimagenet(archive_root, download=False)
    monkeypatch.setitem(D.MD5, D.TINY_ARCHIVE, _md5(archive_root / D.TINY_ARCHIVE))
    D.check_data("tinyimagenet", str(archive_root))
    zdata, zlabels = D.load_tinyimagenet(archive_root, download=False)
    assert torch.equal(zdata, data) and torch.equal(zlabels, labels)


# ----------------------------------------------------------------------------- ImageNet

def _write_imagenet(root: Path, classes: int = 4) -> None:
    """Write imagenet/{train,val}/<wnid>/*.JPEG with 5 + 2 images of varied sizes per class."""
    for c in range(classes):
        for part, count in (("train", 5), ("val", 2)):
            folder = root / "imagenet" / part / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                size = (40 + 13 * i, 30 + 7 * c)
                Image.new("RGB", size, (60 * c, 20 * i, 100)).save(folder / f"img_{i}.JPEG", "JPEG")


def test_imagenet_fake_folders(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match="cannot be downloaded"):
        D.get_benchmark("imagenet1k", None, seed=0, data_dir=str(tmp_path))
    with pytest.raises(D.DataError, match="imagenet/train/<wnid>"):
        D.check_data("imagenet1k", str(tmp_path))
    _write_imagenet(tmp_path)
    D.check_data("imagenet1k", str(tmp_path))
    with pytest.raises(D.DataError, match=r"valid task counts: \[1, 2, 4\]"):
        D.get_benchmark("imagenet1k", None, seed=0, data_dir=str(tmp_path))
    bench = D.get_benchmark("imagenet1k", 2, seed=0, data_dir=str(tmp_path))
    assert (bench.num_tasks, bench.classes_per_task, bench.input_shape) == (2, 2, (3, 224, 224))
    _, labels = D.load_imagenet_files(tmp_path)
    assert labels.bincount().tolist() == [7, 7, 7, 7]
    task = bench.tasks[0]
    _check_splits(task, torch.nonzero(torch.isin(labels, torch.tensor(task.classes))).flatten())
    x, y = _all_batches(task.test)
    assert x.shape == (len(task.test), 3, 224, 224) and y.max() <= 1
    mean = torch.tensor(D.MEAN_STD["imagenet1k"][0]).view(3, 1, 1)
    std = torch.tensor(D.MEAN_STD["imagenet1k"][1]).view(3, 1, 1)
    expected_blue = float((100 / 255 - mean[2]) / std[2])
    assert torch.allclose(x[:, 2].mean((1, 2)), torch.full((len(x),), expected_blue), atol=0.05)
    xa, _ = _all_batches(task.train, augment=True, generator=torch.Generator().manual_seed(3))
    xb, _ = _all_batches(task.train, augment=True, generator=torch.Generator().manual_seed(3))
    assert xa.shape == (len(task.train), 3, 224, 224) and torch.equal(xa, xb)
    shutil.move(tmp_path / "imagenet" / "val" / "n00000000" / "img_0.JPEG", tmp_path / "imagenet" / "val" / "x.JPEG")
    with pytest.raises(D.DataError, match="holds images directly"):
        D.get_benchmark("imagenet1k", 2, seed=0, data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- device-resident batches, sharding, DataLoader

def test_crop_flip_on_a_hand_built_image() -> None:
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat(3, 2, 1, 1)  # 3 copies, 2 channels, pixels 1..16
    out = D.crop_flip(x, 1, torch.tensor([[0, 0], [2, 2], [1, 1]]), torch.tensor([False, True, False]))
    padded = torch.nn.functional.pad(x[0, 0], (1, 1, 1, 1))  # [6, 6], zero border
    assert torch.equal(out[0, 0], padded[:4, :4])  # top-left window: zero row and column, then pixels
    assert torch.equal(out[1, 1], padded[2:, 2:].flip(1))  # bottom-right window, mirrored
    assert torch.equal(out[2], x[2])  # centre offset, no flip: the image itself
    assert out[0, 0, 0].tolist() == [0, 0, 0, 0] and out[0, 0, 1].tolist() == [0, 1, 2, 3]


def _tensor_split(n: int = 90, pad: int = 4) -> D.Split:
    """A CIFAR-like in-memory split: n random uint8 32x32 images, labels 0..4, crop padding ``pad``."""
    gen = torch.Generator().manual_seed(5)
    data = torch.randint(0, 256, (n + 10, 3, 32, 32), dtype=torch.uint8, generator=gen)
    source = D.TensorSource(data, *D.MEAN_STD["cifar100"], pad=pad)
    return D.Split(source, torch.randperm(n + 10, generator=gen)[:n], torch.arange(n) % 5)


def test_in_memory_batches_seeded_resident_once_and_sharded() -> None:
    split = _tensor_split()
    kw = dict(shuffle=True, augment=True, positions=True)
    single = list(split.batches(16, generator=torch.Generator().manual_seed(1), **kw))
    again = list(split.batches(16, generator=torch.Generator().manual_seed(1), **kw))
    other = list(split.batches(16, generator=torch.Generator().manual_seed(2), **kw))
    assert all(torch.equal(a, b) for s, t in zip(single, again) for a, b in zip(s, t))
    assert not torch.equal(single[0][0], other[0][0])
    assert len(split.source._resident) == 1 and split.source.on(torch.device("cpu"))[0] is split.source.data
    assert D._stats((0.5,), (0.2,), torch.device("cpu"))[0] is D._stats((0.5,), (0.2,), torch.device("cpu"))[0]
    x_all, y_all, pos_all = (torch.cat(t) for t in zip(*single))
    assert torch.equal(y_all, split.labels[pos_all]) and sorted(pos_all.tolist()) == list(range(len(split)))
    for world in (2, 3):
        kept = [b for b in single if len(b[1]) >= world]
        shares = [list(split.batches(16, generator=torch.Generator().manual_seed(1), rank=r, world=world, **kw))
                  for r in range(world)]
        for r, share in enumerate(shares):
            assert len(share) == len(kept)
            assert all(torch.equal(a, b[r::world]) for s, full in zip(share, kept) for a, b in zip(s, full))
    short = _tensor_split(n=33)  # batches 16, 16, 1: the last one is skipped for world 2 on both ranks
    assert [len(b[1]) for b in short.batches(16, rank=1, world=2)] == [8, 8]
    complete = [list(short.batches(16, rank=r, world=2, positions=True, complete=True)) for r in range(2)]
    assert [[len(b[1]) for b in c] for c in complete] == [[8, 8, 1], [8, 8]]  # evaluation: every sample once
    assert sorted(torch.cat([b[2] for c in complete for b in c]).tolist()) == list(range(33))
    with pytest.raises(ValueError, match="rank 2"):
        next(short.batches(16, rank=2, world=2))


def test_resized_box_fits_and_falls_back_to_the_center() -> None:
    u = torch.rand(200, D.RRC_TRIES, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for row in u.tolist():
        left, top, right, bottom = D.resized_box(500, 375, row)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        assert 0.07 <= w * h / (500 * 375) <= 1.0 and 0.7 <= w / h <= 1.4
    too_big = [[1.0, 0.999, 0.5, 0.5]] * D.RRC_TRIES  # full area at aspect 4/3 never fits a 1000 x 100 image
    assert D.resized_box(1000, 100, too_big) == (433, 0, 566, 100)


def test_folder_dataloader_matches_in_process_and_reads_only_the_rank_share(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    D.write_standin("imagenet1k", tmp_path, per_class=6, classes=2)
    bench = D.get_benchmark("imagenet1k", 1, seed=0, data_dir=str(tmp_path), workers=0)
    split, source = bench.tasks[0].train, bench.tasks[0].train.source
    kw = dict(shuffle=True, augment=True, positions=True)
    in_process = list(split.batches(4, generator=torch.Generator().manual_seed(3), **kw))
    source.workers = 2
    workers = list(split.batches(4, generator=torch.Generator().manual_seed(3), **kw))
    assert all(torch.equal(a, b) for s, t in zip(in_process, workers) for a, b in zip(s, t))
    gen = torch.Generator().manual_seed(3)  # the draws of Split.batches, redone by hand for sample 0
    order = torch.randperm(len(split), generator=gen)
    u, flip = D.draw_resized_crop(4, gen)
    path = source.paths[int(split.indices[order[0]])]
    with Image.open(path) as img:
        ref = img.convert("RGB").resize((224, 224), Image.BILINEAR, box=D.resized_box(*img.size, u[0].tolist()))
    ref = torch.from_numpy(np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT) if flip[0] else ref).copy())
    expected = D.normalize_(ref.permute(2, 0, 1)[None].float() / 255, *D.MEAN_STD["imagenet1k"])
    assert torch.allclose(in_process[0][0][:1], expected, atol=1e-6)
    source.workers = 0
    read: list[Path] = []
    decode = D.decode_file
    monkeypatch.setattr(D, "decode_file", lambda path, *a: read.append(path) or decode(path, *a))
    for rank in (0, 1):
        read.clear()
        share = list(split.batches(4, generator=torch.Generator().manual_seed(3), rank=rank, world=2, **kw))
        expected_files = [source.paths[int(i)] for b in in_process for i in split.indices[b[2][rank::2]]]
        assert read == expected_files and len(read) < len(split)
        assert all(torch.equal(a, b[rank::2]) for s, full in zip(share, in_process) for a, b in zip(s, full))


def test_standins_are_read_by_the_real_loaders(tmp_path: Path) -> None:
    for name, per_class, classes, shape in (("cifar100", 5, None, (3, 32, 32)), ("tinyimagenet", 1, None, (3, 64, 64)),
                                            ("imagenet1k", 2, 3, (3, 224, 224))):
        D.write_standin(name, tmp_path, per_class, classes)
        D.check_data(name, str(tmp_path), 1)
        bench = D.get_benchmark(name, 1, seed=0, data_dir=str(tmp_path), workers=0)
        total = (classes or {"cifar100": 100, "tinyimagenet": 200}[name]) * (per_class + max(1, per_class // 5))
        assert bench.input_shape == shape and sum(len(s) for s in (bench.tasks[0].train, bench.tasks[0].val,
                                                                  bench.tasks[0].test)) == total
        x, _ = next(bench.tasks[0].test.batches(2))
        assert x.shape == (2, *shape) and x.dtype == torch.float32
    with pytest.raises(D.DataError, match="no stand-in"):
        D.write_standin("pmnist", tmp_path, 1)


def test_missing_pillow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_imagenet(tmp_path, classes=2)
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)
    bench = D.get_benchmark("imagenet1k", 1, seed=0, data_dir=str(tmp_path), workers=0)
    with pytest.raises(D.DataError, match="pip install Pillow"):
        next(bench.tasks[0].test.batches(2))


# ----------------------------------------------------------------------------- misc

def test_resolve_data_dir_and_bad_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SNV_DATA_DIR", raising=False)
    assert D.resolve_data_dir(None) == Path(D.DEFAULT_DATA_DIR)
    monkeypatch.setenv("SNV_DATA_DIR", "/some/where")
    assert D.resolve_data_dir(None) == Path("/some/where")
    assert D.resolve_data_dir("/cli/dir") == Path("/cli/dir")
    with pytest.raises(D.DataError, match="unknown benchmark"):
        D.get_benchmark("mnist", None, seed=0)
    with pytest.raises(D.DataError, match="unknown benchmark"):
        D.check_data("cifar10", None)
    with pytest.raises(D.DataError, match="positive"):
        D.get_benchmark("synthetic", 0, seed=0)


def test_batches_without_augmentation_are_gathered_in_groups_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    split = _tensor_split(n=50)
    perm = torch.randperm(split.source.data[0].numel(), generator=torch.Generator().manual_seed(3))
    split = D.Split(D.TensorSource(split.source.data, (0.3,) * 3, (0.2,) * 3, perm=perm), split.indices, split.labels)
    kw = dict(shuffle=True, positions=True)
    image_bytes = 4 * split.source.data[0].numel()
    results = {}
    for images in (1, 7, 16, 10_000):  # budget in images: one job at a time, two jobs, one job + rest, everything
        monkeypatch.setattr(D, "GATHER_BYTES", images * image_bytes)
        results[images] = list(split.batches(8, generator=torch.Generator().manual_seed(1), **kw))
        assert [len(b[1]) for b in results[images]] == [8] * 6 + [2]
    for got in results.values():
        assert all(torch.equal(a, b) for s, t in zip(got, results[1]) for a, b in zip(s, t))
    x, _, pos = (torch.cat(t) for t in zip(*results[10_000]))
    expected = (split.source.data[split.indices[pos]].float() / 255).flatten(1)[:, perm].view_as(x)
    assert torch.equal(x, (expected - 0.3) / 0.2)
