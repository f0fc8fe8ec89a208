r"""The paper's ensembles (Tables 1 and 2): pairs of models, R-MAC concatenated then PCA-whitened.

Command (from the repository root; the dataset is the argument, oxford5k by default):

    python -m jretrieval.main --config=configs/ensembles.py             # Table 1 rows, Oxford5k
    python -m jretrieval.main --config=configs/ensembles.py:roxford5k   # Table 2 rows

Each member's R-MAC vectors are L2-normalised, concatenated (SimCLR 4x + MoCo v2: 8192 + 2048
dims), L2-normalised again, then PCA-whitened to 512 dims and L2-normalised, like a single model.
Expected runtime: seconds once the members' descriptors are cached by the dataset's own config
(`runs/<dataset>/`); otherwise the extraction of each member (see `configs/oxford.py`).
"""

from configs import common


def get_config(arg=None):
    dataset = common.dataset_arg(arg, "oxford5k")
    revisited = dataset in ("roxford5k", "rparis6k")
    config = common.base_config(dataset, table="table2" if revisited else "table1")
    config.models = common.PAPER_ENSEMBLES
    if revisited:
        config.ranking.columns = ("G",)
        config.eval.metrics = common.TABLE2_METRICS
    return config
