"""The paper's vocabulary and published figures (``jretrieval.paper``), checked by hand.

The two Baseline rows are typed here from the paper's Table 1 (Krishna et al., ICMR 2021), as
the issue that asked for them quotes them; the other checks are on the shape of the data and on
the modules that must take their names from it rather than restate them.
"""

from __future__ import annotations

import pytest

from configs import common
from jretrieval import paper, ranking


def test_baseline_rows_of_paris6k_and_instre():
    table1 = paper.PUBLISHED["table1"]
    assert table1["paris6k"]["baseline"] == (
        41.46, 61.76, 83.74, 64.71, 90.17, 75.56, 90.17, 90.62
    )  # fmt: skip
    assert table1["instre"]["baseline"] == (
        36.64, 64.42, 71.70, 63.96, 76.43, 74.32, 16.41, 76.13
    )  # fmt: skip
    # Table 1's global search at 512 dims is Table 3's 512 column: the two tables agree.
    for dataset in ("oxford5k", "paris6k", "instre"):
        for row, values in paper.PUBLISHED["table3"][dataset].items():
            assert table1[dataset][row][0] == values[paper.TABLE3_DIM_NAMES.index("512")], row


def test_published_tables_are_complete_and_keyed_by_rows():
    for layout, datasets in paper.PUBLISHED.items():
        width = len(paper.PUBLISHED_ORDER[layout])
        for dataset, rows in datasets.items():
            assert dataset in paper.DATASETS
            expected = paper.SINGLE_MODELS if layout == "table3" else paper.ROWS
            assert tuple(rows) == expected, (layout, dataset)
            assert all(len(v) == width for v in rows.values()), (layout, dataset)
            assert all(0 < x < 100 for v in rows.values() for x in v)


def test_names():
    assert len(paper.COLUMNS) == 8 and paper.COLUMNS[0] == "G"
    assert paper.TABLE2_METRICS[:3] == ("E/mAP", "E/mP@5", "E/mP@10")
    assert paper.TABLE3_DIM_NAMES[-1] == "none" and paper.TABLE3_DIMS[-1] is None
    assert all(set(e.split("+")) <= set(paper.SINGLE_MODELS) for e in paper.ENSEMBLES)
    assert set(paper.LABELS) == set(paper.SINGLE_MODELS + paper.UPPER_BOUND)
    ((layout, dataset, column),) = paper.PUBLISHED_NOTES
    assert column in paper.PUBLISHED_ORDER[layout] and dataset in paper.PUBLISHED[layout]


@pytest.mark.parametrize("name", paper.COLUMNS)
def test_ranking_stages_follow_the_column_names(name):
    # Written out by hand, independently of how ranking derives them.
    stages = {
        "G": (0, 0, 0),
        "G+AQE": (0, 1, 0),
        "G+DFS": (0, 0, 1),
        "G+DBA": (1, 0, 0),
        "G+AQE+DFS": (0, 1, 1),
        "G+DBA+AQE": (1, 1, 0),
        "G+DBA+DFS": (1, 0, 1),
        "G+DBA+AQE+DFS": (1, 1, 1),
    }[name]
    assert tuple(map(int, ranking.SPECS[name])) == stages


def test_configs_and_ranking_use_the_paper_names():
    assert ranking.COLUMN_NAMES is paper.COLUMNS
    assert common.COLUMNS is paper.COLUMNS and common.TABLE1_ROWS is paper.ROWS
    assert common.TABLE3_DIMS is paper.TABLE3_DIMS
    config = common.base_config("oxford5k")
    assert tuple(config.models) == paper.ROWS
    assert config.whitening.dim == paper.DEFAULT_DIM == 512
    assert config.extraction.policy.size == 724
    assert config.model_zoo.amdim.label == "AmDim"
