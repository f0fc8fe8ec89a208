"""Every config loads, holds the paper's settings, and takes (only) well-spelt overrides."""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import common
from jretrieval import experiment, metrics, models, ranking
from jretrieval.datasets import DATASETS
from jretrieval.datasets import images as images_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if os.path.basename(p) not in ("__init__.py", "common.py")
)
PAPER_DIFFUSION = {
    "truncation": 1000,
    "kd": 50,
    "kq": 10,
    "gamma": 3.0,
    "alpha": 0.99,
    "mode": "joint",
    "solver": "auto",
}


def _load(path: str, arg: str | None = None):
    module = importlib.import_module(path[:-3].replace(os.sep, "."))
    return module.get_config(arg)


def _parse(argv: list[str]):
    """Parses ``argv`` as ``jretrieval.main`` does (DEFINE_config_file, lock_config=True)."""
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", None, flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return holder.value


def test_every_config_file_is_listed():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    expected = {"oxford", "paris", "instre", "roxford", "rparis", "table3", "ensembles", "demo"}
    assert {f"{n}.py" for n in expected} <= names


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_is_sane(path):
    config = _load(path)
    module = importlib.import_module(path[:-3].replace(os.sep, "."))
    assert "python -m jretrieval.main --config=" + path in module.__doc__
    assert "runtime" in module.__doc__.lower()
    # Models: known, rows parse, ensembles are pairs of known single models.
    rows = experiment.parse_models(config.models)
    for _, members in rows:
        for m in members:
            assert m in config.model_zoo, m
            spec = config.model_zoo[m]
            # the architecture a file must hold (checked on load), or the one initialised at random
            assert spec.architecture and spec.architecture.name in models.ARCHITECTURES, m
            assert spec.label
    # Data and the stages.
    assert config.data.name in DATASETS or config.data.name == "demo"
    images_lib.as_policy(config.extraction.policy.to_dict())
    assert config.bn.mode in experiment.BN_MODES
    assert config.whitening.learn_on in experiment.LEARN_ON
    dims = experiment.parse_dims(config.whitening.dim)
    assert all(d is None or d >= 8 for d in dims)
    assert ranking.check_columns(config.ranking.columns)
    params = ranking.params_from_config(config)
    ks = (params.aqe_k, params.dba_k, params.combined_aqe_k, params.combined_dba_k)
    if path != "configs/demo.py":  # the demo scales them to its 5 positives per query
        assert ks == (10, 20, 1, 20)
        assert config.diffusion.to_dict() == PAPER_DIFFUSION
    assert all(k >= 1 for k in ks) and params.diffusion["kd"] >= 2
    if config.eval.metrics is not None:
        protocol = "revisited" if config.data.name.startswith("r") else "classic"
        assert set(config.eval.metrics) <= set(metrics.PROTOCOLS[protocol])
    assert config.table in ("table1", "table2", "table3")
    assert config.workdir


@pytest.mark.parametrize("path", ["configs/oxford.py", "configs/paris.py", "configs/instre.py"])
def test_table1_configs_hold_the_paper_settings(path):
    config = _load(path)
    assert tuple(config.ranking.columns) == ranking.COLUMN_NAMES
    assert tuple(config.models) == common.TABLE1_ROWS
    assert config.extraction.policy.to_dict() == {"mode": "fixed", "size": 724}
    assert (config.pooling.name, config.pooling.levels) == ("rmac", 3)
    assert config.whitening.dim == 512
    assert config.diffusion.to_dict() == PAPER_DIFFUSION
    assert config.model_zoo.amdim.map_size == (23, 23)
    assert config.model_zoo.apgem.pooling == "model"


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if p != "configs/demo.py"])
def test_paper_configs_recalibrate_bn_as_the_paper(path):
    """The paper's procedure: model.train() forward passes, running averages, momentum 0.1."""
    for arg in (None, "paris6k") if path.endswith(("table3.py", "ensembles.py")) else (None,):
        config = _load(path, arg)
        assert (config.bn.mode, config.bn.momentum) == ("pytorch", 0.1)


def test_demo_keeps_exact_bn_statistics():
    assert _load("configs/demo.py").bn.mode == "exact"


@pytest.mark.parametrize("path", ["configs/roxford.py", "configs/rparis.py"])
def test_table2_configs(path):
    config = _load(path)
    assert tuple(config.ranking.columns) == ("G",)
    assert tuple(config.eval.metrics) == tuple(
        f"{s}/{m}" for s in "EMH" for m in ("mAP", "mP@5", "mP@10")
    )
    assert config.data.name in ("roxford5k", "rparis6k")


def test_table3_and_ensembles():
    config = _load("configs/table3.py")
    assert experiment.parse_dims(config.whitening.dim) == (32, 64, 128, 256, 512, 1024, 2048, None)
    assert tuple(config.ranking.columns) == ("G",)
    assert tuple(config.models) == common.PAPER_MODELS
    assert _load("configs/table3.py", "paris6k").data.name == "paris6k"
    with pytest.raises(ValueError, match="config argument"):
        _load("configs/table3.py", "nowhere")
    ens = _load("configs/ensembles.py")
    assert [m for _, m in experiment.parse_models(ens.models)] == [
        ("simclr2x", "simclr4x"),
        ("simclr2x", "amdim"),
        ("simclr2x", "mocov2"),
        ("simclr4x", "mocov2"),
        ("simclr4x", "amdim"),
    ]
    assert tuple(_load("configs/ensembles.py", "roxford5k").ranking.columns) == ("G",)


def test_demo_config_is_offline_and_exercises_every_stage():
    config = _load("configs/demo.py")
    rows = experiment.parse_models(config.models)
    assert [m for _, members in rows for m in members] == ["random_resnet50"]
    spec = config.model_zoo.random_resnet50
    assert spec.file is None and spec.architecture.to_dict()["depth"] == 50
    assert config.data.build_demo
    assert config.extraction.policy.size == 362
    assert config.bn.mode != "none"
    assert tuple(config.ranking.columns) == ranking.COLUMN_NAMES
    assert experiment.parse_dims(config.whitening.dim)[0] is not None


def test_overrides_apply():
    config = _parse(
        [
            "prog",
            "--config=configs/oxford.py",
            "--config.whitening.dim=256",
            "--config.models=baseline,simclr2x+simclr4x",
            "--config.bn.mode=pytorch",
            "--config.diffusion.kd=30",
            "--config.ranking.columns=G,G+DFS",
        ]
    )
    assert config.whitening.dim == 256
    assert experiment.parse_models(config.models) == [
        ("baseline", ("baseline",)),
        ("simclr2x+simclr4x", ("simclr2x", "simclr4x")),
    ]
    assert config.bn.mode == "pytorch" and config.diffusion.kd == 30
    assert ranking.check_columns(config.ranking.columns) == ("G", "G+DFS")
    config = _parse(["prog", "--config=configs/table3.py:paris6k", "--config.whitening.dim=none"])
    assert config.data.name == "paris6k"
    assert experiment.parse_dims(config.whitening.dim) == (None,)
    config = _parse(["prog", "--config=configs/oxford.py", "--config.whitening.dim=(64,None)"])
    assert experiment.parse_dims(config.whitening.dim) == (64, None)


@pytest.mark.parametrize(
    "override, bad",
    [
        ("--config.whitening.dimm=256", "dimm"),
        ("--config.whitenning.dim=256", "whitenning"),
        ("--config.bn.moed=exact", "moed"),
    ],
)
def test_misspelt_override_is_an_error(override, bad):
    with pytest.raises((flags.Error, AttributeError, KeyError), match=bad):
        _parse(["prog", "--config=configs/oxford.py", override])


def test_locked_config_rejects_new_fields():
    config = _parse(["prog", "--config=configs/oxford.py"])
    with pytest.raises(AttributeError):
        config.whitening.dimm = 3


def test_main_rejects_misspelt_override():
    """The real entry point: exits non-zero before any work, naming the bad flag."""
    proc = subprocess.run(
        [sys.executable, "-m", "jretrieval.main", "--config=configs/demo.py", "--config.bn.mdoe=x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "mdoe" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("bad", [0, -3, "abc", 1.5, True, ()])
def test_bad_dims_raise(bad):
    with pytest.raises(ValueError, match="whitening.dim"):
        experiment.parse_dims(bad)
