r"""Table 3: global-search mAP against the PCA-whitening dimension (32..2048) and no PCA.

Command (from the repository root; the dataset is the argument, oxford5k by default):

    python -m jretrieval.main --config=configs/table3.py            # Oxford5k
    python -m jretrieval.main --config=configs/table3.py:paris6k    # Paris6k

Expected runtime: the extraction of Table 1, shared with it (descriptors and BN statistics are
cached under `runs/<dataset>/`, so after `configs/oxford.py` this takes about a minute of
whitening and ranking); otherwise see `configs/oxford.py` (hours per model on a 2-core CPU).
Writes the table and a plot of mAP against the dimension, one line per model. The whitening has
min(#database images, descriptor size) components; a larger dimension is an error.
"""

from configs import common


def get_config(arg=None):
    dataset = common.dataset_arg(arg, "oxford5k")
    config = common.base_config(dataset, table="table3")
    config.models = common.PAPER_MODELS
    config.whitening.dim = common.TABLE3_DIMS
    config.ranking.columns = ("G",)
    return config
