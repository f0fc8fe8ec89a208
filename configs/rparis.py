r"""Table 2, rParis6k (revisited protocol): global search, Easy/Medium/Hard mAP, mP@5, mP@10.

Command (from the repository root, after `bin/download_datasets.sh rparis6k` and
`bin/convert_checkpoints.sh`):

    python -m jretrieval.main --config=configs/rparis.py

Expected runtime: dominated by BN recalibration and extraction (6,322 + 70 images at 724x724)
per model. On a 2-core CPU, ResNet-50 runs at about 0.3 images/s in training mode (BN
recalibration) and 1.2 images/s in inference (measured here on a shared machine), so about 7 h
per ResNet-50 model and several times that for SimCLR 2x/4x: use a GPU (not measured here;
expect minutes per model). Descriptors are cached under `runs/rparis6k/`. The other columns of
Table 1 on this dataset: `--config.ranking.columns='("G", "G+AQE", "G+DFS")'` (or a
comma-separated string).
"""

from configs import common


def get_config(arg=None):
    del arg
    config = common.base_config("rparis6k", table="table2")
    config.ranking.columns = ("G",)
    config.eval.metrics = common.TABLE2_METRICS
    return config
