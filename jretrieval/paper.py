"""The paper's vocabulary and published figures, defined once (pure data, no logic).

Krishna, McGuinness and O'Connor, "Evaluating Contrastive Models for Instance-based Image
Retrieval", ICMR 2021. Everything the project names after the paper comes from here: Table 1's
ranking columns, Table 2's metrics, Table 3's PCA dimensions, the rows (single models,
ensembles, the fine-tuned upper bound), the post-processing settings of its Sec. 4.1 and the
figures it published. ``configs/common.py``, ``jretrieval.ranking`` and the report import them;
nothing else restates them.

Row keys are the model names of ``configs/common.py``'s model zoo (``"baseline"``, ...,
``"a+b"`` for an ensemble); values are percentages as printed in the paper (two decimals).
"""

from __future__ import annotations

__all__ = [
    "CITATION",
    "COLUMNS",
    "DATASETS",
    "DEFAULT_DIM",
    "ENSEMBLES",
    "LABELS",
    "NO_PCA",
    "NO_PCA_NAMES",
    "PUBLISHED",
    "PUBLISHED_NOTES",
    "PUBLISHED_ORDER",
    "ROWS",
    "SETTINGS",
    "SINGLE_MODELS",
    "TABLE2_METRICS",
    "TABLE3_DIMS",
    "TABLE3_DIM_NAMES",
    "UPPER_BOUND",
]

CITATION = (
    "Krishna, McGuinness, O'Connor: Evaluating Contrastive Models for Instance-based Image "
    "Retrieval, ICMR 2021"
)

#: Table 1's ranking columns, in the paper's order ("G" global search, "AQE" average query
#: expansion, "DBA" database augmentation, "DFS" diffusion; the stages a column composes are
#: the "+"-separated parts of its name).
COLUMNS: tuple[str, ...] = (
    "G",
    "G+AQE",
    "G+DFS",
    "G+DBA",
    "G+AQE+DFS",
    "G+DBA+AQE",
    "G+DBA+DFS",
    "G+DBA+AQE+DFS",
)

#: Table 2's metrics (revisited protocol: Easy / Medium / Hard), in the paper's order. The
#: evaluation also computes mP@1, which the paper does not print.
TABLE2_METRICS: tuple[str, ...] = tuple(f"{s}/{m}" for s in "EMH" for m in ("mAP", "mP@5", "mP@10"))

#: the whitening dimension of Tables 1 and 2 ("We use a PCA dimension of 512").
DEFAULT_DIM = 512
#: Table 3's PCA dimensions; ``None`` is its "True dim." column (no PCA, L2 only).
TABLE3_DIMS: tuple[int | None, ...] = (32, 64, 128, 256, 512, 1024, 2048, None)
#: Table 3's dimensions as column names ("none" for no PCA).
TABLE3_DIM_NAMES: tuple[str, ...] = tuple("none" if d is None else str(d) for d in TABLE3_DIMS)
#: the paper's header of the no-PCA column.
NO_PCA = "True dim."
#: names accepted for the no-PCA column (config values and result column keys).
NO_PCA_NAMES: tuple[str, ...] = ("none", "None", NO_PCA, "true dim.")

#: single models of Tables 1-3, in the paper's row order.
SINGLE_MODELS: tuple[str, ...] = (
    "baseline",
    "simclr1x",
    "simclr2x",
    "simclr4x",
    "mocov1",
    "mocov2",
    "amdim",
)
#: the paper's ensembles (its footnote 4: the members' R-MAC vectors concatenated, then PCA).
ENSEMBLES: tuple[str, ...] = (
    "simclr2x+simclr4x",
    "simclr2x+amdim",
    "simclr2x+mocov2",
    "simclr4x+mocov2",
    "simclr4x+amdim",
)
#: the fine-tuned upper bound, GeM (AP) (Revaud et al., ICCV 2019); the paper's footnote 3:
#: "an upper bound indicator rather than a benchmark", so never ranked in bold.
UPPER_BOUND: tuple[str, ...] = ("apgem",)
#: every row of Tables 1 and 2, in the paper's order.
ROWS: tuple[str, ...] = SINGLE_MODELS + ENSEMBLES + UPPER_BOUND
#: row labels as the paper prints them.
LABELS: dict[str, str] = {
    "baseline": "Baseline",
    "simclr1x": "SimClr1x",
    "simclr2x": "SimClr2x",
    "simclr4x": "SimClr4x",
    "mocov1": "MoCov1",
    "mocov2": "MoCov2",
    "amdim": "AmDim",
    "apgem": "GeM (AP)",
}

#: the paper's datasets (keys of ``jretrieval.datasets.DATASETS``).
DATASETS: tuple[str, ...] = ("oxford5k", "paris6k", "roxford5k", "rparis6k", "instre")

#: the settings its Sec. 4.1 states: input resized to 724 x 724; R-MAC with L = 3; AMDIM's
#: 40 x 40 map downsampled to 23 x 23; AQE with N = 10; DBA with N' = 20; both combined with
#: N = 1 and N' = 20 (after Gordo et al. 2017); BN statistics re-estimated in PyTorch's
#: ``model.train()`` mode (a forward pass) before evaluation.
SETTINGS: dict[str, object] = {
    "image_size": 724,
    "rmac_levels": 3,
    "amdim_map_size": (23, 23),
    "aqe_k": 10,
    "dba_k": 20,
    "combined_aqe_k": 1,
    "combined_dba_k": 20,
    "bn_mode": "pytorch",
}

#: what each published tuple is indexed by, per layout.
PUBLISHED_ORDER: dict[str, tuple[str, ...]] = {
    "table1": COLUMNS,
    "table2": TABLE2_METRICS,
    "table3": TABLE3_DIM_NAMES,
}

#: Figures published in the paper, percent: ``PUBLISHED[layout][dataset][row]`` is a tuple in
#: the order of ``PUBLISHED_ORDER[layout]`` (Table 1: mAP per column; Table 2: global search,
#: the nine metrics; Table 3: global-search mAP per dimension).
PUBLISHED: dict[str, dict[str, dict[str, tuple[float, ...]]]] = {
    "table1": {
        "oxford5k": {
            "baseline": (55.12, 67.85, 74.29, 62.63, 82.64, 70.60, 77.95, 80.40),
            "simclr1x": (51.47, 62.96, 71.42, 61.00, 76.40, 66.32, 72.98, 73.38),
            "simclr2x": (58.59, 70.49, 79.11, 67.34, 82.34, 72.62, 79.02, 79.96),
            "simclr4x": (59.40, 69.80, 80.07, 67.52, 82.00, 71.03, 78.67, 76.98),
            "mocov1": (56.76, 66.89, 74.78, 64.12, 76.44, 69.77, 73.39, 73.95),
            "mocov2": (58.36, 67.49, 75.26, 65.09, 78.07, 69.86, 72.52, 72.86),
            "amdim": (36.95, 43.44, 48.13, 39.97, 52.99, 44.69, 46.30, 47.74),
            "simclr2x+simclr4x": (61.89, 72.64, 81.66, 69.27, 86.02, 74.43, 80.45, 81.99),
            "simclr2x+amdim": (57.06, 67.37, 75.63, 64.69, 77.77, 69.29, 72.84, 74.51),
            "simclr2x+mocov2": (61.33, 71.58, 78.97, 68.47, 82.33, 72.94, 78.36, 79.03),
            "simclr4x+mocov2": (61.87, 71.97, 80.86, 68.20, 84.02, 72.94, 78.56, 79.57),
            "simclr4x+amdim": (58.13, 68.76, 77.66, 64.81, 80.05, 69.78, 75.93, 77.32),
            "apgem": (66.90, 78.57, 90.36, 75.70, 94.34, 81.92, 89.65, 91.12),
        },
        "paris6k": {
            "baseline": (41.46, 61.76, 83.74, 64.71, 90.17, 75.56, 90.17, 90.62),
            "simclr1x": (42.28, 61.15, 85.16, 64.36, 90.17, 74.45, 89.37, 90.49),
            "simclr2x": (44.48, 59.65, 89.39, 63.28, 91.61, 71.91, 90.82, 91.48),
            "simclr4x": (44.96, 56.30, 88.98, 60.40, 90.18, 68.46, 88.18, 88.74),
            "mocov1": (43.22, 60.34, 83.13, 63.00, 86.90, 72.11, 87.91, 88.73),
            "mocov2": (49.72, 64.46, 88.02, 67.06, 89.86, 75.01, 88.65, 89.01),
            "amdim": (34.87, 49.20, 59.55, 47.72, 63.70, 56.06, 64.18, 65.08),
            "simclr2x+simclr4x": (45.27, 56.84, 89.97, 59.88, 91.60, 68.07, 89.19, 90.28),
            "simclr2x+amdim": (44.45, 60.06, 86.71, 63.02, 89.06, 71.12, 88.46, 88.76),
            "simclr2x+mocov2": (47.93, 61.46, 90.92, 64.96, 92.47, 72.37, 90.42, 91.08),
            "simclr4x+mocov2": (47.44, 58.44, 90.40, 61.88, 91.97, 69.48, 89.00, 89.93),
            "simclr4x+amdim": (44.74, 57.05, 87.59, 60.66, 88.97, 68.60, 87.06, 87.45),
            "apgem": (49.87, 63.46, 93.99, 67.99, 95.56, 76.78, 90.15, 94.07),
        },
        "instre": {
            "baseline": (36.64, 64.42, 71.70, 63.96, 76.43, 74.32, 16.41, 76.13),
            "simclr1x": (27.51, 47.85, 55.38, 47.34, 60.61, 57.73, 21.00, 61.15),
            "simclr2x": (36.68, 57.04, 66.47, 56.89, 69.48, 65.27, 24.93, 67.18),
            "simclr4x": (44.76, 63.73, 73.51, 63.26, 75.02, 70.17, 28.79, 70.54),
            "mocov1": (33.44, 54.88, 66.31, 54.84, 70.10, 64.65, 29.25, 69.80),
            "mocov2": (33.36, 51.79, 60.66, 50.47, 62.56, 58.83, 22.38, 59.77),
            "amdim": (24.34, 37.92, 45.47, 36.69, 47.14, 42.74, 29.47, 47.71),
            "simclr2x+simclr4x": (45.58, 63.94, 73.54, 63.54, 74.81, 70.54, 28.73, 70.75),
            "simclr2x+amdim": (39.37, 59.02, 68.85, 59.09, 71.14, 66.68, 26.19, 67.93),
            "simclr2x+mocov2": (41.99, 60.99, 70.42, 60.64, 72.24, 68.41, 26.09, 68.69),
            "simclr4x+mocov2": (47.07, 65.23, 74.64, 64.93, 76.12, 71.42, 27.09, 71.26),
            "simclr4x+amdim": (45.83, 63.88, 74.25, 63.84, 75.28, 70.83, 30.07, 71.60),
            "apgem": (20.78, 31.37, 34.85, 30.29, 38.06, 35.93, 18.48, 37.54),
        },
    },
    "table2": {
        "roxford5k": {
            "baseline": (45.65, 67.55, 61.81, 32.89, 64.00, 58.57, 12.10, 23.71, 19.43),
            "simclr1x": (47.17, 69.78, 63.90, 31.98, 65.24, 57.52, 9.52, 20.57, 15.86),
            "simclr2x": (54.95, 76.69, 69.49, 38.54, 73.14, 65.33, 14.41, 31.21, 22.93),
            "simclr4x": (54.65, 74.80, 68.37, 38.57, 73.71, 65.05, 14.05, 30.07, 22.79),
            "mocov1": (48.29, 68.48, 64.36, 33.57, 64.43, 58.58, 9.27, 20.05, 15.62),
            "mocov2": (52.69, 72.33, 65.86, 36.49, 67.24, 59.24, 10.72, 23.38, 18.67),
            "amdim": (21.24, 38.31, 31.35, 17.54, 36.38, 32.57, 4.11, 5.92, 6.33),
            "simclr2x+simclr4x": (55.23, 76.15, 68.87, 39.60, 74.29, 65.64, 15.01, 29.43, 23.97),
            "simclr2x+amdim": (52.08, 72.28, 65.51, 36.19, 66.86, 58.57, 10.20, 21.64, 17.64),
            "simclr2x+mocov2": (55.11, 76.47, 69.35, 38.46, 70.52, 62.57, 12.51, 27.12, 21.83),
            "simclr4x+mocov2": (53.98, 72.40, 67.90, 38.31, 70.10, 64.69, 13.38, 28.43, 23.13),
            "simclr4x+amdim": (49.23, 70.76, 64.00, 35.72, 67.62, 61.33, 11.72, 23.79, 18.80),
            "apgem": (64.07, 84.93, 80.56, 51.03, 89.43, 83.86, 30.30, 54.86, 44.00),
        },
        "rparis6k": {
            "baseline": (47.20, 91.14, 87.00, 31.63, 93.71, 91.71, 10.44, 57.14, 43.43),
            "simclr1x": (49.35, 93.14, 89.52, 31.61, 95.71, 92.00, 8.93, 46.57, 38.43),
            "simclr2x": (54.28, 94.00, 91.14, 34.47, 96.00, 92.86, 10.87, 62.00, 49.71),
            "simclr4x": (54.97, 93.71, 91.71, 35.39, 96.29, 94.86, 12.34, 66.57, 56.29),
            "mocov1": (50.47, 92.29, 89.71, 31.48, 95.14, 92.57, 8.13, 46.57, 36.29),
            "mocov2": (55.77, 92.86, 89.24, 36.32, 94.86, 92.14, 11.71, 60.00, 50.43),
            "amdim": (38.62, 80.29, 73.71, 25.92, 82.57, 75.71, 6.36, 25.14, 19.57),
            "simclr2x+simclr4x": (55.54, 94.00, 91.86, 35.59, 96.00, 94.00, 12.37, 66.29, 56.00),
            "simclr2x+amdim": (53.71, 93.71, 90.43, 34.57, 95.14, 93.14, 10.46, 55.71, 46.00),
            "simclr2x+mocov2": (57.00, 93.43, 91.00, 36.66, 95.14, 93.29, 11.88, 64.00, 52.43),
            "simclr4x+mocov2": (56.86, 94.29, 91.71, 36.61, 96.29, 94.86, 12.68, 69.43, 55.57),
            "simclr4x+amdim": (54.65, 92.86, 90.57, 35.06, 95.71, 93.43, 11.41, 61.14, 48.71),
            "apgem": (54.90, 94.38, 91.95, 37.36, 98.86, 97.00, 14.65, 76.86, 63.71),
        },
    },
    "table3": {
        "oxford5k": {
            "baseline": (48.31, 54.61, 56.68, 57.52, 55.12, 49.44, 37.23, 58.47),
            "simclr1x": (34.96, 44.96, 54.17, 54.79, 51.47, 44.16, 34.94, 50.63),
            "simclr2x": (36.79, 47.96, 60.32, 61.68, 58.59, 49.82, 24.62, 53.72),
            "simclr4x": (35.32, 45.86, 57.77, 61.70, 59.40, 53.83, 44.71, 41.94),
            "mocov1": (29.90, 41.95, 54.62, 57.38, 56.76, 50.20, 39.37, 38.73),
            "mocov2": (39.92, 47.88, 57.92, 60.43, 58.36, 52.14, 40.05, 51.76),
            "amdim": (11.52, 15.30, 21.71, 28.71, 36.95, 37.58, 30.73, 16.10),
        },
        "paris6k": {
            "baseline": (72.22, 71.83, 63.65, 53.40, 41.46, 28.99, 17.89, 68.36),
            "simclr1x": (69.90, 73.29, 66.62, 54.58, 42.28, 30.70, 20.06, 66.60),
            "simclr2x": (75.21, 77.90, 69.25, 57.83, 44.48, 33.05, 23.27, 72.20),
            "simclr4x": (77.16, 78.04, 69.19, 57.29, 44.96, 35.02, 25.79, 72.89),
            "mocov1": (56.84, 63.63, 61.87, 54.07, 43.22, 32.57, 21.63, 53.66),
            "mocov2": (70.08, 75.11, 71.24, 61.66, 49.72, 35.73, 22.98, 69.99),
            "amdim": (21.49, 33.96, 41.19, 40.85, 34.87, 26.82, 17.85, 25.50),
        },
        "instre": {
            "baseline": (26.44, 34.92, 38.68, 38.55, 36.64, 29.25, 20.20, 33.03),
            "simclr1x": (16.47, 23.27, 29.01, 30.35, 27.51, 21.85, 15.97, 21.85),
            "simclr2x": (18.42, 26.83, 35.88, 39.67, 36.68, 29.64, 21.57, 25.94),
            "simclr4x": (18.92, 28.97, 40.45, 46.99, 44.76, 36.68, 27.65, 28.98),
            "mocov1": (20.08, 27.85, 33.77, 36.24, 33.44, 26.66, 18.46, 23.01),
            "mocov2": (19.00, 27.38, 34.34, 36.22, 33.36, 26.86, 18.79, 26.22),
            "amdim": (10.65, 15.88, 20.55, 24.15, 24.34, 20.45, 14.45, 10.25),
        },
    },
}

#: Published columns not to compare with silently: ``{(layout, dataset, column): note}``; the
#: report prints the note under the table instead of a difference for that column.
PUBLISHED_NOTES: dict[tuple[str, str, str], str] = {
    ("table1", "instre", "G+DBA+DFS"): (
        "The paper's INSTRE G+DBA+DFS figures (16.41-30.07) lie 30-60 points below their "
        "neighbouring columns (G+DBA, G+DBA+AQE+DFS) for almost every row, which no other "
        "dataset shows: probably a typo in the paper. They are listed but not compared."
    ),
}
