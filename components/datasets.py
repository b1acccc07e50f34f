"""Datasets in graft's contract: class folders ``<uri>/<label>/<image>`` of PNG/JPEG.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package when it is
installed (/usr/share/datasets/fashion-mnist), else from the canonical files, downloaded
once over HTTPS by keras.utils.get_file against their published MD5 and checked against
the SHA-256 of their decompressed content.

    graft data fashion-mnist --classes 1,3,5 --per-class 30 --seed 0 --out /tmp/bucket/fm
"""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np

from common import storage

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# The canonical files, from the dataset authors' repository over HTTPS (their S3 "website"
# endpoint answers plain HTTP only).
FASHION_MNIST_ORIGIN = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
)
# Per file: the MD5 the authors publish for the .gz (checked by keras.utils.get_file on
# download) and the SHA-256 of the decompressed IDX bytes, which also holds for a copy gzipped
# by someone else (Debian's package re-compresses them).
FASHION_MNIST_FILES = {
    "train": (
        (
            "train-images-idx3-ubyte.gz",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            "25c81989df183df01b3e8a0aad5dffbe",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
    ),
    "test": (
        (
            "t10k-images-idx3-ubyte.gz",
            "bef4ecab320f06d8554ea6380940ec79",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        (
            "t10k-labels-idx1-ubyte.gz",
            "bb300cfdad3c16e7a12a480ee83cd310",
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


def fetch_idx(
    name: str,
    gz_md5: str,
    raw_sha256: str,
    *,
    data_dir: Path | None,
    cache_dir: Path,
    origin: str = FASHION_MNIST_ORIGIN,
) -> bytes:
    """Decompressed IDX bytes of ``name``: from ``data_dir`` when it holds the file, else
    downloaded once from ``origin`` into ``cache_dir`` by keras.utils.get_file (MD5-checked)."""
    import keras

    local = data_dir / name if data_dir else None
    if local is not None and local.exists():
        path = local
    else:
        # get_file silently switches to /tmp/.keras when cache_dir does not exist yet
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            path = Path(
                keras.utils.get_file(
                    name, origin=origin + name, file_hash=gz_md5, hash_algorithm="md5",
                    cache_dir=str(cache_dir), cache_subdir="",
                )
            )  # fmt: skip
        except ValueError as err:  # get_file's checksum mismatch
            raise DatasetError(
                f"Downloaded {origin + name} does not match its published MD5 {gz_md5} ({err}); "
                f"delete {cache_dir / name} and retry, or install Debian's copy with "
                "`apt-get install dataset-fashion-mnist`."
            ) from err
        except Exception as err:  # get_file re-raises network failures as bare Exception
            raise DatasetError(
                f"Fashion-MNIST is not installed ({local or 'no data_dir'} is missing) and "
                f"{origin + name} could not be downloaded ({err}). Install it with "
                "`apt-get install dataset-fashion-mnist`."
            ) from err
    raw = gzip.decompress(path.read_bytes())
    if hashlib.sha256(raw).hexdigest() != raw_sha256:
        raise DatasetError(
            f"{path} does not decompress to the Fashion-MNIST {name} (SHA-256 of its content "
            f"is not {raw_sha256}); replace or delete it."
        )
    return raw


def load_fashion_mnist(
    split: str = "train",
    *,
    data_dir: str | Path | None = DEBIAN_FASHION_MNIST,
    cache_dir: str | Path | None = None,
    origin: str = FASHION_MNIST_ORIGIN,
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images uint8 [N,28,28], labels uint8 [N])`` for ``split``: Debian's
    copy in ``data_dir`` when installed, else the canonical files from ``origin``."""
    if split not in FASHION_MNIST_FILES:
        raise DatasetError(f"Received `split={split!r}`: expected 'train' or 'test'")
    cache = Path(cache_dir or Path.home() / ".cache" / "graft" / "fashion-mnist")
    folder = Path(data_dir) if data_dir else None
    images, labels = (
        _read_idx(fetch_idx(name, md5, sha, data_dir=folder, cache_dir=cache, origin=origin), name)
        for name, md5, sha in FASHION_MNIST_FILES[split]
    )
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
