"""Encoder throughput at 724x724: jretrieval's jitted ResNet-50 + R-MAC beside PyTorch's ResNet-50.

Run from the repo root (about 10 min on 2 cores; run it when the machine is otherwise idle,
``uptime``):

    python -m bench.extract [--batch-sizes 1,4] [--repeats 5] [--size 724]
    python -m bench.extract --xla-variants   # also XLA CPU flag variants, one subprocess each

Shape convention: images ``uint8 [B, H, W, 3]`` (NHWC) for jretrieval, which normalises them
inside its jitted step exactly as extraction does (``jretrieval.extract.make_step``: ``/255``,
mean/std, ResNet-50 in inference mode, R-MAC L=3 -> ``[B, 2048]``); PyTorch gets a float32
``[B, 3, H, W]`` tensor already normalised and runs the encoder alone (no pooling), which
favours the reference.

What is timed, all in this one process with interleaved rounds (every configuration once per
round, the order rotated each round) so that load from other processes hits all of them alike:

- ``jretrieval``: ResNet-50 (random weights; same architecture and FLOPs as the trained one)
  in float32 and in bfloat16 (``Encoder.module`` cloned with ``dtype=bfloat16``: convs in
  bfloat16, BN statistics and parameters float32, R-MAC in float32), one jitted call per batch.
- ``pytorch``: ``tests.torch_reference.torch_resnet(50)`` (torchvision layout), ``eval()``,
  ``torch.inference_mode()``, ``torch.set_num_threads(<cores>)``, in default contiguous NCHW
  and in ``channels_last``; float32 and bfloat16 (module and input cast with ``.to``). The
  faster layout at each batch size is the reference ("PyTorch float32"); XLA CPU uses all cores.

The first two calls of every configuration (compilation, oneDNN primitive creation, allocator
warm-up) are excluded; each figure is the median over ``--repeats`` rounds. The load average
before and after is recorded. Results: a printed table and ``docs/bench_extract.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

DOC = "docs/bench_extract.md"
#: XLA CPU flags tried by ``--xla-variants`` (each one alone, in its own subprocess).
XLA_VARIANTS = (
    "",
    "--xla_cpu_use_thunk_runtime=false",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_onednn_fusion_type=+convolution",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_multi_thread_eigen=false",
)


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Random ``uint8 [batch, size, size, 3]`` RGB images."""
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def jretrieval_step(dtype: str) -> Callable[[np.ndarray], Any]:
    """The extraction step of a random ResNet-50 (``uint8 [B,H,W,3] -> [B,2048]``) in ``dtype``."""
    import jax.numpy as jnp

    from jretrieval import models
    from jretrieval.extract import make_step

    encoder = models.init_encoder({"name": "resnet", "depth": 50, "width": 1}, seed=0)
    if dtype != "float32":
        encoder = encoder.replace(module=encoder.module.clone(dtype=jnp.dtype(dtype)))
    step = make_step(encoder, pooling="rmac", pooling_kwargs={"levels": 3})
    return lambda x: step(x).block_until_ready()


def torch_step(dtype: str, layout: str, batch: int, size: int) -> Callable[[np.ndarray], Any]:
    """PyTorch ResNet-50 forward (float input prepared once; ``x`` is ignored)."""
    import torch

    from tests.torch_reference import torch_resnet

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = copy.deepcopy(torch_resnet(50, seed=0)).eval().to(tdtype)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.from_numpy(images(batch, size)).permute(0, 3, 1, 2).float() / 255.0
    x = ((x - mean) / std).to(tdtype)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous()

    def run(_: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def measure(batch_sizes: list[int], size: int, repeats: int, warmup: int = 2) -> list[dict]:
    """Images/s of every configuration (median over interleaved rounds)."""
    import jax
    import torch

    torch.set_num_threads(cores())
    rows = []
    for batch in batch_sizes:
        x = images(batch, size)
        configs: list[tuple[dict, Callable]] = []
        for dtype in ("float32", "bfloat16"):
            configs.append(
                (
                    {"framework": "jretrieval", "dtype": dtype, "layout": "NHWC (XLA)"},
                    jretrieval_step(dtype),
                )
            )
            for layout in ("contiguous", "channels_last"):
                configs.append(
                    (
                        {"framework": "pytorch", "dtype": dtype, "layout": layout},
                        torch_step(dtype, layout, batch, size),
                    )
                )
        times: list[list[float]] = [[] for _ in configs]
        for info, fn in configs:
            start = time.perf_counter()
            for _ in range(warmup):
                fn(x)
            print(f"  warm-up {info} batch {batch}: {time.perf_counter() - start:.1f}s", flush=True)
        for r in range(repeats):
            order = list(range(len(configs)))
            order = order[r % len(order) :] + order[: r % len(order)]
            for i in order:
                start = time.perf_counter()
                configs[i][1](x)
                times[i].append(time.perf_counter() - start)
            print(
                f"  batch {batch} round {r + 1}/{repeats} load {os.getloadavg()[0]:.2f}", flush=True
            )
        for (info, _), ts in zip(configs, times, strict=True):
            med = statistics.median(ts)
            rows.append({**info, "batch": batch, "seconds": ts, "images_per_s": batch / med})
        del configs
        jax.clear_caches()
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds ``ratio``: images/s over the faster PyTorch float32 layout at the same batch size."""
    for row in rows:
        ref = max(
            r["images_per_s"]
            for r in rows
            if r["framework"] == "pytorch"
            and r["dtype"] == "float32"
            and r["batch"] == row["batch"]
        )
        row["ratio"] = row["images_per_s"] / ref
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| framework | dtype | layout | batch | images/s | s/batch (median) "
        "| ratio to PyTorch fp32 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['framework']} | {r['dtype']} | {r['layout']} | {r['batch']} | "
            f"{r['images_per_s']:.3f} | {statistics.median(r['seconds']):.2f} | "
            f"{r['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def child_variant(batch: int, size: int, repeats: int) -> None:
    """One jretrieval float32 measurement under the current ``XLA_FLAGS``; prints JSON."""
    step = jretrieval_step("float32")
    x = images(batch, size)
    start = time.perf_counter()
    step(x)
    first = time.perf_counter() - start
    step(x)
    ts = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x)
        ts.append(time.perf_counter() - start)
    print(
        json.dumps(
            {"first_call_s": first, "seconds": ts, "images_per_s": batch / statistics.median(ts)}
        )
    )


def xla_variants(batch: int, size: int, repeats: int) -> list[dict]:
    """jretrieval float32 images/s under each of ``XLA_VARIANTS`` (fresh process each)."""
    out = []
    for flags in (*XLA_VARIANTS, ""):  # the default again at the end: a drift check
        env = {**os.environ, "XLA_FLAGS": flags}
        cmd = [
            sys.executable,
            "-m",
            "bench.extract",
            "--child-variant",
            f"--batch-sizes={batch}",
            f"--size={size}",
            f"--repeats={repeats}",
        ]
        load = os.getloadavg()[0]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            tail = (run.stderr.strip().splitlines() or ["?"])[-1]
            out.append({"flags": flags, "error": tail[:200], "load": load})
        else:
            out.append({"flags": flags, "load": load, **json.loads(run.stdout.splitlines()[-1])})
        print(
            f"  XLA_FLAGS={flags!r}: {out[-1].get('images_per_s', out[-1].get('error'))}",
            flush=True,
        )
    return out


def variants_table(variants: list[dict]) -> str:
    base = statistics.median(
        [v["images_per_s"] for v in variants if v["flags"] == "" and "images_per_s" in v]
    )
    lines = [
        "| XLA_FLAGS | images/s | ratio to default | first call (compile) s | load |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for v in variants:
        name = f"`{v['flags']}`" if v["flags"] else "(default)"
        if "error" in v:
            lines.append(f"| {name} | failed: {v['error']} | | | {v['load']:.1f} |")
        else:
            lines.append(
                f"| {name} | {v['images_per_s']:.3f} | {v['images_per_s'] / base:.2f}x | "
                f"{v['first_call_s']:.1f} | {v['load']:.1f} |"
            )
    return "\n".join(lines)


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_doc(path: str, text: str) -> None:
    """Replaces the part of ``path`` between ``START`` and ``END`` (the hand-written notes
    around it stay); creates the file if needed. Written to a temp name, then renamed."""
    body = f"{START}\n{text}{END}"
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if START in old and END in old:
        head, rest = old.split(START, 1)
        new = head + body + rest.split(END, 1)[1]
    else:
        new = f"# Encoder throughput: jretrieval vs PyTorch (`bench/extract.py`)\n\n{body}\n{old}"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def environment() -> dict[str, Any]:
    import jax
    import torch

    return {
        "cpu": cpu_name(),
        "cores": cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--size", type=int, default=724)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--xla-variants", action="store_true")
    parser.add_argument("--child-variant", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=DOC, help="results table (markdown); '' to skip")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.child_variant:
        child_variant(batch_sizes[0], args.size, args.repeats)
        return
    load_before = os.getloadavg()
    rows = with_ratios(measure(batch_sizes, args.size, args.repeats))
    load_after = os.getloadavg()
    env = environment()
    result = table(rows)
    print(result)
    variants = None
    if args.xla_variants:
        variants = xla_variants(1, args.size, max(3, args.repeats // 2))
        print(variants_table(variants))
    print(json.dumps({"environment": env, "load_before": load_before, "load_after": load_after}))
    if args.out:
        write_doc(args.out, render(env, rows, variants, load_before, load_after, args))


def render(
    env: dict,
    rows: list[dict],
    variants: list[dict] | None,
    load_before: tuple,
    load_after: tuple,
    args: argparse.Namespace,
) -> str:
    """The markdown body of ``docs/bench_extract.md`` (measured part only)."""
    parts = [
        "Generated by `python -m bench.extract` (this part is rewritten on every run).",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']} "
        f"({env['torch_threads']} threads), jax {env['jax']}, XLA_FLAGS="
        f"`{env['XLA_FLAGS'] or '(none)'}`.",
        f"Input {args.size}x{args.size}, median of {args.repeats} interleaved rounds, two warm-up "
        f"calls excluded. Load average (1/5/15 min) before: "
        f"{' / '.join(f'{v:.2f}' for v in load_before)}, after: "
        f"{' / '.join(f'{v:.2f}' for v in load_after)}.",
        "",
        table(rows),
    ]
    if variants is not None:
        parts += [
            "",
            "XLA CPU flag variants (jretrieval float32, batch 1, one process each):",
            "",
            variants_table(variants),
        ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
