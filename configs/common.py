"""Shared pieces of the experiment configs: the model zoo, the paper's rows and columns, defaults.

Every config file in ``configs/`` defines ``get_config(arg=None) -> ml_collections.ConfigDict``
built from ``base_config`` below; relative paths are relative to the repository root
(``python -m jretrieval.main`` resolves them so, from any working directory):

    python -m jretrieval.main --config=configs/oxford.py [--config.<field>=<value> ...]

Sections of the config (all read by ``jretrieval.experiment.run``):

- ``models``: tuple of model names (keys of ``model_zoo``) and ensembles (``"a+b"``: the models'
  R-MAC vectors concatenated, then PCA-whitened together); a comma-separated string also works
  on the command line (``--config.models=baseline,simclr2x+simclr4x``).
- ``model_zoo``: per model: ``label`` (row name in the tables), ``file`` (converted encoder in
  ``checkpoint_dir``, default ``converted/``, as ``bin/convert_checkpoints.sh`` writes them)
  or ``architecture`` + ``seed`` (random init), ``pooling`` (``None``: ``pooling.name``;
  ``"model"``: the model's own head, AP-GeM) and ``map_size`` (resize the last map before
  pooling: AMDIM 40x40 -> 23x23).
- ``data``: dataset name and root folder (``jretrieval.datasets.load_dataset``).
- ``bn``: BN recalibration (``mode`` pytorch, the paper's default | exact | none, ``momentum``,
  ``batch_size``).
- ``extraction``: resize ``policy`` (724x724 fixed, the paper), ``batch_size``, ``dtype``
  (encoder compute dtype, ``float32`` or ``bfloat16``; ``--config.extraction.dtype=bfloat16``).
- ``pooling``: ``name`` (rmac, mac, spoc, gem) and its ``levels`` / ``p``.
- ``whitening``: ``dim`` (512; ``"none"`` = no PCA, the "True dim." of Table 3; a tuple sweeps),
  ``learn_on`` (``"database"``: the paper does not say, we learn on the database descriptors),
  ``apgem`` (``"common"`` | ``"shipped"``: AP-GeM whitened like the others or with the PCA in
  its checkpoint).
- ``ranking``: ``columns`` (Table 1's, see ``jretrieval.ranking``) and the AQE/DBA neighbours.
- ``diffusion``: Yang et al. 2019 parameters (``jretrieval.diffusion.rank``).
- ``distributed``: ``multihost`` (``jax.distributed.initialize()`` for multi-process jobs: TPU
  pods, multi-host GPU; each process extracts its slice of the images). Every device is used
  either way (``jretrieval.mesh.make_mesh``).
- ``eval``: ``metrics`` shown in the table (``None``: all of the dataset's protocol).
- ``output``: where results go (``<workdir>/results`` by default), top-10 picture.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from jretrieval import paper

# The paper's vocabulary is defined once, in jretrieval.paper; these names are what the configs
# in this folder use.
#: Table 1's columns, in the paper's order.
COLUMNS = paper.COLUMNS
#: single models of Tables 1 and 2, in the paper's row order (AP-GeM is listed last there).
PAPER_MODELS = paper.SINGLE_MODELS
#: the paper's ensembles (Tables 1 and 2): R-MAC concatenated, then PCA-whitened.
PAPER_ENSEMBLES = paper.ENSEMBLES
#: the fine-tuned upper bound (GeM pooling with its own head, Revaud et al. 2019).
UPPER_BOUND = paper.UPPER_BOUND
#: every row of Tables 1 and 2, in the paper's order.
TABLE1_ROWS = paper.ROWS
#: Table 3's PCA dimensions; ``None`` is "True dim." (no PCA, L2 only).
TABLE3_DIMS = paper.TABLE3_DIMS
#: metrics of Table 2 (revisited protocol).
TABLE2_METRICS = paper.TABLE2_METRICS
#: the paper's datasets (keys of ``jretrieval.datasets.DATASETS``).
DATASETS = paper.DATASETS


#: the architecture each converted file must hold (``jretrieval.models.load(expected=)`` refuses
#: another, naming both); for an entry without a file, the one initialised at random.
R50 = {"name": "resnet", "depth": 50, "width": 1}
R101 = {"name": "resnet", "depth": 101, "width": 1}
AMDIM = {"name": "amdim", "ndf": 256, "n_rkhs": 2048, "n_depth": 10}


def _model(label: str, file: str | None, **kw) -> dict:
    entry = {
        "label": label,
        "file": file,
        "architecture": None,
        "seed": 0,
        "pooling": None,
        "map_size": None,
    }
    entry.update(kw)
    return entry


def model_zoo() -> ml_collections.ConfigDict:
    """The paper's encoders and the converted files ``bin/convert_checkpoints.sh`` writes."""
    zoo = {
        "baseline": _model(paper.LABELS["baseline"], "baseline.h5", architecture=R50),
        "simclr1x": _model(paper.LABELS["simclr1x"], "simclr1x.h5", architecture=R50),
        "simclr2x": _model(
            paper.LABELS["simclr2x"], "simclr2x.h5", architecture={**R50, "width": 2}
        ),
        "simclr4x": _model(
            paper.LABELS["simclr4x"], "simclr4x.h5", architecture={**R50, "width": 4}
        ),
        "mocov1": _model(paper.LABELS["mocov1"], "mocov1.h5", architecture=R50),
        "mocov2": _model(paper.LABELS["mocov2"], "mocov2.h5", architecture=R50),
        # AMDIM's 40x40 map at 724 px is resized to 23x23, as in the paper.
        "amdim": _model(
            paper.LABELS["amdim"],
            "amdim.h5",
            architecture=AMDIM,
            map_size=paper.SETTINGS["amdim_map_size"],
        ),
        # GeM (AP): its own GeM + fc + L2 head instead of R-MAC (the paper's upper bound).
        "apgem": _model(
            paper.LABELS["apgem"],
            "apgem.h5",
            architecture={"name": "apgem", "depth": 101},
            pooling="model",
        ),
        # Beyond the paper (bin/convert_checkpoints.sh converts them too).
        "resnet101": _model("ResNet-101", "resnet101.h5", architecture=R101),
        "mocov2_800ep": _model("MoCov2 (800 ep)", "mocov2_800ep.h5", architecture=R50),
        "amdim_large": _model(
            "AmDim (large)",
            "amdim_large.h5",
            architecture={**AMDIM, "ndf": 320, "n_rkhs": 2560},
            map_size=paper.SETTINGS["amdim_map_size"],
        ),
        # The offline demo's encoder: a randomly initialised ResNet-50 (no weights to download).
        "random_resnet50": _model(
            "ResNet-50 (random weights)",
            None,
            architecture=R50,
            seed=0,
        ),
    }
    return ml_collections.ConfigDict(zoo)


def base_config(dataset: str, *, table: str = "table1") -> ml_collections.ConfigDict:
    """The paper's settings for ``dataset``: 724x724, R-MAC L=3, PCA-whitening 512, Table 1."""
    config = ml_collections.ConfigDict()
    config.table = table  # which of the paper's tables the report is shaped like
    config.workdir = f"runs/{dataset}"  # descriptor stores, BN statistics, results
    # Folder of converted encoders (`bin/convert_checkpoints.sh --out`); model_zoo files are in it.
    config.checkpoint_dir = "converted"
    config.models = paper.ROWS
    config.model_zoo = model_zoo()

    config.data = ml_collections.ConfigDict()
    config.data.name = dataset
    config.data.root = "data"
    config.data.distractors = False  # append the revisitop 1M distractors
    config.data.max_distractors = config_dict.placeholder(int)
    config.data.crop_queries = True  # standard protocol: queries cropped to their bbx
    config.data.check_files = True
    config.data.build_demo = False  # build the demo dataset under data.root if absent
    config.data.demo_kwargs = ml_collections.ConfigDict()  # passed to build_demo_dataset

    config.bn = ml_collections.ConfigDict()
    # pytorch: the paper's procedure (a model.train() forward pass over the images: running
    # averages, momentum 0.1, unbiased variance); exact: population statistics, this project's
    # improvement (order-independent, no momentum); none: the checkpoint's own statistics.
    config.bn.mode = "pytorch"
    config.bn.momentum = 0.1  # torch meaning, pytorch mode only
    config.bn.batch_size = 16
    config.bn.images = "database"  # database | database+queries

    config.extraction = ml_collections.ConfigDict()
    config.extraction.policy = ml_collections.ConfigDict(
        {"mode": "fixed", "size": paper.SETTINGS["image_size"]}
    )
    config.extraction.batch_size = 8
    config.extraction.skip_corrupt = False  # True: unreadable images skipped and listed
    # Larger images are refused as possible decompression bombs (skipped with skip_corrupt).
    config.extraction.max_pixels = 89_478_485  # Pillow's default limit
    config.extraction.num_threads = config_dict.placeholder(int)
    # Encoder compute dtype: float32 | bfloat16 (BN statistics, pooling and everything after in
    # float32; docs/bench_extract.md has its speed and its effect on mAP).
    config.extraction.dtype = "float32"
    # Multi-scale descriptors (cirtorch's extract_ms): a tuple, "1,0.7071,0.5" or "ms"; the
    # paper uses one scale.
    config.extraction.scales = config_dict.placeholder(object)
    config.extraction.scales = (1.0,)

    config.pooling = ml_collections.ConfigDict()
    config.pooling.name = "rmac"
    config.pooling.levels = paper.SETTINGS["rmac_levels"]  # rmac
    config.pooling.p = 3.0  # gem

    config.whitening = ml_collections.ConfigDict()
    # int, "none" (no PCA: L2 only, Table 3's "True dim."), or a tuple of them (a sweep).
    config.whitening.dim = config_dict.placeholder(object)
    config.whitening.dim = paper.DEFAULT_DIM
    config.whitening.learn_on = "database"  # database | database+queries
    # GeM (AP), the upper-bound row: "common" (L2, PCA-whitening learned like every other row,
    # L2) or "shipped" (the PCA in its checkpoint, as dirtorch's test_dir.py applies it).
    # "common" by default: the paper applies one post-processing to every model (Sec. 4.1,
    # "PCA dimension of 512 ... unless otherwise stated"), and its GeM (AP) figures (rOxford
    # Medium 51.03, rParis Medium 37.36) lie far below those Revaud et al. (ICCV 2019) publish
    # with the shipped PCA (in the 60s and near 80), so it most plausibly did not use that PCA.
    config.whitening.apgem = "common"

    config.ranking = ml_collections.ConfigDict()
    config.ranking.columns = paper.COLUMNS
    config.ranking.aqe_k = paper.SETTINGS["aqe_k"]  # N
    config.ranking.dba_k = paper.SETTINGS["dba_k"]  # N'
    config.ranking.combined_aqe_k = paper.SETTINGS[
        "combined_aqe_k"
    ]  # N when AQE and DBA are combined (Gordo et al. 2017)
    config.ranking.combined_dba_k = paper.SETTINGS["combined_dba_k"]  # N' when combined
    config.ranking.aqe_alpha = 0.0
    config.ranking.dba_alpha = 0.0
    config.ranking.block_size = 16384

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.truncation = 1000
    config.diffusion.kd = 50
    config.diffusion.kq = 10
    config.diffusion.gamma = 3.0
    config.diffusion.alpha = 0.99
    config.diffusion.mode = "joint"  # joint (the authors' code) | online (unseen queries)
    # auto: the native C++ kernel on CPU (built on first use), XLA elsewhere | native | xla
    config.diffusion.solver = "auto"

    config.distributed = ml_collections.ConfigDict()
    # True: jax.distributed.initialize() (coordinator from the cluster environment) and each
    # process extracts its slice; on one process leave False (a no-op either way).
    config.distributed.multihost = False

    config.eval = ml_collections.ConfigDict()
    config.eval.metrics = config_dict.placeholder(tuple)  # None: every metric of the protocol

    config.output = ml_collections.ConfigDict()
    config.output.dir = config_dict.placeholder(str)  # None: <workdir>/results
    config.output.top10_queries = 0  # top-10 picture for this many queries (0: none)
    config.output.note = ""  # printed above the tables
    return config


def dataset_arg(arg: str | None, default: str, allowed: tuple[str, ...] = DATASETS) -> str:
    """The dataset named by a config argument (``--config=configs/table3.py:paris6k``)."""
    name = default if not arg else arg
    if name not in allowed:
        raise ValueError(f"config argument {arg!r}: expected one of {allowed}")
    return name
