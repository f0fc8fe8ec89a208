r"""Table 1, INSTRE (Iscen et al. 2017 split: 1,250 queries, 27,293 database images): mAP.

Command (from the repository root, after `bin/download_datasets.sh instre` and
`bin/convert_checkpoints.sh`):

    python -m jretrieval.main --config=configs/instre.py

Expected runtime: dominated by BN recalibration and extraction (27,293 + 1,250 images at
724x724) per model. On a 2-core CPU, ResNet-50 runs at about 0.3 images/s in training mode (BN
recalibration) and 1.2 images/s in inference (measured here on a shared machine), so about 32 h
per ResNet-50 model and several times that for SimCLR 2x/4x: use a GPU (not measured here;
expect minutes per model). Descriptors are cached under `runs/instre/`.
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.base_config("instre", table="table1")
