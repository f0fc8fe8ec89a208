r"""Table 2, rOxford5k (revisited protocol): global search, Easy/Medium/Hard mAP, mP@5, mP@10.

Command (from the repository root, after `bin/download_datasets.sh roxford5k` and
`bin/convert_checkpoints.sh`):

    python -m jretrieval.main --config=configs/roxford.py

Expected runtime: on one GPU about 1-2 min per ResNet-50 model (BN recalibration plus 4,993 +
70 images at 724x724); on a 2-core CPU about 1 h per ResNet-50 model. Descriptors are cached
under `runs/roxford5k/`. The other columns of Table 1 on this dataset:
`--config.ranking.columns='("G", "G+AQE", "G+DFS")'` (or a comma-separated string).
"""

from configs import common


def get_config(arg=None):
    del arg
    config = common.base_config("roxford5k", table="table2")
    config.ranking.columns = ("G",)
    config.eval.metrics = common.TABLE2_METRICS
    return config
