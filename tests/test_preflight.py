"""Tests for jretrieval.preflight: every early check fails fast, before any image is decoded.

issue 9 ("Check before the hours of work"): each bad setting, folder or model file below used
to fail only after BN recalibration and extraction (hours on real data), or never. Here
``experiment.run`` must refuse it within ``FAST`` seconds while decoding is booby-trapped
(``images.to_rgb8`` raises), so a failure proves that no image was decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time

import numpy as np
import pytest

from jretrieval import experiment, models, preflight, report
from jretrieval.datasets import images
from tests.helpers import N_DISTRACTORS, N_INSTANCES, N_VIEWS, make_config, make_dataset

#: seconds an early refusal may take (it takes well under one; the machine may be loaded).
FAST = 10.0
N_DATABASE = N_INSTANCES * N_VIEWS + N_DISTRACTORS  # 26
N_QUERIES = N_INSTANCES


@pytest.fixture
def data(tmp_path):
    make_dataset(os.path.join(tmp_path, "data"), "oxford5k", revisited=False, seed=4)
    return str(tmp_path)


@pytest.fixture
def no_decoding(monkeypatch):
    def trap(img):
        raise AssertionError("an image was decoded before the early checks finished")

    monkeypatch.setattr(images, "to_rgb8", trap)


def refused_fast(config, error, match):
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        experiment.run(config)
    elapsed = time.perf_counter() - start
    assert elapsed < FAST, f"refused after {elapsed:.1f}s"
    return info.value


def test_the_trap_catches_decoding(data, tiny_zoo, no_decoding):
    """The booby trap is live: a valid config passes every check and then hits it."""
    with pytest.raises(AssertionError, match="an image was decoded"):
        experiment.run(make_config(data, "oxford5k"))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"extraction.batch_size": 0}, r"extraction\.batch_size=0; expected a positive"),
        ({"bn.batch_size": -1}, r"bn\.batch_size=-1"),
        ({"extraction.max_pixels": 0}, r"extraction\.max_pixels=0"),
        ({"pooling.name": "maxx"}, r"pooling\.name='maxx'.*expected one of \['gem', 'mac'"),
        ({"pooling.levels": -1}, r"pooling\.levels=-1; expected an integer >= 0"),
        ({"pooling.name": "gem", "pooling.p": 0.0}, r"pooling\.p=0\.0"),
        ({"whitening.dim": N_DATABASE + 1}, rf"whitening\.dim=27 exceeds the {N_DATABASE} "),
        ({"whitening.dim": (8, 64)}, r"whitening\.dim=64 exceeds"),
    ],
)
def test_bad_settings_refused_before_decoding(data, tiny_zoo, no_decoding, overrides, match):
    refused_fast(make_config(data, "oxford5k", **overrides), ValueError, match)


def test_whitening_dim_counts_queries_when_learned_on_them(data, tiny_zoo):
    config = make_config(
        data,
        "oxford5k",
        **{"whitening.dim": N_DATABASE + 1, "whitening.learn_on": "database+queries"},
    )
    dataset = experiment.load_data(config)
    preflight.check(config, dataset, rows=[("tiny_a", ("tiny_a",))], dims=[N_DATABASE + 1])
    with pytest.raises(ValueError, match=f"exceeds the {N_DATABASE + N_QUERIES} descriptors"):
        preflight.check(config, dataset, rows=[("tiny_a", ("tiny_a",))], dims=[32])


def test_unwritable_folders_refused_before_decoding(data, tiny_zoo, no_decoding):
    blocker = os.path.join(data, "a_file")
    with open(blocker, "w") as f:
        f.write("not a folder")
    config = make_config(data, "oxford5k", workdir=os.path.join(blocker, "run"))
    refused_fast(config, OSError, r"workdir .*a_file/run.* is not writable")
    config = make_config(data, "oxford5k", **{"output.dir": os.path.join(blocker, "results")})
    refused_fast(config, OSError, r"output directory .*a_file/results.* is not writable")
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = os.path.join(data, "read_only")
        os.makedirs(locked)
        os.chmod(locked, 0o500)
        try:
            config = make_config(data, "oxford5k", **{"output.dir": locked})
            refused_fast(config, PermissionError, "output directory .*read_only")
        finally:
            os.chmod(locked, 0o700)
    assert not [p for p in os.listdir(os.path.join(data, "run")) if p.startswith(".preflight")]


def _zoo_file(config, name, architecture, *, expected):
    """Adds zoo entry ``name`` whose file holds ``architecture`` and whose entry expects
    ``expected``; returns the file's path."""
    os.makedirs(config.checkpoint_dir, exist_ok=True)
    path = os.path.join(config.checkpoint_dir, f"{name}.h5")
    encoder = models.init_encoder(architecture, seed=5)
    models.save(path, architecture, encoder.variables, encoder.preprocessing, {"source": "t.pth"})
    config.model_zoo[name] = {
        "label": name.upper(),
        "file": f"{name}.h5",
        "architecture": expected,
        "seed": 0,
        "pooling": None,
        "map_size": None,
    }
    config.models = (name,)
    return path


def test_model_files_checked_before_decoding(data, tiny_zoo, no_decoding):
    config = make_config(data, "oxford5k", checkpoint_dir=os.path.join(data, "converted"))
    config.model_zoo["tiny_a"]["file"] = "missing.h5"
    refused_fast(config, FileNotFoundError, r"model 'tiny_a' not found at .*missing\.h5")
    config = make_config(data, "oxford5k", checkpoint_dir=os.path.join(data, "converted"))
    _zoo_file(
        config,
        "tiny_file",
        {"name": "tiny", "features": 16},
        expected={"name": "tiny", "features": 32},
    )
    err = refused_fast(config, models.ArchitectureMismatchError, r"tiny_file\.h5")
    assert "features=16" in str(err) and "'features': 32" in str(err)
    with pytest.raises(models.ArchitectureMismatchError):  # load_encoder checks it too
        experiment.load_encoder(config, "tiny_file")
    config = make_config(data, "oxford5k")
    config.model_zoo["tiny_a"]["pooling"] = "model"  # TinyNet has no descriptor head
    refused_fast(config, ValueError, r"model_zoo\['tiny_a'\]\.pooling='model' needs .* head")


def test_ground_truth_problems_refused_before_decoding(data, tiny_zoo, no_decoding):
    gnd_path = os.path.join(data, "data", "oxford5k", "gnd_oxford5k.pkl")
    with open(gnd_path, "rb") as f:
        good = pickle.load(f)
    overlapping = pickle.loads(pickle.dumps(good))
    entry = overlapping["gnd"][2]
    entry["junk"] = np.concatenate([entry["junk"], entry["ok"][:1]])
    with open(gnd_path, "wb") as f:
        pickle.dump(overlapping, f)
    refused_fast(make_config(data, "oxford5k"), ValueError, r"gnd\[2\] lists index .* in both")
    outside = pickle.loads(pickle.dumps(good))
    outside["gnd"][3]["bbx"] = [1000.0, 1000.0, 2000.0, 2000.0]
    with open(gnd_path, "wb") as f:
        pickle.dump(outside, f)
    refused_fast(
        make_config(data, "oxford5k"), images.InvalidBoxError, r"query 3 \(query3\.jpg\).*bbx"
    )


def test_good_config_passes_and_applies_max_pixels(data, tiny_zoo):
    config = make_config(data, "oxford5k", **{"extraction.max_pixels": 12345})
    dataset = experiment.load_data(config)
    previous = images.get_max_pixels()
    try:
        preflight.check(config, dataset, rows=[("tiny_a", ("tiny_a",))], dims=[16, None])
        assert images.get_max_pixels() == 12345
    finally:
        images.set_max_pixels(previous)


def test_results_record_architecture_and_weight_digest(data, tiny_zoo):
    """issue 9 item 5: ``results.json`` records each model's architecture and weight digest."""
    config = make_config(
        data,
        "oxford5k",
        checkpoint_dir=os.path.join(data, "converted"),
        **{"ranking.columns": ("G",), "output.top10_queries": 0},
    )
    arch = {"name": "tiny", "features": 32}
    path = _zoo_file(config, "tiny_file", arch, expected=arch)
    config.models = ("tiny_file", "tiny_a")
    results = report.run(config)  # runs the experiment and writes results.json
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    record = results["encoders"]["tiny_file"]
    assert record["architecture"] == arch and record["weights_sha256"] == digest
    assert record["checkpoint"] == "t.pth" and record["weights_file"] == path
    assert results["encoders"]["tiny_a"]["seed"] == 0
    assert results["encoders"]["tiny_a"]["weights_sha256"] is None
    with open(os.path.join(config.workdir, "results", "results.json")) as f:
        written = json.load(f)
    assert written["encoders"]["tiny_file"]["weights_sha256"] == digest
