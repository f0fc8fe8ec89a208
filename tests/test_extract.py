"""Tests for jretrieval.extract.extract, jretrieval.steps and the HDF5 store (jretrieval.store).

A tiny Flax CNN stands in for the encoder. References are computed image by image: Pillow
decoding (``load_image``), float64 NumPy normalisation, the module applied to that one image,
NumPy pooling (MAC = max, SPoC = mean over H, W) and Pillow's float bilinear resize for
``map_size``. Tolerances: rtol 1e-5 / atol 1e-6 (float32 maps), atol 1e-5 for the resize.
The interrupted-run test compares HDF5 contents bit for bit.
"""

from __future__ import annotations

import os
import threading
from typing import ClassVar

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jretrieval import store as store_lib
from jretrieval.datasets import images as im
from jretrieval.extract import extract
from jretrieval.models import Encoder
from jretrieval.steps import Loading, Pooling, padded_batch_size

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class Tiny(nn.Module):
    """conv3x3/2 + BN + ReLU: ``[B, H, W, 3] -> [B, ceil(H/2), ceil(W/2), 8]``."""

    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, *, train=False):
        x = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, name="bn")(x)
        return nn.relu(x), {}


class TinyWithHead(Tiny):
    has_descriptor: ClassVar[bool] = True

    @nn.compact
    def __call__(self, x, *, train=False):
        fmap, _ = Tiny.__call__(self, x, train=train)
        return fmap, {"descriptor": jnp.mean(fmap, axis=(1, 2)) * 2.0}


def _encoder(module=None, seed=0):
    module = module or Tiny()
    variables = module.init(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)))
    stats = variables["batch_stats"]["bn"]
    variables = {
        "params": variables["params"],
        "batch_stats": {"bn": {"mean": stats["mean"] + 0.1, "var": stats["var"] * 0.5}},
    }
    return Encoder(module, variables, {"name": "tiny"}, {"mean": MEAN, "std": STD}, {})


def _images(tmp_path, n, sizes=((24, 32), (32, 24), (20, 20))):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        path = str(tmp_path / f"im{i:02d}.png")
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def _reference(encoder, paths, *, policy, bbx=None, pooling="mac", map_size=None):
    rows = []
    for i, path in enumerate(paths):
        img = im.load_image(path, bbx=None if bbx is None else bbx[i], policy=policy)
        x = (img.astype(np.float64) / 255 - np.asarray(MEAN)) / np.asarray(STD)
        fmap = np.asarray(
            encoder.module.apply(encoder.variables, jnp.asarray(x[None], jnp.float32))[0][0],
            np.float64,
        )
        if map_size is not None:
            fmap = np.stack(
                [
                    np.asarray(
                        Image.fromarray(fmap[..., c].astype(np.float32), mode="F").resize(
                            map_size[::-1], Image.Resampling.BILINEAR
                        )
                    )
                    for c in range(fmap.shape[-1])
                ],
                axis=-1,
            )
        rows.append(fmap.max(axis=(0, 1)) if pooling == "mac" else fmap.mean(axis=(0, 1)))
    return np.stack(rows)


def test_padded_batch_size():
    assert [padded_batch_size(b, 8) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]
    assert [padded_batch_size(b, 6, 4) for b in (1, 3, 5, 6)] == [4, 4, 8, 8]


def test_extract_fixed_policy_equals_per_image_reference(tmp_path):
    encoder, paths = _encoder(), _images(tmp_path, 7)
    policy = im.ResizePolicy("fixed", 16)
    for pooling in ("mac", "spoc"):
        desc, report = extract(encoder, paths, loading=Loading(policy, 4), pooling=pooling)
        ref = _reference(encoder, paths, policy=policy, pooling=pooling)
        np.testing.assert_allclose(desc, ref, rtol=1e-5, atol=1e-6)
        assert desc.dtype == np.float32 and desc.shape == (7, 8)
        np.testing.assert_array_equal(report["kept"], np.arange(7))
        assert report["shapes"] == [(4, 16, 16, 3)]  # the last 3 images padded: one compile
        assert report["skipped"] == [] and report["store"] is None
    # a second extraction with the same shapes compiles nothing new
    from jretrieval.steps import _describe

    before = _describe[0]._cache_size() + _describe[1]._cache_size()
    extract(encoder, paths[:5], loading=Loading(policy, 4), pooling="mac")  # 4 + 1 -> 4 + 1
    extract(encoder, paths[:3], loading=Loading(policy, 4), pooling="mac")  # 3 -> padded 4
    after = _describe[0]._cache_size() + _describe[1]._cache_size()
    assert after == before + 1  # only the padded size 1 was new


def test_extract_max_side_with_boxes_and_map_size(tmp_path):
    encoder, paths = _encoder(), _images(tmp_path, 6)
    policy = im.ResizePolicy("max_side", 24)
    bbx = [None, (2, 3, 20, 15), None, None, (0, 0, 10, 24), None]
    desc, report = extract(encoder, paths, bbx=bbx, loading=Loading(policy, 2), pooling="mac")
    np.testing.assert_allclose(desc, _reference(encoder, paths, policy=policy, bbx=bbx), 1e-5, 1e-6)
    # images 0, 3: 24x32 -> 18x24; 2, 5: 20x20 (never enlarged); 1 and 4 are crops
    assert {s[1:3] for s in report["shapes"]} == {(18, 24), (20, 20), (9, 13), (18, 8)}
    pooling = Pooling.of("spoc", map_size=(5, 4))
    desc, _ = extract(encoder, paths, loading=Loading(policy, 3), pooling=pooling)
    ref = _reference(encoder, paths, policy=policy, pooling="spoc", map_size=(5, 4))
    np.testing.assert_allclose(desc, ref, atol=1e-5)


def test_model_pooling_and_bad_arguments(tmp_path):
    paths = _images(tmp_path, 3)
    policy = im.ResizePolicy("fixed", 16)
    head = _encoder(TinyWithHead())
    desc, _ = extract(head, paths, loading=Loading(policy, 2), pooling="model")
    np.testing.assert_allclose(
        desc, 2 * _reference(head, paths, policy=policy, pooling="spoc"), 1e-5, 1e-6
    )
    encoder = _encoder()
    from jretrieval.pooling import POOLING  # kwargs reach the pooling (tested itself by CORE)

    for pooling, kwargs in (("rmac", {"levels": 2}), ("gem", {"p": 4.0})):
        desc, _ = extract(
            encoder, paths, loading=Loading(policy, 2), pooling=Pooling.of(pooling, kwargs)
        )
        for i, path in enumerate(paths):
            x = (im.load_image(path, policy=policy) / 255 - np.asarray(MEAN)) / np.asarray(STD)
            fmap = encoder.module.apply(encoder.variables, jnp.asarray(x[None], jnp.float32))[0]
            ref = np.asarray(POOLING[pooling](fmap, **kwargs))[0]
            np.testing.assert_allclose(desc[i], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no global descriptor"):
        extract(encoder, paths, loading=Loading(policy), pooling="model")
    with pytest.raises(ValueError, match=r"unknown pooling 'max'.*mac"):
        extract(encoder, paths, loading=Loading(policy), pooling="max")
    with pytest.raises(ValueError, match="bbx has 1 boxes for 3 paths"):
        extract(encoder, paths, loading=Loading(policy), pooling="mac", bbx=[(0, 0, 4, 4)])


def _h5_content(path):
    with h5py.File(path, "r") as f:
        data = {k: f[k][...] for k in f}
        attrs = dict(f.attrs)
    return data, attrs


def _assert_same_h5(a, b):
    (da, aa), (db, ab) = _h5_content(a), _h5_content(b)
    assert sorted(da) == sorted(db) == ["descriptors", "done", "failed", "ids"]
    for key in da:
        np.testing.assert_array_equal(da[key], db[key])
    assert aa.keys() == ab.keys()
    for key in aa:
        assert aa[key] == ab[key], key


class FailAfter:
    """A loader that raises after ``n`` successful images (a crash mid-extraction)."""

    def __init__(self, n=None):
        self.n, self.calls, self.lock = n, 0, threading.Lock()

    def __call__(self, path, *, bbx, policy):
        with self.lock:
            self.calls += 1
            if self.n is not None and self.calls > self.n:
                raise RuntimeError("simulated crash")
        return im.load_image(path, bbx=bbx, policy=policy)


def test_interrupted_extraction_resumes_to_the_same_file(tmp_path):
    encoder, paths = _encoder(), _images(tmp_path, 21)
    loading = Loading(im.ResizePolicy("fixed", 16), 4, prefetch=1)
    kw = dict(pooling="mac", loading=loading)
    settings = {"model": "tiny", "dataset": "unit"}
    full = str(tmp_path / "full.h5")
    ref, _ = extract(encoder, paths, store=full, settings=settings, **kw)
    crash = dict(pooling="mac", loading=loading._replace(loader=FailAfter(10)))

    store = str(tmp_path / "resumed.h5")
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(encoder, paths, store=store, settings=settings, **crash)
    assert not os.path.exists(store)  # nothing that looks complete
    partial = store + store_lib.PARTIAL_SUFFIX
    with h5py.File(partial, "r") as f:
        completed, complete = int(f.attrs["completed"]), bool(f.attrs["complete"])
        assert np.count_nonzero(f["done"][...]) == completed
    assert complete is False and 0 < completed < len(paths) and completed % 4 == 0
    with pytest.raises(store_lib.StoreCorruptError, match="incomplete"):
        store_lib.read_store(partial)

    loader = FailAfter()
    kw["loading"] = loading._replace(loader=loader)
    desc, report = extract(encoder, paths, store=store, settings=settings, **kw)
    assert report["resumed"] == completed and loader.calls == len(paths) - completed
    assert not os.path.exists(partial) and os.path.exists(store)
    np.testing.assert_array_equal(desc, ref)
    _assert_same_h5(store, full)
    got, ids, info = store_lib.read_store(store)
    np.testing.assert_array_equal(got, ref)
    assert ids == paths and info["settings"]["user"] == settings


def test_store_reuse_and_never_stale(tmp_path):
    encoder, paths = _encoder(), _images(tmp_path, 5)
    kw = dict(loading=Loading(im.ResizePolicy("fixed", 16), 4))
    path = str(tmp_path / "d.h5")
    first, report = extract(encoder, paths, pooling="mac", store=path, settings={"a": 1}, **kw)
    assert report["reused"] is False
    never = FailAfter(0)  # a reused store decodes nothing
    again, report = extract(
        encoder,
        paths,
        pooling="mac",
        store=path,
        settings={"a": 1},
        loading=kw["loading"]._replace(loader=never),
    )
    assert report["reused"] is True and never.calls == 0
    np.testing.assert_array_equal(again, first)
    for change in (
        dict(pooling="spoc", settings={"a": 1}),
        dict(pooling="mac", settings={"a": 2}),
        dict(pooling=Pooling.of("mac", map_size=(4, 4)), settings={"a": 1}),
    ):
        with pytest.raises(store_lib.StoreMismatchError, match="other settings"):
            extract(encoder, paths, store=path, **change, **kw)
    recalibrated = encoder.replace(
        variables={**encoder.variables, "batch_stats": {"bn": {"mean": 0, "var": 1}}}
    )
    with pytest.raises(store_lib.StoreMismatchError, match="variables_sha256"):
        extract(recalibrated, paths, pooling="mac", store=path, settings={"a": 1}, **kw)
    with pytest.raises(store_lib.StoreMismatchError, match="ids_sha256"):
        extract(encoder, paths[::-1], pooling="mac", store=path, settings={"a": 1}, **kw)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(paths[3])  # a file rewritten in place
    with pytest.raises(store_lib.StoreMismatchError, match="files_sha256"):
        extract(encoder, paths, pooling="mac", store=path, settings={"a": 1}, **kw)
    a = store_lib.store_path(tmp_path, model="m/x", dataset="d", settings={"p": 1})
    b = store_lib.store_path(tmp_path, model="m/x", dataset="d", settings={"p": 2})
    assert a != b and os.path.dirname(a) == str(tmp_path) and "/x" not in os.path.basename(a)


def test_unreadable_partial_is_restarted(tmp_path):
    encoder, paths = _encoder(), _images(tmp_path, 5)
    policy = im.ResizePolicy("fixed", 16)
    kw = dict(loading=Loading(policy, 2), pooling="mac")
    path = str(tmp_path / "d.h5")
    with open(path + store_lib.PARTIAL_SUFFIX, "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n truncated by a crash")
    desc, report = extract(encoder, paths, store=path, **kw)
    assert report["resumed"] == 0
    np.testing.assert_allclose(desc, _reference(encoder, paths, policy=policy), 1e-5, 1e-6)
    aside = [n for n in os.listdir(tmp_path) if ".partial.corrupt-" in n]
    assert len(aside) == 1  # moved aside, not deleted


def test_corrupt_images(tmp_path):
    encoder, paths = _encoder(), _images(tmp_path, 6)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    paths[2] = str(bad)
    policy = im.ResizePolicy("fixed", 16)
    kw = dict(loading=Loading(policy, 4), pooling="mac")
    skip = dict(loading=Loading(policy, 4, skip_corrupt=True), pooling="mac")
    path = str(tmp_path / "d.h5")
    with pytest.raises(im.CorruptImageError, match="bad.jpg"):
        extract(encoder, paths, store=path, **kw)
    assert not os.path.exists(path)
    desc, report = extract(encoder, paths, store=path, **skip)
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(report["kept"], keep)
    assert [p for p, _ in report["skipped"]] == [str(bad)] and "bad.jpg" in report["skipped"][0][1]
    ref = _reference(encoder, [paths[i] for i in keep], policy=policy)
    np.testing.assert_allclose(desc, ref, rtol=1e-5, atol=1e-6)
    assert np.isfinite(desc).all() and np.abs(desc).sum(axis=1).min() > 0  # no zero rows
    again, report2 = extract(encoder, paths, store=path, **skip)
    assert report2["reused"] and report2["skipped"] == report["skipped"]
    np.testing.assert_array_equal(again, desc)
    desc_mem, report3 = extract(encoder, paths, **skip)  # no store
    np.testing.assert_array_equal(report3["kept"], keep)
    np.testing.assert_allclose(desc_mem, desc, rtol=1e-6)
