"""Encoder throughput at 724x724: jretrieval's jitted ResNet-50 + R-MAC beside PyTorch's ResNet-50.

Run from the repo root (about 10 min on 2 cores; run it when the machine is otherwise idle,
``uptime``):

    python -m bench.extract [--batch-sizes 1,4] [--repeats 5] [--size 724]
    python -m bench.extract --parts=main,variants   # also XLA CPU compiler option variants

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
import time
from collections.abc import Callable
from typing import Any

import numpy as np

DOC = "docs/bench_extract.md"
#: XLA CPU compiler options tried by ``--xla-variants`` (``jax.jit(...).lower(x).compile(
#: compiler_options=...)``, the per-executable form of ``XLA_FLAGS``), each beside the default in
#: the same interleaved rounds. jax 0.10's XLA CPU lowers convolutions to YNNPACK fusions by
#: default; ``xla_cpu_experimental_ynn_fusion_type=""`` turns that off (Eigen convolutions, 1x1
#: convolutions rewritten as dots); ``LIBRARY_FUSION_TYPE_ELTWISE`` lets YNNPACK take whole
#: conv + BN + ReLU (+ residual) subgraphs (compiles for minutes at 724 px).
YNN = "xla_cpu_experimental_ynn_fusion_type"
XLA_VARIANTS: dict[str, dict[str, Any]] = {
    "default (YNNPACK convolutions)": {},
    f'{YNN}="" (Eigen convolutions)': {YNN: ""},
    f"{YNN}=LIBRARY_FUSION_TYPE_ELTWISE": {YNN: "LIBRARY_FUSION_TYPE_ELTWISE"},
    "xla_cpu_enable_fast_math=true": {"xla_cpu_enable_fast_math": True},
    "xla_cpu_use_onednn=true": {"xla_cpu_use_onednn": True},
}


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


def jretrieval_step(
    dtype: str, x: np.ndarray, options: dict[str, Any] | None = None
) -> Callable[[np.ndarray], Any]:
    """The extraction step of a random ResNet-50 (``uint8 [B,H,W,3] -> [B,2048]``) in ``dtype``,
    compiled for ``x``'s shape with XLA ``options`` (``None``: plain jit, the default flags)."""
    import jax

    from jretrieval import models
    from jretrieval.extract import make_step

    encoder = models.init_encoder({"name": "resnet", "depth": 50, "width": 1}, seed=0)
    encoder = encoder.with_dtype(dtype)
    step = make_step(encoder, pooling="rmac", pooling_kwargs={"levels": 3})
    if options is not None:
        step = jax.jit(step).lower(x).compile(compiler_options=options)
    return lambda images: step(images).block_until_ready()


def torch_step(
    dtype: str, layout: str, batch: int, size: int, threads: int
) -> Callable[[np.ndarray], Any]:
    """PyTorch ResNet-50 forward on ``threads`` threads (float input prepared once; the
    argument of the returned function is ignored)."""
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
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return model(x)

    return run


def run_rounds(
    configs: list[tuple[dict, Callable]], x: np.ndarray, repeats: int, warmup: int = 2
) -> list[dict]:
    """Times every ``(info, fn)`` on ``x``: ``warmup`` calls each, then ``repeats`` rounds that
    call every configuration once (order rotated each round). Adds ``seconds``,
    ``images_per_s`` (batch / median) and ``best_images_per_s`` (batch / minimum) to ``info``."""
    times: list[list[float]] = [[] for _ in configs]
    for info, fn in configs:
        start = time.perf_counter()
        for _ in range(warmup):
            fn(x)
        print(f"  warm-up {info}: {time.perf_counter() - start:.1f}s", flush=True)
    for r in range(repeats):
        order = list(range(len(configs)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            start = time.perf_counter()
            configs[i][1](x)
            times[i].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{repeats}, load {os.getloadavg()[0]:.2f}", flush=True)
    batch = len(x)
    return [
        {
            **info,
            "batch": batch,
            "seconds": ts,
            "images_per_s": batch / statistics.median(ts),
            "best_images_per_s": batch / min(ts),
        }
        for (info, _), ts in zip(configs, times, strict=True)
    ]


def measure(batch_sizes: list[int], size: int, repeats: int) -> list[dict]:
    """Images/s of jretrieval and PyTorch, float32 and bfloat16, at each batch size."""
    import jax

    rows = []
    for batch in batch_sizes:
        x = images(batch, size)
        configs: list[tuple[dict, Callable]] = []
        for dtype in ("float32", "bfloat16"):
            info = {"framework": "jretrieval", "dtype": dtype, "layout": "NHWC (XLA)"}
            configs.append((info, jretrieval_step(dtype, x)))
            for layout in ("contiguous", "channels_last"):
                info = {"framework": "pytorch", "dtype": dtype, "layout": layout}
                configs.append((info, torch_step(dtype, layout, batch, size, cores())))
        if cores() > 1:  # OpenMP threads stall when other processes hold a core
            info = {"framework": "pytorch", "dtype": "float32", "layout": "contiguous, 1 thread"}
            configs.append((info, torch_step("float32", "contiguous", batch, size, 1)))
        rows += run_rounds(configs, x, repeats)
        del configs
        jax.clear_caches()
    return rows


def xla_variants(batch: int, size: int, repeats: int) -> list[dict]:
    """jretrieval float32 and bfloat16 under each of ``XLA_VARIANTS``, interleaved."""
    x = images(batch, size)
    configs = []
    for dtype in ("float32", "bfloat16"):
        for name, options in XLA_VARIANTS.items():
            start = time.perf_counter()
            fn = jretrieval_step(dtype, x, options)
            compile_s = time.perf_counter() - start
            configs.append(({"variant": name, "dtype": dtype, "compile_s": compile_s}, fn))
    rows = run_rounds(configs, x, repeats)
    for row in rows:
        base = next(
            r for r in rows if r["dtype"] == "float32" and r["variant"] == next(iter(XLA_VARIANTS))
        )
        row["ratio"] = row["images_per_s"] / base["images_per_s"]
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds ``ratio``: images/s over the fastest PyTorch float32 row (any layout or thread
    count) at the same batch size."""
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
        "| framework | dtype | layout | batch | images/s (median) | images/s (best) "
        "| ratio to PyTorch fp32 (median) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['framework']} | {r['dtype']} | {r['layout']} | {r['batch']} | "
            f"{r['images_per_s']:.3f} | {r['best_images_per_s']:.3f} | {r['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def variants_table(rows: list[dict]) -> str:
    lines = [
        "| XLA compiler option | dtype | images/s (median) | images/s (best) "
        "| ratio to default fp32 | compile + first call s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| `{r['variant']}` | {r['dtype']} | {r['images_per_s']:.3f} | "
            f"{r['best_images_per_s']:.3f} | {r['ratio']:.2f}x | {r['compile_s']:.0f} |"
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
    parser.add_argument(
        "--parts", default="main", help="comma-separated: main (the comparison), variants (XLA)"
    )
    parser.add_argument("--out", default=DOC, help="results file (markdown); '' to skip")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"main", "variants"}:
        raise ValueError(f"--parts={args.parts!r}; expected a subset of main,variants")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    import torch

    torch.set_num_threads(cores())  # XLA CPU uses every core too
    env = environment()
    sections = []
    if "main" in parts:
        load_before = os.getloadavg()
        rows = with_ratios(measure(batch_sizes, args.size, args.repeats))
        sections.append(("main", rows, load_before, os.getloadavg()))
        print(table(rows))
    if "variants" in parts:
        load_before = os.getloadavg()
        rows = xla_variants(batch_sizes[0], args.size, args.repeats)
        sections.append(("variants", rows, load_before, os.getloadavg()))
        print(variants_table(rows))
    print(json.dumps(env))
    if args.out:
        write_doc(args.out, render(env, sections, args))


def render(env: dict, sections: list[tuple], args: argparse.Namespace) -> str:
    """The generated markdown of ``docs/bench_extract.md``."""
    loads = lambda v: " / ".join(f"{x:.2f}" for x in v)
    parts = [
        f"Generated by `python -m bench.extract --parts={args.parts} "
        f"--batch-sizes={args.batch_sizes} --size={args.size} --repeats={args.repeats}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (rewritten on every run).",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']} "
        f"({env['torch_threads']} threads), jax {env['jax']}, XLA_FLAGS="
        f"`{env['XLA_FLAGS'] or '(none)'}`. Input {args.size}x{args.size}; each figure is "
        f"batch size over the median (or the minimum: best) of {args.repeats} interleaved "
        "rounds, two warm-up calls excluded.",
    ]
    for name, rows, before, after in sections:
        title = "jretrieval vs PyTorch" if name == "main" else "XLA CPU compiler options"
        parts += [
            "",
            f"**{title}** (load average 1/5/15 min before: {loads(before)}; after: {loads(after)})",
            "",
            table(rows) if name == "main" else variants_table(rows),
        ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
