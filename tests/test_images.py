"""Tests for jretrieval.datasets.images: decoding, crop/resize semantics, batching, prefetching.

References are written here with plain Pillow calls in cirtorch's order (``convert("RGB")``,
``crop(bbx)``, ``thumbnail`` / ``resize``); images are PNG so the comparisons are exact.
"""

from __future__ import annotations

import threading
import time

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
