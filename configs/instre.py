r"""Table 1, INSTRE (Iscen et al. 2017 split: 1,250 queries, 27,293 database images): mAP.

Command (from the repository root, after `bin/download_datasets.sh instre` and
`bin/convert_checkpoints.sh`):

    python -m jretrieval.main --config=configs/instre.py

Expected runtime: on one GPU about 5-10 min per ResNet-50 model (BN recalibration plus 28,543
images at 724x724); on a 2-core CPU about 6 h per ResNet-50 model. Diffusion over 28.5k nodes
takes a few minutes per diffusion column. Descriptors are cached under `runs/instre/`.
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.base_config("instre", table="table1")
