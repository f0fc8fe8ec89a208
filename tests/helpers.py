"""Shared scaffolding for the tests: a tiny BN encoder and a generated dataset with its config.

``TinyNet`` is two strided 3x3 convs with BatchNorm (torch eps) and ReLU, registered in the model
zoo as ``"tiny"`` by the ``tiny_zoo`` fixture (``tests/conftest.py``). ``make_dataset`` writes a
few dozen JPEGs (5 instances x 4 views, 6 distractors, 5 queries with boxes) and a ground-truth
pickle in the cirtorch/revisitop format; ``make_config`` points a paper config at it with two tiny
zoo entries (``tiny_a``, ``tiny_b``) so that a whole run takes seconds.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from configs import common
from jretrieval.models import convdot

DIFF = {"truncation": 24, "kd": 6, "kq": 4, "gamma": 3.0, "alpha": 0.99, "mode": "joint"}
N_INSTANCES, N_VIEWS, N_DISTRACTORS = 5, 4, 6


class TinyNet(nn.Module):
    """Two strided 3x3 convs with BatchNorm (torch eps) and ReLU: ``[B,H,W,3] -> [B,H/4,W/4,C]``."""

    features: int = 32
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32  # compute dtype (Encoder.with_dtype); variables stay float32
    conv_dot: bool = False  # convolutions by jretrieval.models.convdot (Encoder.with_dtype)

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        stages = {}
        for i, feat in enumerate((16, self.features)):
            conv = nn.Conv(
                feat,
                (3, 3),
                (2, 2),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                dtype=self.dtype,
                conv_general_dilated=convdot.conv_dot if self.conv_dot else None,
                name=f"conv{i + 1}",
            )
            x = conv(x.astype(self.dtype))
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=1e-5,
                dtype=self.dtype,
                name=f"bn{i + 1}",
            )(x)
            x = nn.relu(x)
            stages[f"layer{i + 1}"] = x
        return x, stages


def _pattern(rng: np.random.Generator) -> Image.Image:
    """A 96x96 colour image: smooth random field plus a few rectangles."""
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((96, 96), Image.Resampling.BICUBIC)
    arr = np.asarray(im).copy()
    for _ in range(4):
        x, y = rng.integers(0, 80, 2)
        w, h = rng.integers(8, 24, 2)
        arr[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    return Image.fromarray(arr)


def _view(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    cw, ch = (rng.uniform(0.7, 0.9, 2) * (w, h)).astype(int)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    out = im.crop((x, y, x + cw, y + ch)).resize(tuple(rng.integers(56, 80, 2)))
    arr = np.asarray(out).astype(np.float32) * rng.uniform(0.8, 1.2)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_dataset(root: str, name: str, *, revisited: bool, seed: int = 0) -> None:
    """Writes ``<root>/<name>/jpg/*.jpg`` and ``gnd_<name>.pkl`` (cirtorch/revisitop format)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, name, "jpg")
    os.makedirs(folder)
    imlist, qimlist, owners = [], [], []
    sources = [_pattern(rng) for _ in range(N_INSTANCES + N_DISTRACTORS)]
    for i in range(N_INSTANCES):
        for v in range(N_VIEWS):
            imlist.append(f"inst{i}_v{v}")
            owners.append(i)
        qimlist.append(f"query{i}")
    for d in range(N_DISTRACTORS):
        imlist.append(f"distractor{d}")
        owners.append(-1)
    order = rng.permutation(len(imlist))
    imlist, owners = [imlist[k] for k in order], [owners[k] for k in order]
    for n, owner in zip(imlist, owners, strict=True):
        src = sources[owner if owner >= 0 else N_INSTANCES + int(n[len("distractor") :])]
        _view(src, rng).save(os.path.join(folder, n + ".jpg"), quality=92)
    gnd = []
    for i in range(N_INSTANCES):
        q = _view(sources[i], rng)
        q.save(os.path.join(folder, f"query{i}.jpg"), quality=92)
        w, h = q.size
        bbx = [float(w // 10), float(h // 10), float(w - w // 8), float(h - h // 8)]
        mine = [k for k, o in enumerate(owners) if o == i]
        if revisited:
            gnd.append(
                {
                    "bbx": bbx,
                    "easy": np.array(mine[:2]),
                    "hard": np.array(mine[2:3]),
                    "junk": np.array(mine[3:]),
                }
            )
        else:
            gnd.append({"bbx": bbx, "ok": np.array(mine[:3]), "junk": np.array(mine[3:])})
    with open(os.path.join(root, name, f"gnd_{name}.pkl"), "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)


def make_config(tmp: str, dataset: str, **overrides) -> ml_collections.ConfigDict:
    config = common.base_config(dataset)
    config.workdir = os.path.join(tmp, "run")
    config.data.root = os.path.join(tmp, "data")
    for m, seed in (("tiny_a", 0), ("tiny_b", 1)):
        config.model_zoo[m] = {
            "label": m.upper(),
            "file": None,
            "architecture": {"name": "tiny", "features": 32},
            "seed": seed,
            "pooling": None,
            "map_size": None,
        }
    config.models = ("tiny_a",)
    config.extraction.policy.size = 48
    config.extraction.batch_size = 8
    config.bn.batch_size = 8
    config.whitening.dim = 16
    config.diffusion = ml_collections.ConfigDict(DIFF)
    config.output.top10_queries = 2
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config
