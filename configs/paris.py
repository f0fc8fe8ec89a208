r"""Table 1, Paris6k: every model and ensemble, every ranking column, classic mAP.

Command (from the repository root, after `bin/download_datasets.sh paris6k` and
`bin/convert_checkpoints.sh`):

    python -m jretrieval.main --config=configs/paris.py

Expected runtime: on one GPU about 1-2 min per ResNet-50 model (BN recalibration plus 6,392 +
55 images at 724x724), several times that for SimCLR 4x; on a 2-core CPU about 1 h per
ResNet-50 model. Descriptors are cached under `runs/paris6k/`, so a second run only ranks.
One model: `--config.models=simclr2x`; another PCA size: `--config.whitening.dim=256`.
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.base_config("paris6k", table="table1")
