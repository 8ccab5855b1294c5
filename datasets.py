"""Continual-learning benchmarks for SNV: PMNIST, Split-MNIST, CIFAR-100, TinyImageNet, ImageNet-1k, synthetic.

Protocol (paper section 2): the classes are put in a seeded random order and chunked into
tasks; the samples of a task's classes are pooled from the native train and test partitions
and re-split 70/10/20 into train/val/test with a generator seeded from (seed, task index).
Labels are task-local (0..C-1, local label j <-> ``Task.classes[j]``). In-memory images are held
once (uint8), copied to the training device once, and gathered, augmented and normalised there per
batch; ImageNet files are decoded by DataLoader worker processes. Under torchrun each rank loads
only its share of every batch (``Split.batches(..., rank=, world=)``).
"""

from __future__ import annotations

import collections
import functools
import gzip
import hashlib
import io
import itertools
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_DATA_DIR = "./data"
BENCHMARKS = ("pmnist", "splitmnist", "cifar100", "tinyimagenet", "imagenet1k", "synthetic")
DEFAULT_TASKS = {"pmnist": 10, "splitmnist": 5, "cifar100": 10, "tinyimagenet": 10, "imagenet1k": 10, "synthetic": 3}
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
TINY_ARCHIVE = "tiny-imagenet-200.zip"
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    CIFAR100_ARCHIVE: "eb9058c3a382ffc7106e4002c42a8d85",
    TINY_ARCHIVE: "90528d7ca1a48142e341f4ef8d21d0de",
}
URLS = {
    CIFAR100_ARCHIVE: ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
    TINY_ARCHIVE: ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
    **{name: tuple(m + name for m in MNIST_MIRRORS) for name in MNIST_FILES},
}
MEAN_STD = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenet1k": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
GATHER_BYTES = 256 * 2**20
"""TensorSource: the most bytes of float32 images prepared in one go (consecutive batches without augmentation)."""
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
IMAGENET_LAYOUT = ("<data_dir>/imagenet/train/<wnid>/*.JPEG and (optional) <data_dir>/imagenet/val/<wnid>/*.JPEG, "
                   "one folder per class (val images sorted into class folders)")


class DataError(Exception):
    """Missing or corrupt data files, or an impossible split; the message names the problem and the fix."""


def resolve_data_dir(data_dir: str | None) -> Path:
    """The data folder: ``data_dir`` (--data-dir) if given, else $SNV_DATA_DIR, else ./data."""
    return Path(data_dir or os.environ.get("SNV_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def _generator(*keys: object) -> torch.Generator:
    """A CPU generator seeded deterministically from ``keys`` (e.g. seed, purpose, task index)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ----------------------------------------------------------------------------- files, checksums, downloads

_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def _md5(path: Path) -> str:
    """md5 hex digest of a file, computed once per (path, size, mtime) per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MD5_CACHE:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _MD5_CACHE[key] = h.hexdigest()
    return _MD5_CACHE[key]


def _verify_md5(path: Path) -> None:
    """Raise DataError if ``path`` does not have its published md5 (``MD5[path.name]``)."""
    expected, actual = MD5[path.name], _md5(path)
    if actual != expected:
        raise DataError(f"{path}: md5 mismatch (expected {expected}, actual {actual}); the file is corrupt or "
                        f"incomplete and was not used. Fix: delete it and re-download it from {URLS[path.name][0]}.")


def _download(target: Path) -> str | None:
    """Download ``target`` from its URLs via a temp file, verify md5, rename into place; error text or None."""
    errors = []
    for url in URLS[target.name]:
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
                shutil.copyfileobj(response, out, 1 << 20)
            actual = _md5(Path(tmp))
            if actual != MD5[target.name]:
                raise OSError(f"downloaded md5 {actual} != expected {MD5[target.name]}")
            os.replace(tmp, target)
            tmp = None
            return None
        except Exception as e:  # any network/disk failure becomes part of the DataError message
            errors.append(f"{url}: {e}")
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
    return "; ".join(errors)


def _ensure_files(paths: Sequence[Path], download: bool) -> None:
    """Verify the md5 of each present file; download missing ones if allowed, else DataError listing them."""
    for p in paths:
        if p.is_file():
            _verify_md5(p)
    missing = [p for p in paths if not p.is_file()]
    errors = []
    for p in missing if download else []:
        if err := _download(p):
            errors.append(err)
            break  # offline: do not wait on every other file's timeouts
    still = [p for p in missing if not p.is_file()]
    if still:
        listing = "\n".join(f"  {p}  <- {URLS[p.name][0]}  (md5 {MD5[p.name]})" for p in still)
        why = "download failed: " + "; ".join(errors) if errors else "downloading was disabled"
        raise DataError(f"missing data files ({why}). Expected:\n{listing}\nFetch each file to exactly that path, "
                        "or point --data-dir / SNV_DATA_DIR at a folder that already contains them.")


# ----------------------------------------------------------------------------- raw dataset readers

_MNIST_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Decode one gzipped IDX file (big-endian magic, dims, uint8 data) into an array."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot decompress ({e}); delete it and re-download it") from e
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path}: not an IDX file with magic {magic}; delete it and re-download it")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes; delete it and re-download it")
    return data.reshape(dims)


def _mnist_paths(root: Path) -> list[Path]:
    """The four MNIST .gz files under <root>/MNIST/raw/."""
    return [root / "MNIST" / "raw" / name for name in MNIST_FILES]


def load_mnist(root: Path, download: bool = True) -> tuple[Tensor, Tensor]:
    """All 70,000 MNIST digits, train then test: uint8 [70000, 1, 28, 28] and int64 labels [70000]."""
    paths = _mnist_paths(root)
    _ensure_files(paths, download)
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key not in _MNIST_CACHE:
        tr_x, tr_y, te_x, te_y = (_read_idx(p, 2051 if "images" in p.name else 2049) for p in paths)
        if len(tr_x) != len(tr_y) or len(te_x) != len(te_y):
            raise DataError(f"MNIST images and labels disagree in count under {paths[0].parent}; re-download them")
        images = torch.from_numpy(np.concatenate([tr_x, te_x]))[:, None]
        _MNIST_CACHE[key] = images, torch.from_numpy(np.concatenate([tr_y, te_y]).astype(np.int64))
    return _MNIST_CACHE[key]


def load_cifar100(root: Path, download: bool = True) -> tuple[Tensor, Tensor]:
    """CIFAR-100 train + test pooled: uint8 [N, 3, 32, 32] and int64 fine labels [N]."""
    folder = root / "cifar-100-python"
    if (folder / "train").is_file() and (folder / "test").is_file():
        blobs = [(folder / n).read_bytes() for n in ("train", "test")]
        source = folder
    else:
        archive = root / CIFAR100_ARCHIVE
        _ensure_files([archive], download)
        with tarfile.open(archive, "r:gz") as tar:
            blobs = [tar.extractfile(f"cifar-100-python/{n}").read() for n in ("train", "test")]
        source = archive
    xs, ys = [], []
    try:
        for blob in blobs:
            d = pickle.loads(blob, encoding="bytes")
            xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"fine_labels"], np.int64))
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
        raise DataError(f"{source}: corrupt CIFAR-100 pickle ({e!r}); delete it and re-download "
                        f"{URLS[CIFAR100_ARCHIVE][0]}") from e
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _tiny_reader(root: Path, download: bool) -> tuple[Callable[[str], bytes], list[str]]:
    """(read(relative name) -> bytes, sorted train image names) for the extracted folder or the zip."""
    folder = root / "tiny-imagenet-200"
    if (folder / "wnids.txt").is_file():
        names = sorted(p.relative_to(folder).as_posix() for p in (folder / "train").glob("*/images/*.JPEG"))
        return (lambda rel: (folder / rel).read_bytes()), names
    archive = root / TINY_ARCHIVE
    _ensure_files([archive], download)
    zf = zipfile.ZipFile(archive)
    prefix = "tiny-imagenet-200/"
    names = sorted(n[len(prefix):] for n in zf.namelist()
                   if n.startswith(prefix + "train/") and n.endswith(".JPEG") and "/images/" in n)
    return (lambda rel: zf.read(prefix + rel)), names


def _decode_rgb(data: bytes, size: int) -> np.ndarray:
    """Decode image bytes with PIL to uint8 [3, size, size] (resized if needed)."""
    image = _pil_image()
    img = image.open(io.BytesIO(data)).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), image.BILINEAR)
    return np.asarray(img, np.uint8).transpose(2, 0, 1)


def load_tinyimagenet(root: Path, download: bool = True) -> tuple[Tensor, Tensor]:
    """TinyImageNet train (500/class) + val (50/class) pooled: uint8 [N, 3, 64, 64], int64 labels (sorted wnids)."""
    read, train_names = _tiny_reader(root, download)
    try:
        wnids = sorted(read("wnids.txt").decode().split())
        annotations = read("val/val_annotations.txt").decode().splitlines()
    except (OSError, KeyError) as e:
        raise DataError(f"TinyImageNet under {root} lacks wnids.txt or val/val_annotations.txt ({e}); expected the "
                        f"layout of {TINY_ARCHIVE} (tiny-imagenet-200/{{wnids.txt,train,val}})") from e
    index = {w: i for i, w in enumerate(wnids)}
    entries = [(n, n.split("/")[1]) for n in train_names]
    entries += [(f"val/images/{f}", w) for f, w, *_ in (line.split("\t") for line in annotations if line.strip())]
    if unknown := {w for _, w in entries} - index.keys():
        raise DataError(f"TinyImageNet under {root}: classes {sorted(unknown)[:5]} are not in wnids.txt")
    names = [n for n, _ in entries]
    labels = torch.tensor([index[w] for _, w in entries], dtype=torch.int64)
    cache = root / "tiny-imagenet-200.uint8.pt"
    if cache.is_file():
        cached = torch.load(cache, mmap=True, weights_only=True)
        if cached["names"] == names:
            return cached["images"], labels
    images = np.empty((len(names), 3, 64, 64), np.uint8)
    for i, name in enumerate(names):
        try:
            images[i] = _decode_rgb(read(name), 64)
        except (OSError, KeyError) as e:
            raise DataError(f"TinyImageNet image {name} under {root} is unreadable ({e}); re-extract it") from e
    images_t = torch.from_numpy(images)
    _try_save(cache, {"names": names, "images": images_t})
    return images_t, labels


def _try_save(path: Path, obj: dict) -> None:
    """torch.save ``obj`` to ``path`` atomically if its folder is writable; silently skip otherwise."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _class_dirs(folder: Path) -> list[Path]:
    """Sorted class sub-folders of ``folder``."""
    return sorted(d for d in folder.iterdir() if d.is_dir())


def _require_imagenet(root: Path) -> Path:
    """<root>/imagenet if its train/ has class folders, else DataError explaining the expected layout."""
    base = root / "imagenet"
    if not (base / "train").is_dir() or not _class_dirs(base / "train"):
        raise DataError(f"ImageNet not found at {base / 'train'}. ImageNet cannot be downloaded automatically "
                        f"(license): obtain ILSVRC-2012 from image-net.org and arrange it as {IMAGENET_LAYOUT}; "
                        "then pass the folder containing imagenet/ via --data-dir or SNV_DATA_DIR.")
    return base


def load_imagenet_files(root: Path) -> tuple[list[Path], Tensor]:
    """ImageNet train + val image paths pooled and int64 labels (index of the sorted train class folders)."""
    base = _require_imagenet(root)
    index = {d.name: i for i, d in enumerate(_class_dirs(base / "train"))}
    files: list[Path] = []
    labels: list[int] = []
    for part in ("train", "val"):
        folder = base / part
        if not folder.is_dir():
            continue
        if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in folder.iterdir() if f.is_file()):
            raise DataError(f"{folder} holds images directly; expected {IMAGENET_LAYOUT}")
        for d in _class_dirs(folder):
            if d.name not in index:
                raise DataError(f"{d}: class {d.name} is not a folder of {base / 'train'}; expected {IMAGENET_LAYOUT}")
            imgs = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            files += imgs
            labels += [index[d.name]] * len(imgs)
    return files, torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------- batched transforms

@functools.cache
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalisation constants mean, std as float32 [1, C, 1, 1] on ``device``, built once per (values, device)."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std))


def normalize_(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel (x - mean) / std of float32 x [B, C, H, W] in [0, 1], in place (x is a batch's own temporary;
    the same values as out of place, without allocating two more batches); returns x."""
    m, s = _stats(tuple(mean), tuple(std), x.device)
    return x.sub_(m).div_(s)


def draw_crop_flip(b: int, pad: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Random crop offsets int64 [B, 2] (row, column) in [0, 2 pad] and flips bool [B] (p=0.5), drawn on the CPU."""
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).t()
    return offsets, torch.rand(b, generator=generator) < 0.5


def crop_flip(x: Tensor, pad: int, offsets: Tensor, flip: Tensor) -> Tensor:
    """Zero-pad x [B, C, H, W] by ``pad``, crop H x W at ``offsets`` [B, 2], mirror where ``flip`` [B]; on x's device."""
    b, c, h, w = x.shape
    offsets, flip = offsets.to(x.device, non_blocking=True), flip.to(x.device, non_blocking=True)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing put C last: [B, H, W, C]


def random_crop_flip(x: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad x [B, C, H, W] by ``pad``, crop H x W at per-sample random offsets, flip each with p=0.5."""
    return crop_flip(x, pad, *draw_crop_flip(len(x), pad, generator))


RRC_TRIES = 10
"""RandomResizedCrop: boxes tried before the center-crop fallback (torchvision's)."""


def draw_resized_crop(b: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """RandomResizedCrop draws for B images: uniforms float64 [B, RRC_TRIES, 4] and flips bool [B] (p=0.5).

    The box itself depends on the image size, so it is computed where the image is opened (``resized_box``).
    """
    return torch.rand(b, RRC_TRIES, 4, generator=generator, dtype=torch.float64), torch.rand(b, generator=generator) < 0.5


def resized_box(width: int, height: int, u: Sequence[Sequence[float]], scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (left, top, right, bottom) from uniforms u [RRC_TRIES, 4]: torchvision's algorithm
    (area fraction, log aspect ratio, top, left per try; the first box that fits, else the center crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for u_area, u_ratio, u_top, u_left in u:
        target = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u_ratio * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _pil_image():
    """PIL.Image, imported on first use; DataError naming the fix if Pillow is missing."""
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError("reading TinyImageNet / ImageNet JPEGs needs Pillow, which is not installed. "
                        "Fix: pip install Pillow (it is in requirements.txt).") from e
    return Image


def decode_file(path: Path, u: Sequence[Sequence[float]] | None, flip: bool, size: int, resize: int) -> Tensor:
    """Open one image once and decode it to uint8 [3, size, size].

    Train (``u`` [RRC_TRIES, 4]): the RandomResizedCrop box from the header's size, resized to size x size,
    mirrored if ``flip``. Eval (``u`` None): resize the shorter side to ``resize``, center crop size x size.
    """
    image = _pil_image()
    with image.open(path) as img:  # lazy: the size comes from the header, the pixels are decoded once below
        if u is None:
            side = size * min(img.size) / resize
            left, top = (img.size[0] - side) / 2, (img.size[1] - side) / 2
            box: tuple[float, ...] = (left, top, left + side, top + side)
        else:
            box = resized_box(*img.size, u)
        out = img.convert("RGB").resize((size, size), image.BILINEAR, box=box)
    if flip:
        out = out.transpose(image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out, np.uint8).transpose(2, 0, 1).copy())


def default_workers() -> int:
    """DataLoader worker processes per rank: the CPUs this process may use, shared by the ranks of this node."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


# ----------------------------------------------------------------------------- sources and splits

Job = tuple[Tensor, tuple[Tensor, ...] | None]
"""One rank's share of one batch: pooled sample indices int64 [b] and the share's augmentation draws (or None)."""


class _Source(Protocol):
    """Something that turns batches of sample indices [b] into normalised batches [b, C, H, W]."""

    augments: bool  # whether load(..., augment=True) draws random crops/flips

    def draw(self, b: int, generator: torch.Generator | None) -> tuple[Tensor, ...]:
        """The augmentation draws of a whole (global) batch of b samples, each tensor indexed by sample first."""

    def load(self, jobs: Iterator[Job], device: torch.device) -> Iterator[Tensor]:
        """Normalised float32 batches [b, C, H, W] on ``device``, one per job, in order."""


@dataclass
class TensorSource:
    """In-memory samples: uint8 [N, C, H, W] (or float, already normalised), optional pixel permutation [C*H*W].

    The samples (and the permutation) are copied to a device once, on first use there; batches are then
    gathered, permuted, augmented and normalised on that device.
    """
    data: Tensor
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    pad: int | None = None  # crop padding for augmentation; None = no augmentation
    perm: Tensor | None = None
    _resident: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def augments(self) -> bool:
        """Whether augmentation is on (a crop padding is set)."""
        return self.pad is not None

    def on(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """(data, perm) on ``device``, copied there on the first call only."""
        if device not in self._resident:
            self._resident[device] = tuple(t if t is None else t.to(device) for t in (self.data, self.perm))
        return self._resident[device]

    def draw(self, b: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Crop offsets [b, 2] and flips [b] (``draw_crop_flip``)."""
        return draw_crop_flip(b, self.pad, generator)

    def load(self, jobs: Iterator[Job], device: torch.device) -> Iterator[Tensor]:
        """Per job a float32 batch [b, C, H, W] (``prepare``). Consecutive jobs without crop draws are prepared
        together, up to GATHER_BYTES of images (a PMNIST task's training epoch at once), and yielded as views;
        every operation is per image, so the batches are those of one job at a time, bit for bit."""
        data, perm = self.on(device)
        image_bytes = 4 * data[0].numel()
        group: list[Tensor] = []
        size = 0
        for idx, drawn in itertools.chain(jobs, [(None, None)]):
            if group and (idx is None or drawn is not None or (size + len(idx)) * image_bytes > GATHER_BYTES):
                yield from self.prepare(data, perm, torch.cat(group), None).split([len(i) for i in group])
                group, size = [], 0
            if idx is None:
                return
            if drawn is not None:
                yield self.prepare(data, perm, idx, drawn)
            else:
                group.append(idx)
                size += len(idx)

    def prepare(self, data: Tensor, perm: Tensor | None, idx: Tensor, drawn: tuple[Tensor, ...] | None) -> Tensor:
        """Gather samples idx [b], permute pixels (while still uint8: a quarter of the bytes to move), scale to
        [0, 1], crop + flip (if drawn), normalise."""
        x = data[idx.to(data.device, non_blocking=True)]
        if perm is not None:
            x = x.flatten(1)[:, perm].view_as(x)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if drawn is not None:
            x = crop_flip(x, self.pad, *drawn)
        return normalize_(x, self.mean, self.std) if self.mean is not None else x


class _FolderDataset(torch.utils.data.Dataset):
    """Map-style dataset over image files; an item is (file index, RandomResizedCrop uniforms or None, flip)."""

    def __init__(self, paths: list[Path], size: int, resize: int) -> None:
        self.paths, self.size, self.resize = paths, size, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, list[list[float]] | None, bool]) -> Tensor:
        i, u, flip = item
        return decode_file(self.paths[i], u, flip, self.size, self.resize)


@dataclass
class FolderSource:
    """Image files decoded by PIL in DataLoader workers: train RandomResizedCrop + flip, eval Resize + CenterCrop.

    ``workers`` processes decode ahead of the consumer (2 batches each); batches land in pinned memory when
    the device is a GPU and are copied without blocking, then normalised on the device.
    """
    paths: list[Path]
    mean: Sequence[float]
    std: Sequence[float]
    size: int = 224
    resize: int = 256
    workers: int = field(default_factory=default_workers)
    augments: bool = True

    def draw(self, b: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """RandomResizedCrop uniforms [b, RRC_TRIES, 4] and flips [b] (``draw_resized_crop``)."""
        return draw_resized_crop(b, generator)

    def load(self, jobs: Iterator[Job], device: torch.device) -> Iterator[Tensor]:
        """All jobs are read at once (so the draws do not depend on how far the workers run ahead), then decoded."""
        items = [[(i, None, False) for i in idx.tolist()] if drawn is None else
                 list(zip(idx.tolist(), drawn[0].tolist(), drawn[1].tolist())) for idx, drawn in jobs]
        loader = torch.utils.data.DataLoader(_FolderDataset(self.paths, self.size, self.resize), batch_sampler=items,
                                             num_workers=self.workers, pin_memory=device.type == "cuda")
        for x in loader:
            yield normalize_(x.to(device, non_blocking=True).float().div_(255), self.mean, self.std)


class Split:
    """One split (train/val/test) of one task: pooled sample ``indices`` [n] and task-local ``labels`` [n]."""

    def __init__(self, source: _Source, indices: Tensor, labels: Tensor) -> None:
        self.source, self.indices, self.labels = source, indices, labels
        self._labels: dict[torch.device, Tensor] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                augment: bool = False, device: torch.device | str = "cpu", positions: bool = False,
                rank: int = 0, world: int = 1, complete: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """Yield (x float32 [b, C, H, W] normalised, y int64 [b] local labels); shuffle/augment use ``generator``.

        With ``positions``, each batch also carries the samples' positions in this split (int64 [b]).
        With ``world`` > 1 (torchrun), this rank loads only its share, samples rank::world, of every batch of
        ``batch_size`` (the batches, their order and their augmentation are those of a single process), and
        batches with fewer than ``world`` samples are skipped so that every rank takes the same steps. With
        ``complete`` (evaluation), none is skipped: a rank skips only a batch in which its share is empty, so the
        ranks together see every sample exactly once (their numbers of batches may then differ by one).
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        device = torch.device(device)
        if device not in self._labels:
            self._labels[device] = self.labels.to(device)
        labels = self._labels[device]
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        augment = augment and self.source.augments
        shares: collections.deque[Tensor] = collections.deque()

        def jobs() -> Iterator[Job]:
            for start in range(0, len(self), batch_size):
                sel = order[start:start + batch_size]
                if len(sel) < world and not complete:
                    continue
                drawn = self.source.draw(len(sel), generator) if augment else None
                if len(sel) <= rank:
                    continue
                shares.append(sel[rank::world])
                yield self.indices[shares[-1]], None if drawn is None else tuple(d[rank::world] for d in drawn)

        for x in self.source.load(jobs(), device):
            sel = shares.popleft().to(device, non_blocking=True)
            yield (x, labels[sel], sel) if positions else (x, labels[sel])


@dataclass
class Task:
    """One task: its original class ids (local label j <-> classes[j]) and its three splits."""
    index: int
    classes: list[int]
    train: Split
    val: Split
    test: Split


@dataclass
class Benchmark:
    """A sequence of tasks with a common input shape (C, H, W) and classes per task."""
    name: str
    num_tasks: int
    classes_per_task: int
    input_shape: tuple[int, int, int]
    tasks: list[Task]


# ----------------------------------------------------------------------------- task construction

def _class_order(class_ids: Sequence[int], num_tasks: int, seed: int, name: str) -> list[list[int]]:
    """Seeded random permutation of the classes chunked into ``num_tasks`` equal tasks (DataError if impossible)."""
    k = len(class_ids)
    if num_tasks < 1 or k % num_tasks:
        valid = [d for d in range(1, k + 1) if k % d == 0]
        raise DataError(f"{name}: {num_tasks} tasks cannot split {k} classes evenly; valid task counts: {valid}")
    order = [class_ids[i] for i in torch.randperm(k, generator=_generator(seed, "class-order")).tolist()]
    per = k // num_tasks
    return [order[t * per:(t + 1) * per] for t in range(num_tasks)]


def _split_indices(pool: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Shuffle pooled sample indices [n] and cut them 70/10/20 (each split non-empty) into train/val/test."""
    n = len(pool)
    if n < 3:
        raise DataError(f"a task has only {n} samples; at least 3 are needed for a train/val/test split")
    n_val, n_test = max(1, round(SPLIT_FRACTIONS[1] * n)), max(1, round(SPLIT_FRACTIONS[2] * n))
    perm = pool[torch.randperm(n, generator=generator)]
    n_train = n - n_val - n_test
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


def _make_tasks(labels: Tensor, task_classes: list[list[int]], seed: int,
                source_for: Callable[[int], _Source]) -> list[Task]:
    """Pool each task's samples (global ``labels`` [N]), re-split 70/10/20 seeded by (seed, t), map to local labels."""
    tasks = []
    for t, classes in enumerate(task_classes):
        lut = torch.full((int(labels.max()) + 1,), -1, dtype=torch.int64)
        lut[classes] = torch.arange(len(classes))
        local = lut[labels]
        pool = torch.nonzero(local >= 0).flatten()
        source = source_for(t)
        splits = [Split(source, idx, local[idx]) for idx in _split_indices(pool, _generator(seed, "split", t))]
        tasks.append(Task(t, list(classes), *splits))
    return tasks


def make_synthetic(num_tasks: int = 3, seed: int = 0, shape: tuple[int, int, int] = (3, 8, 8),
                   per_class: int = 60, classes_per_task: int = 2, noise: float = 1.0) -> Benchmark:
    """Toy benchmark: each class = a fixed random prototype [C*H*W] + Gaussian noise, deterministic from seed."""
    if num_tasks < 1:
        raise DataError(f"synthetic: num_tasks must be >= 1, got {num_tasks}")
    k, dim = num_tasks * classes_per_task, math.prod(shape)
    x = torch.cat([torch.randn(dim, generator=_generator(seed, "synthetic-prototype", c))
                   + noise * torch.randn(per_class, dim, generator=_generator(seed, "synthetic-noise", c))
                   for c in range(k)]).view(-1, *shape)
    labels = torch.arange(k).repeat_interleave(per_class)
    source = TensorSource(x)
    tasks = _make_tasks(labels, _class_order(list(range(k)), num_tasks, seed, "synthetic"), seed, lambda t: source)
    return Benchmark("synthetic", num_tasks, classes_per_task, tuple(shape), tasks)


def get_benchmark(name: str, num_tasks: int | None, seed: int, data_dir: str | None = None, *,
                  pmnist_first: str = "identity", download: bool = True, workers: int | None = None) -> Benchmark:
    """Build benchmark ``name`` with ``num_tasks`` tasks (None = its default) and seeded class order and splits.

    ``workers``: ImageNet's DataLoader worker processes (None = ``default_workers()``, 0 = decode in this process).
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {BENCHMARKS}")
    num_tasks = DEFAULT_TASKS[name] if num_tasks is None else int(num_tasks)
    if num_tasks < 1:
        raise DataError(f"{name}: num_tasks must be a positive integer, got {num_tasks}")
    if name == "synthetic":
        return make_synthetic(num_tasks, seed)
    root = resolve_data_dir(data_dir)
    if name == "pmnist":
        if pmnist_first not in ("identity", "permuted"):
            raise ValueError(f"pmnist_first must be 'identity' or 'permuted', got {pmnist_first!r}")
        images, labels = load_mnist(root, download)
        perms = [torch.randperm(28 * 28, generator=_generator(seed, "pmnist-permutation", t)) for t in range(num_tasks)]
        if pmnist_first == "identity":
            perms[0] = None
        sources = [TensorSource(images, *MEAN_STD["mnist"], perm=p) for p in perms]
        tasks = _make_tasks(labels, [list(range(10))] * num_tasks, seed, sources.__getitem__)
        return Benchmark(name, num_tasks, 10, (1, 28, 28), tasks)
    if name == "imagenet1k":
        files, labels = load_imagenet_files(root)
        source = FolderSource(files, *MEAN_STD["imagenet1k"], workers=default_workers() if workers is None else workers)
        shape = (3, 224, 224)
    else:
        loader = {"splitmnist": load_mnist, "cifar100": load_cifar100, "tinyimagenet": load_tinyimagenet}[name]
        data, labels = loader(root, download)
        stats = MEAN_STD["mnist" if name == "splitmnist" else name]
        source = TensorSource(data, *stats, pad={"cifar100": 4, "tinyimagenet": 8}.get(name))
        shape = tuple(data.shape[1:])
    task_classes = _class_order(torch.unique(labels).tolist(), num_tasks, seed, name)
    tasks = _make_tasks(labels, task_classes, seed, lambda t: source)
    return Benchmark(name, num_tasks, len(task_classes[0]), shape, tasks)


def check_data(name: str, data_dir: str | None, num_tasks: int | None = None, download: bool = False) -> None:
    """Before training: DataError if `num_tasks` cannot split the classes, or the files are missing/corrupt.

    With download=True missing files are fetched (md5-checked) first. Synthetic needs no files.
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {BENCHMARKS}")
    root = resolve_data_dir(data_dir)
    classes = {"splitmnist": 10, "cifar100": 100, "tinyimagenet": 200}.get(name)
    if name == "imagenet1k":
        classes = len(_class_dirs(_require_imagenet(root) / "train"))
    if num_tasks is not None and num_tasks < 1:
        raise DataError(f"{name}: num_tasks must be a positive integer, got {num_tasks}")
    if num_tasks is not None and classes is not None:
        _class_order(list(range(classes)), num_tasks, 0, name)
    if name in ("pmnist", "splitmnist"):
        _ensure_files(_mnist_paths(root), download)
    elif name == "cifar100":
        folder = root / "cifar-100-python"
        if not ((folder / "train").is_file() and (folder / "test").is_file()):
            _ensure_files([root / CIFAR100_ARCHIVE], download)
    elif name == "tinyimagenet":
        folder = root / "tiny-imagenet-200"
        if not ((folder / "wnids.txt").is_file() and (folder / "train").is_dir()):
            _ensure_files([root / TINY_ARCHIVE], download)


# ----------------------------------------------------------------------------- stand-ins (random pixels)

STANDINS = ("cifar100", "tinyimagenet", "imagenet1k")


def write_standin(name: str, root: Path, per_class: int, classes: int | None = None, seed: int = 0) -> Path:
    """Write a random-pixel stand-in of ``name`` under ``root`` in the extracted layout its loader reads; return
    the folder. For tests, benchmarks and rehearsals on machines without the data: never real data, never committed.

    Each class gets ``per_class`` training images and max(1, per_class // 5) test/val images, at the real size and
    format: cifar100: 100 classes (default) in the python pickles cifar-100-python/{train,test} (rows of 3072
    uint8 = 3x32x32); tinyimagenet: 200 classes of 64x64 JPEGs in tiny-imagenet-200/ (wnids.txt, train/<wnid>/
    images/, val/images/ + val_annotations.txt); imagenet1k: ``classes`` (default 1000) class folders
    imagenet/{train,val}/<wnid>/ of JPEGs sized like ImageNet photos (sides 200-500). The extracted layouts carry
    no published md5 (only the archives do), so the loaders read them as they are.
    """
    if name not in STANDINS:
        raise DataError(f"no stand-in for {name!r}; choose one of {STANDINS}")
    classes = classes or {"cifar100": 100, "tinyimagenet": 200, "imagenet1k": 1000}[name]
    rng = np.random.default_rng(seed)
    held_out = max(1, per_class // 5)
    wnids = [f"n{c:08d}" for c in range(classes)]
    if name == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for part, count in (("train", per_class), ("test", held_out)):
            labels = [c for c in range(classes) for _ in range(count)]
            data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
            with open(folder / part, "wb") as f:
                pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [c // 5 for c in labels]}, f)
        return folder
    image = _pil_image()

    def jpeg(path: Path, width: int, height: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, "JPEG")

    if name == "tinyimagenet":
        folder = root / "tiny-imagenet-200"
        (folder / "val" / "images").mkdir(parents=True, exist_ok=True)
        (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
        annotations = []
        for w in wnids:
            for i in range(per_class):
                jpeg(folder / "train" / w / "images" / f"{w}_{i}.JPEG", 64, 64)
            for i in range(held_out):
                annotations.append(f"val_{len(annotations)}.JPEG\t{w}\t0\t0\t63\t63")
                jpeg(folder / "val" / "images" / annotations[-1].split("\t")[0], 64, 64)
        (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
        return folder
    folder = root / "imagenet"
    for part, count in (("train", per_class), ("val", held_out)):
        for w in wnids:
            for i in range(count):
                jpeg(folder / part / w / f"{w}_{i}.JPEG", *(int(s) for s in rng.integers(200, 501, 2)))
    return folder
