"""Conversion time and peak memory: ``weight_conversion`` beside a naive converter.

Run from the repo root: ``python -m bench.convert [--cases resnet50,simclr4x] [--dir /tmp/x]``
(about 2 minutes and 6 GB of disk for both cases; SimCLR 4x needs ~5 GB of RAM to build).

For each case a random PyTorch model in the published layout is built and saved (torchvision
ResNet-50: 25.6M parameters; SimCLR 4x via tonylins' layout: 383.6M parameters including ``fc``,
375M without). Each measurement runs in a fresh subprocess that imports everything first, then
resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and reports ``VmHWM`` minus the
RSS before the work: the memory the conversion itself needed, memory-mapped checkpoint pages
included. Modes:

- ``torch.load``: ``torch.load(weights_only=True, map_location="cpu")`` alone: the floor any
  converter reading the file with torch pays.
- ``naive``: ``torch.load`` then every tensor copied to a contiguous float32 Flax-layout array,
  then written with h5py (what a straightforward converter does).
- ``weight_conversion``: ``weight_conversion.convert_file`` (mmap, views, one copy at a time,
  SHA-256, shape check, atomic HDF5 write).

Figures go to ``docs/bench_convert.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

CASES = {"resnet50": {"depth": 50, "width": 1}, "simclr4x": {"depth": 50, "width": 4}}
MODES = ("torch.load", "naive", "weight_conversion")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _naive(src: str, out: str) -> None:
    import h5py
    import numpy as np
    import torch

    state = torch.load(src, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    arrays = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        a = value.float().numpy()
        arrays[key] = np.ascontiguousarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a)
    with h5py.File(out, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)


def child(mode: str, src: str, out: str) -> None:
    """Runs one measurement in this process and prints a JSON line."""
    import torch

    import weight_conversion

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    if mode == "torch.load":
        obj = torch.load(src, map_location="cpu", weights_only=True)
        del obj
    elif mode == "naive":
        _naive(src, out)
    else:
        weight_conversion.convert_file(src, out)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak": _status("VmHWM") - before}))


def build(case: str, path: str) -> int:
    """Saves a random model of ``case`` in its published layout; returns the file size."""
    import torch

    from references import torch_resnet as tr

    torch.manual_seed(0)
    model = tr.ResNet(**CASES[case], simclr_order=case.startswith("simclr"))
    if case.startswith("simclr"):
        tr.save_simclr(model, path)
    else:
        tr.save_torchvision(model, path)
    del model
    return os.path.getsize(path)


def measure(mode: str, src: str, out: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "bench.convert", "--child", mode, src, out],
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode:
        raise RuntimeError(f"{mode} on {src} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="docs/bench_convert.md")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    scratch = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
    rows = []
    for case in args.cases.split(","):
        src = os.path.join(scratch, f"{case}.pth")
        size = build(case, src)
        for mode in MODES:
            tag = re.sub(r"\W", "_", mode)
            out = os.path.join(scratch, f"{case}.{tag}.h5")
            r = measure(mode, src, out)
            rows.append((case, size, mode, r["seconds"], r["peak"]))
            print(
                f"{case:9s} {mode:18s} {r['seconds']:7.2f} s  peak {r['peak'] / 2**20:8.0f} MiB"
                f"  = {r['peak'] / size:4.2f} x checkpoint ({size / 2**20:.0f} MiB)",
                flush=True,
            )
            if os.path.exists(out):
                os.remove(out)
        os.remove(src)
    write_report(rows, args.out)


def write_report(rows: list[tuple], path: str) -> None:
    ref = {(c, m): (s, p) for c, _, m, s, p in rows}
    lines = [
        "# Conversion time and peak memory (`python -m bench.convert`)",
        "",
        f"Machine: {os.cpu_count()} CPU cores; {_meminfo()}; Python {sys.version.split()[0]}.",
        "Peak = kernel `VmHWM` minus the RSS before the work, in a fresh process per row",
        "(memory-mapped checkpoint pages count). Ratios are against the naive converter.",
        "",
        "| model | checkpoint | converter | time (s) | peak (MiB) | peak / checkpoint |"
        " time vs naive | peak vs naive |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, size, mode, seconds, peak in rows:
        ns, np_ = ref[(case, "naive")]
        lines.append(
            f"| {case} | {size / 2**20:.0f} MiB | {mode} | {seconds:.2f} | {peak / 2**20:.0f} | "
            f"{peak / size:.2f} | {seconds / ns:.2f} | {peak / np_:.2f} |"
        )
    lines += [
        "",
        "Target: the converter needs at most about 2x the checkpoint size.",
        "",
        "How `weight_conversion` stays near 1x: zip checkpoints are memory-mapped",
        "(`torch.load(mmap=True)`), float32 tensors become NumPy views and the OIHW->HWIO",
        "transposes are views too, so the only copies are the one tensor h5py is writing at a",
        "time; the dropped `fc` is never paged in. Its time includes the SHA-256 of the file, the",
        "`jax.eval_shape` check and the atomic HDF5 write. On the small ResNet-50 a fixed cost",
        "of about 70 MiB on top of the file (not broken down further) dominates the ratio; on",
        "SimCLR 4x (375M parameters) the peak is close to the file size, while the naive",
        "converter holds the loaded checkpoint and a full copy (about 2x). Times are noisy:",
        "the 2-core machine was shared with other jobs during the run.",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _meminfo() -> str:
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    return f"{total / 2**30:.0f} GiB RAM"


if __name__ == "__main__":
    main()
