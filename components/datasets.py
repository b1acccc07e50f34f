"""Datasets in graft's contract: class folders ``<uri>/<label>/<image>`` of PNG/JPEG.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package when it is
installed (/usr/share/datasets/fashion-mnist), else from the canonical files,
downloaded once and checked against the SHA-256 of their decompressed content.

    graft data fashion-mnist --classes 1,3,5 --per-class 30 --seed 0 --out /tmp/bucket/fm
"""

from __future__ import annotations

import gzip
import hashlib
import io
import urllib.request
from pathlib import Path

import numpy as np

from common import storage

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# SHA-256 of the decompressed IDX files: the same whoever gzipped them.
FASHION_MNIST_FILES = {
    "train": (
        (
            "train-images-idx3-ubyte.gz",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
    ),
    "test": (
        (
            "t10k-images-idx3-ubyte.gz",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        (
            "t10k-labels-idx1-ubyte.gz",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    ),
}
# Folder names: the class names, made safe for paths.
FASHION_MNIST_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupt or not what was asked for."""


def _read_idx(raw: bytes, name: str) -> np.ndarray:
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{name} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"{name} is truncated: expected {np.prod(dims)} values, got {data.size}")
    return data.reshape(dims)


def _fetch(name: str, expected_sha256: str, data_dir: Path | None, cache_dir: Path) -> bytes:
    """Decompressed IDX bytes: from data_dir if given and present, else the cache, else download."""
    candidates = [data_dir / name] if data_dir else []
    candidates.append(cache_dir / name)
    for path in candidates:
        if path.exists():
            raw = gzip.decompress(path.read_bytes())
            if hashlib.sha256(raw).hexdigest() != expected_sha256:
                raise DatasetError(f"{path} does not match the Fashion-MNIST checksum")
            return raw
    url = FASHION_MNIST_URL + name
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            packed = response.read()
    except OSError as err:
        raise DatasetError(
            f"Fashion-MNIST is not installed ({DEBIAN_FASHION_MNIST} is missing) and {url} "
            f"could not be downloaded ({err}). Install it with "
            "`apt-get install dataset-fashion-mnist`."
        ) from err
    raw = gzip.decompress(packed)
    if hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise DatasetError(f"Downloaded {url} does not match the Fashion-MNIST checksum")
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / name).write_bytes(packed)
    return raw


def load_fashion_mnist(
    split: str = "train",
    *,
    data_dir: str | Path | None = DEBIAN_FASHION_MNIST,
    cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images uint8 [N,28,28], labels uint8 [N])`` for ``split``."""
    if split not in FASHION_MNIST_FILES:
        raise DatasetError(f"Received `split={split!r}`: expected 'train' or 'test'")
    cache = Path(cache_dir or Path.home() / ".cache" / "graft" / "fashion-mnist")
    folder = Path(data_dir) if data_dir else None
    (images_name, images_sha), (labels_name, labels_sha) = FASHION_MNIST_FILES[split]
    images = _read_idx(_fetch(images_name, images_sha, folder, cache), images_name)
    labels = _read_idx(_fetch(labels_name, labels_sha, folder, cache), labels_name)
    return images, labels


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def pick_per_class(
    labels: np.ndarray, classes: list[int], per_class: int, seed: int
) -> dict[int, np.ndarray]:
    """Indices of ``per_class`` examples of each class, chosen reproducibly by ``seed``."""
    rng = np.random.default_rng(seed)
    picked = {}
    for cls in classes:
        indices = np.flatnonzero(labels == cls)
        if per_class > len(indices):
            raise DatasetError(
                f"Received `per_class={per_class}` but class {cls} has {len(indices)} images"
            )
        picked[cls] = np.sort(rng.choice(indices, size=per_class, replace=False))
    return picked


def write_class_folders(
    out_uri: str, images_by_label: dict[str, list[np.ndarray]], *, prefix: str = "img"
) -> int:
    """Write images as ``<out_uri>/<label>/<prefix>_<i>.png``; return the number written."""
    count = 0
    for label, images in images_by_label.items():
        for index, image in enumerate(images):
            storage.write_bytes(
                storage.join(out_uri, label, f"{prefix}_{index:05d}.png"), encode_png(image)
            )
            count += 1
    return count


def export_fashion_mnist(
    out_uri: str,
    *,
    classes: list[int],
    per_class: int,
    seed: int = 0,
    split: str = "train",
    data_dir: str | Path | None = DEBIAN_FASHION_MNIST,
) -> dict[str, int]:
    """Write a Fashion-MNIST subset as PNG class folders; return images written per class name."""
    for cls in classes:
        if not 0 <= cls < len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"Received class {cls}: Fashion-MNIST classes are 0..9")
    images, labels = load_fashion_mnist(split, data_dir=data_dir)
    picked = pick_per_class(labels, classes, per_class, seed)
    by_name = {FASHION_MNIST_CLASSES[c]: [images[i] for i in idx] for c, idx in picked.items()}
    write_class_folders(out_uri, by_name, prefix=f"{split}_s{seed}")
    return {name: len(imgs) for name, imgs in by_name.items()}


def synthetic_images(
    num_classes: int = 3, per_class: int = 10, size: int = 32, seed: int = 0, channels: int = 3
) -> dict[str, list[np.ndarray]]:
    """Small images whose class is learnable: each class is a bright bar at its own angle,
    on noise. Used by tests so they need no download and run in seconds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    out: dict[str, list[np.ndarray]] = {}
    for cls in range(num_classes):
        angle = np.pi * cls / num_classes
        images = []
        for _ in range(per_class):
            jitter = rng.normal(0, 0.08)
            dist = np.abs(xx * np.sin(angle + jitter) - yy * np.cos(angle + jitter))
            bar = (dist < size / 10).astype(np.float32) * 200
            noisy = np.clip(bar + rng.normal(30, 20, size=(size, size)), 0, 255).astype(np.uint8)
            image = np.repeat(noisy[..., None], channels, axis=-1)
            if channels == 3:  # tint per class so color carries signal too
                image[..., cls % 3] = np.clip(image[..., cls % 3].astype(int) + 40, 0, 255)
            images.append(image if channels > 1 else image[..., 0])
        out[f"class_{cls}"] = images
    return out


def write_synthetic_dataset(out_uri: str, **kwargs) -> dict[str, int]:
    """Write ``synthetic_images(**kwargs)`` as PNG class folders under ``out_uri``."""
    images = synthetic_images(**kwargs)
    write_class_folders(out_uri, images, prefix=f"syn_s{kwargs.get('seed', 0)}")
    return {label: len(imgs) for label, imgs in images.items()}
