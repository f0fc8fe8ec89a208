r"""Table 1, Oxford5k: every model and ensemble, every ranking column, classic mAP.

Command (from the repository root, after `bin/download_datasets.sh oxford5k` and
`bin/convert_checkpoints.sh`):

    python -m jretrieval.main --config=configs/oxford.py

Expected runtime: dominated by BN recalibration and extraction (5,063 + 55 images at 724x724)
per model. On a 2-core CPU, ResNet-50 runs at about 0.3 images/s in training mode (BN
recalibration) and 1.2 images/s in inference (measured here on a shared machine), so about 6 h
per ResNet-50 model and several times that for SimCLR 2x/4x: use a GPU (not measured here;
expect minutes per model). Descriptors are cached under `runs/oxford5k/`, so a second run only
ranks. One model: `--config.models=simclr2x`; another PCA size: `--config.whitening.dim=256`.
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.base_config("oxford5k", table="table1")
