"""Tests for jretrieval.datasets.images: decoding, crop/resize semantics, batching, prefetching.

References are written here with plain Pillow calls in cirtorch's order (``convert("RGB")``,
``crop(bbx)``, ``thumbnail`` / ``resize``); images are PNG so the comparisons are exact.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from jretrieval.datasets import images as im


def _write(path, shape, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return str(path)


def _cirtorch_reference(path, size, bbx=None):
    """cirtorch ``ImagesFromList.__getitem__`` + ``imresize`` (thumbnail, Lanczos)."""
    img = Image.open(path).convert("RGB")
    full = max(img.size)
    if bbx is not None:
        img = img.crop(bbx)
        limit = size * max(img.size) / full
    else:
        limit = size
    img.thumbnail((limit, limit), Image.Resampling.LANCZOS, reducing_gap=None)
    return np.asarray(img)


def test_target_size_matches_pillow_thumbnail():
    rng = np.random.default_rng(0)
    cases = [(1024, 768, 1024), (768, 1024, 1024), (1, 500, 100), (500, 1, 100), (40, 30, 50)]
    cases += [tuple(int(v) for v in rng.integers(1, 1500, 3)) for _ in range(300)]
    policy = im.ResizePolicy("max_side", 1)
    for w, h, limit in cases:
        ref = Image.new("L", (w, h))
        ref.thumbnail((limit, limit))
        assert im._thumbnail_size(w, h, limit) == ref.size, (w, h, limit)
        got = im.target_size(w, h, bbx=None, policy=policy._replace(size=limit))
        assert got == ref.size


def test_load_image_max_side_equals_cirtorch(tmp_path):
    path = _write(tmp_path / "a.png", (61, 83, 3))
    for size in (40, 83, 200):  # shrink, exact, never enlarged
        np.testing.assert_array_equal(
            im.load_image(path, policy={"mode": "max_side", "size": size}),
            _cirtorch_reference(path, size),
        )
    for bbx in [(3.4, 5.6, 50.2, 40.0), (0, 0, 83, 61), (10, 2, 12, 60)]:
        got = im.load_image(path, bbx=bbx, policy=im.ResizePolicy("max_side", 40))
        np.testing.assert_array_equal(got, _cirtorch_reference(path, 40, bbx))
    # hand-checked: a 37x26 crop (rounded box) of an image of max side 83 at size 40 keeps the
    # scale 40/83: limit floor(40*37/83) = 17 -> 17 x 12.
    got = im.load_image(path, bbx=(3.4, 5.6, 40.2, 31.5), policy=im.ResizePolicy("max_side", 40))
    assert got.shape == (12, 17, 3)


def test_load_image_fixed_equals_pillow_bilinear(tmp_path):
    path = _write(tmp_path / "a.png", (61, 83, 3), seed=1)
    ref = Image.open(path).convert("RGB").crop((5, 6, 50, 41))
    ref = np.asarray(ref.resize((32, 32), Image.Resampling.BILINEAR))
    got = im.load_image(path, bbx=(5, 6, 50, 41), policy={"mode": "fixed", "size": 32})
    np.testing.assert_array_equal(got, ref)
    assert got.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_load_image_converts_to_rgb(tmp_path, mode):
    ext = "jpg" if mode == "CMYK" else "png"
    path = _write(tmp_path / f"a.{ext}", (20, 30, 3), mode=mode)
    got = im.load_image(path, policy=im.ResizePolicy("max_side", 100))
    assert got.shape == (20, 30, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(Image.open(path).convert("RGB")))


def test_bad_inputs(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(im.CorruptImageError, match="broken.jpg"):
        im.load_image(bad, policy=im.ResizePolicy())
    truncated = tmp_path / "truncated.jpg"
    _write(tmp_path / "full.jpg", (64, 64, 3))
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    with pytest.raises(im.CorruptImageError, match="truncated.jpg"):
        im.load_image(truncated, policy=im.ResizePolicy())
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        im.load_image(tmp_path / "missing.jpg", policy=im.ResizePolicy())
    good = _write(tmp_path / "a.png", (10, 10, 3))
    with pytest.raises(ValueError, match="empty"):
        im.load_image(good, bbx=(5, 5, 5, 9), policy=im.ResizePolicy())
    with pytest.raises(ValueError, match="mode"):
        im.as_policy({"mode": "square", "size": 3})
    with pytest.raises(ValueError, match="unknown keys"):
        im.as_policy({"mode": "fixed", "side": 3})


def _dataset(tmp_path, n=11):
    sizes = [(40, 60), (60, 40), (40, 60), (30, 30), (60, 40)]
    return [_write(tmp_path / f"{i}.png", (*sizes[i % 5], 3), seed=i) for i in range(n)]


def test_plan_batches_buckets_by_shape(tmp_path):
    paths = _dataset(tmp_path)
    fixed = im.plan_batches(paths, policy=im.ResizePolicy("fixed", 16), batch_size=4)
    assert [list(i) for _, i in fixed] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert {s for s, _ in fixed} == {(16, 16)}
    bbx = [None] * len(paths)
    bbx[2] = (0, 0, 20, 30)
    plan = im.plan_batches(paths, bbx=bbx, policy=im.ResizePolicy("max_side", 30), batch_size=2)
    seen = np.sort(np.concatenate([i for _, i in plan]))
    np.testing.assert_array_equal(seen, np.arange(len(paths)))
    for shape, idx in plan:
        assert 1 <= len(idx) <= 2 and np.all(np.diff(idx) > 0)
        for i in idx:
            assert (
                im.load_image(paths[i], bbx=bbx[i], policy=im.ResizePolicy("max_side", 30)).shape[
                    :2
                ]
                == shape
            )
    assert len({s for s, _ in plan}) == 4  # 30x20, 20x30, 30x30 and the crop's own shape


def test_iterate_batches_content_and_order(tmp_path):
    paths = _dataset(tmp_path)
    policy = im.ResizePolicy("max_side", 30)
    plan = im.plan_batches(paths, policy=policy, batch_size=3)
    batches = list(im.iterate_batches(paths, policy=policy, batch_size=3, num_threads=3))
    assert [list(b.indices) for b in batches] == [list(i) for _, i in plan]
    for b in batches:
        for j, i in enumerate(b.indices):
            np.testing.assert_array_equal(b.images[j], im.load_image(paths[i], policy=policy))


def test_iterate_batches_prefetches_a_bounded_number_ahead(tmp_path):
    paths = [_write(tmp_path / "a.png", (8, 8, 3))] * 40
    calls = []
    lock = threading.Lock()

    def loader(path, *, bbx, policy):
        with lock:
            calls.append(path)
        return im.load_image(path, bbx=bbx, policy=policy)

    policy, bs, prefetch = im.ResizePolicy("fixed", 8), 4, 2
    it = im.iterate_batches(paths, policy=policy, batch_size=bs, prefetch=prefetch, loader=loader)
    next(it)
    time.sleep(0.3)  # the consumer is "busy": decoding must go on ahead, but only so far
    assert len(calls) == (prefetch + 2) * bs  # the batch held, prefetch+1 queued
    rest = list(it)
    assert len(rest) == 9 and len(calls) == 40


def test_iterate_batches_corrupt(tmp_path):
    paths = _dataset(tmp_path, n=6)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    paths[4] = str(tmp_path / "bad.jpg")
    policy = im.ResizePolicy("fixed", 8)
    with pytest.raises(im.CorruptImageError, match="bad.jpg"):
        list(im.iterate_batches(paths, policy=policy, batch_size=4))
    batches = list(im.iterate_batches(paths, policy=policy, batch_size=4, skip_corrupt=True))
    assert [list(b.indices) for b in batches] == [[0, 1, 2, 3], [5]]
    assert batches[1].images.shape == (1, 8, 8, 3)
    assert batches[1].failed[0][0] == 4 and "bad.jpg" in batches[1].failed[0][1]
    # max_side: the corrupt header is planned in its own group and skipped there
    batches = list(
        im.iterate_batches(
            paths, policy=im.ResizePolicy("max_side", 30), batch_size=4, skip_corrupt=True
        )
    )
    assert sorted(int(i) for b in batches for i in b.indices) == [0, 1, 2, 3, 5]
    assert [f[0] for b in batches for f in b.failed] == [4]


# ----------------------------------------------------------------------------- bit depth


def test_sixteen_bit_grey_matches_its_eight_bit_twin(tmp_path):
    """issue 9 item 3: Pillow's ``I;16 -> RGB`` clipped (mean 222 for a 104.6 picture)."""
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 65536, size=(37, 53), dtype=np.uint16)
    eight = np.round(wide / 257.0).astype(np.uint8)  # the plain reference
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(eight).save(tmp_path / "eight.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    for policy in (im.ResizePolicy("max_side", 100), im.ResizePolicy("fixed", 24)):
        got = im.load_image(tmp_path / "wide.png", policy=policy).astype(np.float64)
        ref = im.load_image(tmp_path / "eight.png", policy=policy).astype(np.float64)
        assert abs(got.mean() - ref.mean()) < 1.0  # within one grey level
        assert np.abs(got - ref).max() <= 1.0  # rounding of v/257 only
    # an exact 16-bit copy (v = 257 b) decodes to the same bytes, and no pixel saturates
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "copy.png")
    got = im.load_image(tmp_path / "copy.png", policy=im.ResizePolicy("max_side", 100))
    np.testing.assert_array_equal(got, np.repeat(eight[:, :, None], 3, axis=2))


def test_float_and_int32_images_scaled(tmp_path):
    rng = np.random.default_rng(4)
    unit = rng.random((20, 30)).astype(np.float32)
    Image.fromarray(unit, "F").save(tmp_path / "unit.tiff")
    got = im.load_image(tmp_path / "unit.tiff", policy=im.ResizePolicy("max_side", 100))
    np.testing.assert_array_equal(got[:, :, 0], np.round(unit.astype(np.float64) * 255))
    grey = (unit * 300).astype(np.float32)  # not in [0, 1]: grey levels, clipped at 255
    Image.fromarray(grey, "F").save(tmp_path / "grey.tiff")
    got = im.load_image(tmp_path / "grey.tiff", policy=im.ResizePolicy("max_side", 100))
    np.testing.assert_array_equal(got[:, :, 1], np.clip(np.round(grey), 0, 255))
    ints = rng.integers(0, 65536, size=(20, 30)).astype(np.int32)
    Image.fromarray(ints, "I").save(tmp_path / "ints.tiff")
    got = im.load_image(tmp_path / "ints.tiff", policy=im.ResizePolicy("max_side", 100))
    np.testing.assert_array_equal(got[:, :, 2], np.round(ints / 257.0))


# ----------------------------------------------------------------------------- boxes


def test_boxes_clipped_to_the_image(tmp_path):
    path = _write(tmp_path / "a.png", (61, 83, 3), seed=5)
    policy = im.ResizePolicy("max_side", 200)
    full = np.asarray(Image.open(path).convert("RGB"))
    # partly outside: clipped (Pillow would pad with black), never larger than the image
    got = im.load_image(path, bbx=(-10, 20, 1e9, 1e9), policy=policy)
    np.testing.assert_array_equal(got, full[20:, :])
    got = im.load_image(path, bbx=(0, 0, 1e9, 1e9), policy=im.ResizePolicy("fixed", 16))
    ref = Image.open(path).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(got, np.asarray(ref))
    assert im.target_size(83, 61, bbx=(0, 0, 1e9, 1e9), policy=policy) == (83, 61)


@pytest.mark.parametrize(
    "box", [(100, 100, 200, 200), (-50, -50, 0, 10), (83, 0, 90, 10), (0, 61, 10, 70)]
)
def test_box_without_area_inside_is_refused(tmp_path, box):
    path = _write(tmp_path / "q.png", (61, 83, 3))
    with pytest.raises(im.InvalidBoxError, match=r"q\.png.*no area inside the 83x61 image"):
        im.load_image(path, bbx=box, policy=im.ResizePolicy())
    assert issubclass(im.InvalidBoxError, im.CorruptImageError)


def test_malformed_boxes_refused(tmp_path):
    path = _write(tmp_path / "q.png", (10, 10, 3))
    for box in [(1, 2, 3), (0, 0, float("nan"), 5), (0, 0, float("inf"), 5), ("a", 0, 1, 1)]:
        with pytest.raises(im.InvalidBoxError, match="q.png"):
            im.load_image(path, bbx=box, policy=im.ResizePolicy())


def test_bad_box_skipped_with_skip_corrupt(tmp_path):
    paths = _dataset(tmp_path, n=3)
    boxes = [None, (500, 500, 600, 600), None]
    for policy in (im.ResizePolicy("fixed", 8), im.ResizePolicy("max_side", 30)):
        with pytest.raises(im.InvalidBoxError, match="1.png"):
            list(im.iterate_batches(paths, bbx=boxes, policy=policy, batch_size=4))
        batches = list(
            im.iterate_batches(paths, bbx=boxes, policy=policy, batch_size=4, skip_corrupt=True)
        )
        assert sorted(int(i) for b in batches for i in b.indices) == [0, 2]
        failed = [f for b in batches for f in b.failed]
        assert [f[0] for f in failed] == [1] and "no area inside" in failed[0][1]


# ----------------------------------------------------------------------------- bombs


def _png_header_only(path, width: int, height: int) -> str:
    """A PNG whose header claims ``width x height`` grey pixels (the pixel data is absent)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    data += chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [20000, 10000])  # beyond Pillow's error / warning limit
def test_decompression_bomb_named_and_skipped(tmp_path, side):
    bomb = _png_header_only(tmp_path / "bomb.png", side, side)
    pixels = str(side * side)
    with pytest.raises(im.ImageTooLargeError, match=rf"bomb\.png.*{pixels} pixels"):
        im.load_image(bomb, policy=im.ResizePolicy())
    with pytest.raises(im.ImageTooLargeError, match=r"bomb\.png"):
        im.image_size(bomb)
    paths = _dataset(tmp_path, n=3)
    paths[1] = bomb
    for policy in (im.ResizePolicy("fixed", 8), im.ResizePolicy("max_side", 30)):
        with pytest.raises(im.CorruptImageError, match=r"bomb\.png"):
            list(im.iterate_batches(paths, policy=policy, batch_size=4))
        batches = list(im.iterate_batches(paths, policy=policy, batch_size=4, skip_corrupt=True))
        assert sorted(int(i) for b in batches for i in b.indices) == [0, 2]
        assert [f[0] for b in batches for f in b.failed] == [1]


def test_max_pixels_is_a_setting(tmp_path):
    path = _write(tmp_path / "a.png", (20, 30, 3))
    with pytest.raises(im.ImageTooLargeError, match="600 pixels exceeds the limit of 599"):
        im.load_image(path, policy=im.ResizePolicy(), max_pixels=599)
    assert im.load_image(path, policy=im.ResizePolicy("max_side", 50), max_pixels=600).shape == (
        20,
        30,
        3,
    )
    previous = im.set_max_pixels(599)
    try:
        assert im.get_max_pixels() == 599
        with pytest.raises(im.ImageTooLargeError, match="a.png"):
            im.load_image(path, policy=im.ResizePolicy())
        with pytest.raises(ValueError, match="max_pixels"):
            im.set_max_pixels(0)
    finally:
        im.set_max_pixels(previous)
    assert im.get_max_pixels() == im.DEFAULT_MAX_PIXELS


def test_raised_max_pixels_also_raises_pillows_limit(tmp_path):
    """Pillow refuses beyond twice its own limit; a trusted larger image must still open."""
    big = _png_header_only(tmp_path / "big.png", 20000, 10000)  # 2e8 > 2 x 89478485
    with pytest.raises(im.ImageTooLargeError, match="200000000 pixels"):
        im.image_size(big)
    previous = im.set_max_pixels(300_000_000)
    try:
        assert im.image_size(big) == (20000, 10000)  # header only: nothing decoded
    finally:
        im.set_max_pixels(previous)
    assert Image.MAX_IMAGE_PIXELS == im.DEFAULT_MAX_PIXELS
