"""The index: query latency against 50,000 stored descriptors, build throughput, multi-scale mAP.

Run from the repository root (state the load average: ``uptime``; the figures move with it):

    python -m bench.index                         # query + build, about 5 min on 2 cores
    python -m bench.index --parts=demo            # demo G mAP, scales (1,) vs cirtorch's three

- ``query``: one 724x724 query image through ``Index.query`` (``jretrieval.index.api``) with a
  randomly initialised ResNet-50 (same FLOPs as a trained one), R-MAC, a 2048 -> 512
  PCA-whitening and an index of ``--database`` (50,000) stored 512-d unit descriptors, top-10;
  the index is a real one built from the demo images whose database and whitening are replaced
  in memory by random ones of the benchmark's sizes (the cost of each stage depends on the
  sizes only). Each stage is the median over ``--repeats`` queries after one warm-up query
  (compilation): decode (JPEG decode, crop, resize), encode (normalise, ResNet-50, R-MAC),
  post-process (L2, whitening, L2), search (inner products with 50,000 rows and top-k), and
  the share of each in their sum; also with ``--aqe=10``.
- ``build``: ``Index.build`` over ``--build_images`` demo images at 724x724 (BN recalibration
  pass, extraction, whitening), in images/s over the whole build, and the stage seconds.
- ``demo``: ``configs/demo.py`` (random ResNet-50, 362x362, R-MAC, whitening 64) run through
  ``jretrieval.experiment.run`` twice, G column only: ``extraction.scales = (1,)`` and cirtorch's
  ``(1, 1/sqrt(2), 1/2)``; the demo set, BN statistics and single-scale stores are shared with
  ``python -m jretrieval.main --config=configs/demo.py`` under ``runs/demo``.

Results are printed and written to ``docs/bench_index.md`` between per-part markers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from bench import harness

DOC = "docs/bench_index.md"
STAGES = ("decode", "encode", "postprocess", "search")


def _demo_dataset(root: str = "runs/demo/data") -> Any:
    from jretrieval.datasets import demo, load_dataset

    demo.build_demo_dataset(root)
    return load_dataset("demo", root)


def _index_folder(paths: list[str], folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    for p in paths:
        shutil.copy(p, folder)
    return folder


def bench_query(args: argparse.Namespace) -> str:
    from jretrieval.index import Index
    from jretrieval.whitening import PCAWhitening

    ds = _demo_dataset()
    with tempfile.TemporaryDirectory() as tmp:
        folder = _index_folder(ds.db_paths[:8], os.path.join(tmp, "images"))
        index = Index.build(
            os.path.join(tmp, "index"),
            images=folder,
            model="random_resnet50",
            size=724,
            pca_dim=4,
            bn="none",
        )
    rng = np.random.default_rng(0)
    c, d, n = 2048, 512, args.database
    projection, _ = np.linalg.qr(rng.normal(size=(c, d)))
    index._whitening = PCAWhitening(
        mean=rng.normal(size=c).astype(np.float32) * 1e-3,
        projection=projection.astype(np.float32),
        eigenvalues=np.sort(rng.uniform(0.1, 1.0, d))[::-1].astype(np.float32),
    )._asdict()
    index.settings["pca_dim"] = d
    db = rng.normal(size=(n, d)).astype(np.float32)
    index.database = db / np.linalg.norm(db, axis=1, keepdims=True)
    index.paths = [f"synthetic/{i:06d}.jpg" for i in range(n)]
    query, box = ds.query_paths[0], ds.query_bbx[0]
    rows = []
    for aqe in (0, 10):
        index.query([query], [box], k=10, aqe=aqe)  # warm-up: compilation
        per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
        totals = []
        for _ in range(args.repeats):
            time.sleep(harness.PAUSE_S)
            t0 = time.perf_counter()
            hits = index.query([query], [box], k=10, aqe=aqe)
            totals.append(time.perf_counter() - t0)
            for s in STAGES:
                per_stage[s].append(hits.timings[s])
        med = {s: statistics.median(v) * 1e3 for s, v in per_stage.items()}
        total = sum(med.values())
        shares = " | ".join(f"{med[s]:.1f} ({100 * med[s] / total:.0f}%)" for s in STAGES)
        label = "G" if not aqe else f"G+AQE ({aqe})"
        rows.append(f"| {label} | {shares} | {statistics.median(totals) * 1e3:.0f} |")
    head = (
        f"**Query latency**, one 724x724 image (cropped to its box), random ResNet-50 + R-MAC, "
        f"whitening 2048 -> 512, {n:,} stored descriptors, top-10; median of {args.repeats} "
        f"queries after a warm-up. `python -m bench.index --parts=query --database={n} "
        f"--repeats={args.repeats}`"
    )
    table = [
        "| search | decode ms (share) | encode ms | post-process ms | search ms | end to end ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]
    return "\n".join([head, _env_line(), "", *table])


def bench_build(args: argparse.Namespace) -> str:
    from jretrieval.index import Index

    ds = _demo_dataset()
    n = args.build_images
    with tempfile.TemporaryDirectory() as tmp:
        folder = _index_folder(ds.db_paths[:n], os.path.join(tmp, "images"))
        index = Index.build(
            os.path.join(tmp, "index"),
            images=folder,
            model="random_resnet50",
            size=724,
            pca_dim=min(n, 512),
            bn="exact",
        )
    s = index.build_stats["seconds"]
    head = (
        f"**Build throughput**, {n} demo images at 724x724, random ResNet-50 + R-MAC, exact BN "
        f"recalibration, whitening to {min(n, 512)}: `python -m bench.index --parts=build "
        f"--build_images={n}` (one run, compilation included)"
    )
    table = [
        "| images | total s | images/s (whole build) | BN pass s | extraction s | "
        "extraction images/s | post-process s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {n} | {s['total']:.1f} | {index.build_stats['images_per_s']:.2f} | {s['bn']:.1f} | "
        f"{s['extract']:.1f} | {n / s['extract']:.2f} | {s['postprocess']:.2f} |",
    ]
    return "\n".join([head, _env_line(), "", *table])


def bench_demo(args: argparse.Namespace) -> str:
    from configs import demo as demo_config
    from jretrieval import experiment, multiscale

    rows = []
    for scales in ((1.0,), multiscale.CIRTORCH_SCALES):
        config = demo_config.get_config()
        config.ranking.columns = ("G",)
        config.output.top10_queries = 0
        config.extraction.scales = scales
        start = time.perf_counter()
        results = experiment.run(config)
        seconds = time.perf_counter() - start
        g = results.models["random_resnet50"]["G"]["mAP"]
        label = ", ".join(f"{s:.4g}" for s in scales)
        extract_s = results.timings["models"]["random_resnet50"]
        rows.append(
            f"| ({label}) | {g:.2f} | {extract_s['database'] + extract_s['queries']:.0f} | "
            f"{seconds:.0f} |"
        )
    head = (
        "**Multi-scale on the demo set**: `configs/demo.py` (random ResNet-50, 362x362, R-MAC, "
        "whitening 64, exact BN), G column, `python -m bench.index --parts=demo`"
    )
    table = [
        "| scales | G mAP % | extraction s (db + queries) | run s |",
        "| --- | ---: | ---: | ---: |",
        *rows,
    ]
    return "\n".join([head, _env_line(), "", *table])


def _env_line() -> str:
    env = harness.environment()
    load = os.getloadavg()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now}; {env['processor']}, {env['cores']} cores, jax {env['jax']}; load average "
        f"(1/5/15 min) {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (a shared machine)."
    )


def _write(part: str, text: str) -> None:
    start, end = f"<!-- bench:{part}:start -->", f"<!-- bench:{part}:end -->"
    doc = open(DOC, encoding="utf-8").read() if os.path.exists(DOC) else "# Index benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(doc)


PARTS = {"query": bench_query, "build": bench_build, "demo": bench_demo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="query,build", help=f"comma-separated: {list(PARTS)}")
    parser.add_argument("--database", type=int, default=50_000, help="stored descriptors")
    parser.add_argument("--repeats", type=int, default=7, help="timed queries per setting")
    parser.add_argument("--build_images", type=int, default=24, help="images indexed by build")
    args = parser.parse_args()
    for part in args.parts.split(","):
        text = PARTS[part](args)
        print(text + "\n", flush=True)
        _write(part, text)


if __name__ == "__main__":
    main()
