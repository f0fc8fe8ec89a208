"""Encoder throughput at 724x724: jretrieval's jitted ResNet-50 + R-MAC beside PyTorch's ResNet-50.

Run from the repo root, preferably when the machine is otherwise idle (``uptime``):

    python -m bench.extract                       # main: about 15 min on 2 cores
    python -m bench.extract --parts=variants --batch-sizes=4   # the candidates, about 25 min
    python -m bench.extract --parts=layers        # bfloat16 error per layer, 3 encoders
    python -m bench.extract --parts=demo          # mAP float32 vs bfloat16 on the demo set
    python -m bench.extract --parts=accuracy      # the same, end to end through the runner

Shape convention: images ``uint8 [B, H, W, 3]`` (NHWC) for jretrieval, which normalises them
inside its jitted step exactly as extraction does (``jretrieval.steps.make_step``: ``/255``,
mean/std, ResNet-50 in inference mode, R-MAC L=3 -> ``[B, 2048]``); PyTorch gets a float32
``[B, 3, H, W]`` tensor already normalised and runs the encoder alone (no pooling), which
favours the reference.

``main`` times, in this one process with interleaved rounds (every configuration once per
round, the order rotated each round, ``bench.harness.call_ms`` for each call) so that load from
other processes hits all alike:

- ``jretrieval``: ResNet-50 (random weights; same architecture and FLOPs as a trained one)
  compiled as each ``JRETRIEVAL`` variant says: float32 with lax convolutions, bfloat16 with
  ``conv_dot`` convolutions (``Encoder.with_dtype("bfloat16")``'s CPU default: the native
  AVX512-BF16 kernel ``native.conv_bf16`` with bias, shortcut and ReLU fused, where it builds;
  kernels cast to bfloat16 once, ``Encoder.step_variables``; R-MAC in float32), both with BN
  folded into the convs (``models.fold_batch_norm``, as after recalibration) and the XLA CPU
  options given there (passed explicitly, whatever ``jretrieval``'s defaults are); one jitted
  call per batch, the variables passed as arguments; XLA (and the kernel, on XLA's intra-op
  pool) uses all cores.
- ``pytorch``: ``references.torch_resnet.torch_resnet(50)`` (torchvision layout), ``eval()``,
  ``torch.inference_mode()``, ``torch.set_num_threads(<cores>)``: float32 contiguous NCHW and
  ``channels_last``, bfloat16 ``channels_last`` (module and input cast with ``.to``), float32
  on one thread (OpenMP's barriers stall when other processes hold a core). Ratios divide by
  the fastest PyTorch float32 row and by PyTorch bfloat16 channels_last, same batch size.

Each figure is the batch size over the median (and, "best", the minimum) of ``--repeats``
rounds; the first two calls of each configuration (compilation, oneDNN primitive creation) are
excluded; the 1-min load average is given per row and before/after each part.
``--parts=variants`` times the candidates (``VARIANTS``: the bfloat16 step before and after
each change) the same way, PyTorch beside; ``--parts=profile`` splits the bfloat16 step's time
by XLA op (``profile_ops``); ``--parts=layers`` measures bfloat16's descriptor cosine and relative
error per layer against float32 for ResNet-50, SimCLR 2x width and AMDIM, BN statistics as
initialised and recalibrated on demo images (``layer_errors``); ``--parts=demo`` measures mAP on
the offline demo set (``demo_accuracy``); ``--parts=accuracy`` runs that demo through the
experiment runner with ``extraction.dtype`` float32 and bfloat16 and checks ``ACCURACY_TARGET``
(``demo_dtypes``). Results are printed and written to ``docs/bench_extract.md`` between
per-part markers (the hand-written notes around them are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
import zlib
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np

DOC = "docs/bench_extract.md"
#: XLA CPU compiler options (``jax.jit(fn).lower(...).compile(compiler_options=...)``, the
#: per-executable form of ``XLA_FLAGS``). jax 0.10's XLA CPU lowers convolutions to YNNPACK
#: fusions by default; ``xla_cpu_experimental_ynn_fusion_type=""`` turns every YNNPACK fusion
#: off (Eigen convolutions, 1x1 convolutions rewritten as dots): ``xla_cpu.CPU_COMPILER_OPTIONS``
#: (``EIGEN``). ``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`` hands each dot (and nothing
#: else) to YNNPACK, whose GEMMs use the AVX512-BF16 instructions: with convolutions written as
#: im2col + dot (``conv_dot``) that is what reaches the bfloat16 units (``YNN_DOTS``).
YNN = "xla_cpu_experimental_ynn_fusion_type"
DOT = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
EIGEN: dict[str, Any] = {YNN: ""}
YNN_DOTS: dict[str, Any] = {YNN: DOT}
#: ``--parts=accuracy``'s target: every figure with bfloat16 within this many points of float32.
ACCURACY_TARGET = 0.3


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of compiling jretrieval's extraction step (ResNet-50 + R-MAC).

    ``conv_dot``: convolutions as im2col + dot (``models.convdot``); ``fold``: BatchNorm folded
    into the convs (``models.fold``); ``options``: XLA CPU compiler options; ``native``:
    bfloat16 convolutions run ``native.conv_bf16`` where it builds (else im2col + dot in XLA);
    ``float_moves``: bfloat16 im2col moves the values (``float_route_conv_dot``, as before
    ``conv_dot`` moved bit patterns); ``kernels_in_step``: the executable takes float32 kernels
    and casts them on every call (as before ``Encoder.step_variables``); ``nn_max_pool``: the
    stem's max pool is ``nn.max_pool`` (as before ``resnet.stem_max_pool``).
    """

    name: str
    dtype: str
    conv_dot: bool
    fold: bool
    options: dict[str, Any]
    native: bool = True
    float_moves: bool = False
    kernels_in_step: bool = False
    nn_max_pool: bool = False


#: what ``--parts=main`` times for jretrieval: the winners of ``--parts=variants``.
JRETRIEVAL = (
    Variant("lax convs, BN folded, YNNPACK dots", "float32", False, True, YNN_DOTS),
    Variant("lax convs, BN folded, Eigen", "float32", False, True, EIGEN),
    Variant(
        "native conv (AVX512-BF16), BN folded, epilogue fused", "bfloat16", True, True, YNN_DOTS
    ),
)
#: the candidates ``--parts=variants`` compares (same interleaved rounds, PyTorch beside): the
#: bfloat16 step as issue 12 left it, after its XLA-side fixes, and with the native kernel. The
#: candidates tried and dropped earlier (oneDNN dots, per-image im2col, float32 im2col, BN not
#: folded) are recorded in ``docs/bench_extract.md``.
VARIANTS = (
    JRETRIEVAL[1],
    Variant(
        "im2col + YNNPACK dots, values moved, kernels cast per call, nn.max_pool (before)",
        "bfloat16",
        True,
        True,
        YNN_DOTS,
        native=False,
        float_moves=True,
        kernels_in_step=True,
        nn_max_pool=True,
    ),
    Variant(
        "im2col + YNNPACK dots, bit patterns moved, kernels cast once, stem pool on bits",
        "bfloat16",
        True,
        True,
        YNN_DOTS,
        native=False,
    ),
    JRETRIEVAL[2],
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


@functools.lru_cache(maxsize=1)
def _encoder() -> Any:
    """A random ResNet-50 (Flax default init, seed 0), built once per process."""
    from jretrieval import models

    return models.init_encoder({"name": "resnet", "depth": 50, "width": 1}, seed=0)


def jretrieval_step(variant: Variant, x: np.ndarray) -> Callable[[np.ndarray], Any]:
    """The extraction step (``jretrieval.extract.make_step``: ``uint8 [B,H,W,3] -> [B,2048]``,
    R-MAC L=3) of a random ResNet-50 built and compiled as ``variant`` says, for ``x``'s shape.
    The variables are arguments of the executable (not constants XLA could fold)."""
    import flax.linen as nn
    import jax

    from jretrieval.models import convdot, resnet
    from jretrieval.models.fold import fold_batch_norm
    from jretrieval.steps import Pooling, make_step

    encoder = _encoder()
    if variant.fold:
        encoder = fold_batch_norm(encoder)
    encoder = encoder.with_dtype(variant.dtype, conv_dot=variant.conv_dot)

    def describe(variables: Any, images: Any) -> Any:
        step = make_step(encoder.replace(variables=variables), Pooling.of("rmac", {"levels": 3}))
        return step(images)

    # float32 kernels are cast inside the executable (make_step casts traced variables)
    variables = encoder.variables if variant.kernels_in_step else encoder.step_variables()
    jax.clear_caches()  # the step's inner jit would reuse another variant's trace
    with contextlib.ExitStack() as stack:
        if not variant.native:
            stack.enter_context(mock.patch.object(convdot, "uses_native", lambda *a, **k: False))
        if variant.float_moves:
            stack.enter_context(mock.patch.object(convdot, "conv_dot", float_route_conv_dot))
        if variant.nn_max_pool:
            pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2))
            pool = functools.partial(pool, padding=((1, 1), (1, 1)))
            stack.enter_context(mock.patch.object(resnet, "stem_max_pool", pool))
        compiled = jax.jit(describe).lower(variables, x).compile(variant.options)
    return lambda images: jax.block_until_ready(compiled(variables, images))


def float_route_conv_dot(lhs: Any, rhs: Any, window_strides: Any, padding: Any, **kw: Any) -> Any:
    """``conv_dot`` as it was before it moved bit patterns: pad, views and concatenate on the
    bfloat16 values (XLA's CPU backend converts each to float32 and back), then the same dot."""
    import jax.numpy as jnp
    from jax import lax

    from jretrieval.models import convdot

    kh, kw_, cin, cout = rhs.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw_), window_strides, padding)
    x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    patches = convdot.im2col(x, (kh, kw_), tuple(window_strides))
    y = jnp.dot(patches, rhs.reshape(-1, cout), preferred_element_type=jnp.float32)
    return y.astype(lhs.dtype)


def torch_step(
    dtype: str, layout: str, batch: int, size: int, threads: int
) -> Callable[[np.ndarray], Any]:
    """PyTorch ResNet-50 forward on ``threads`` threads (float input prepared once; the
    argument of the returned function is ignored)."""
    import torch

    from references.torch_resnet import torch_resnet

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
    """Times every ``(info, fn)`` on ``x`` with ``harness.call_ms`` (a pause before each call, so
    one library's spinning threads do not slow the next): ``warmup`` calls each, then
    ``repeats`` rounds that call every configuration once (order rotated each round). Adds
    ``seconds``, ``images_per_s`` (batch / median), ``best_images_per_s`` (batch / minimum) and
    ``load`` (1-min load average, mean over the rounds) to ``info``."""
    from bench import harness

    times: list[list[float]] = [[] for _ in configs]
    for info, fn in configs:
        start = time.perf_counter()
        for _ in range(warmup):
            fn(x)
        info["warmup_s"] = time.perf_counter() - start
        print(f"  warm-up {info}: {info['warmup_s']:.1f}s", flush=True)
    loads = []
    for r in range(repeats):
        order = list(range(len(configs)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            ms, _ = harness.call_ms(lambda fn=configs[i][1]: fn(x))
            times[i].append(ms / 1e3)
        loads.append(os.getloadavg()[0])
        print(f"  round {r + 1}/{repeats}, load {loads[-1]:.2f}", flush=True)
    batch = len(x)
    return [
        {
            **info,
            "batch": batch,
            "seconds": ts,
            "images_per_s": batch / statistics.median(ts),
            "best_images_per_s": batch / min(ts),
            "load": statistics.mean(loads),
        }
        for (info, _), ts in zip(configs, times, strict=True)
    ]


def torch_configs(batch: int, size: int) -> list[tuple[dict, Callable]]:
    """PyTorch float32 (contiguous, channels_last, and one thread) and bfloat16 channels_last."""
    configs = []
    for dtype, layout in (
        ("float32", "contiguous"),
        ("float32", "channels_last"),
        ("bfloat16", "channels_last"),
    ):
        info = {"framework": "pytorch", "variant": layout, "dtype": dtype}
        configs.append((info, torch_step(dtype, layout, batch, size, cores())))
    if cores() > 1:  # OpenMP threads stall when other processes hold a core
        info = {"framework": "pytorch", "variant": "contiguous, 1 thread", "dtype": "float32"}
        configs.append((info, torch_step("float32", "contiguous", batch, size, 1)))
    return configs


def measure(
    batch_sizes: list[int], size: int, repeats: int, variants: tuple[Variant, ...] = JRETRIEVAL
) -> list[dict]:
    """Images/s of jretrieval ``variants`` and PyTorch (``torch_configs``) at each batch size,
    all in the same interleaved rounds; ``compile_s`` is each variant's lowering + compile."""
    import jax

    _encoder()  # initialised outside the compile timings
    rows = []
    for batch in batch_sizes:
        x = images(batch, size)
        configs: list[tuple[dict, Callable]] = []
        for variant in variants:
            start = time.perf_counter()
            fn = jretrieval_step(variant, x)
            info = {"framework": "jretrieval", "variant": variant.name, "dtype": variant.dtype}
            info["compile_s"] = time.perf_counter() - start
            print(f"  compiled {info}", flush=True)
            configs.append((info, fn))
        configs += torch_configs(batch, size)
        rows += run_rounds(configs, x, repeats)
        del configs
        jax.clear_caches()
    return with_ratios(rows)


def _noisy_loader(seed: int) -> Callable[..., np.ndarray]:
    """``images.load_image`` plus independent uniform noise in {-1, 0, +1} grey levels."""
    from jretrieval.datasets import images as images_lib

    def load(path: str, *, bbx: Any = None, policy: Any) -> np.ndarray:
        img = images_lib.load_image(path, bbx=bbx, policy=policy)
        key = zlib.crc32(os.path.basename(path).encode())
        noise = np.random.default_rng([seed, key]).integers(-1, 2, img.shape)
        return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)

    return load


def _stage_errors(encoder: Any, paths: list[str], policy: Any) -> dict[str, float]:
    """``||bf16 - f32|| / ||f32||`` of every stage output of ``encoder`` on ``paths``."""
    import jax
    import jax.numpy as jnp

    from jretrieval.datasets import images as images_lib
    from jretrieval.steps import normalise

    imgs = np.stack([images_lib.load_image(p, policy=policy) for p in paths])
    x = normalise(imgs, encoder.preprocessing["mean"], encoder.preprocessing["std"])
    out = {}
    for dtype in ("float32", "bfloat16"):
        enc = encoder.with_dtype(dtype)
        stages = jax.jit(lambda v, x, m=enc.module: m.apply(v, x, train=False)[1])(enc.variables, x)
        out[dtype] = {k: np.asarray(v.astype(jnp.float32), np.float64) for k, v in stages.items()}
    a, b = out["float32"], out["bfloat16"]
    return {k: float(np.linalg.norm(b[k] - a[k]) / np.linalg.norm(a[k])) for k in a}


#: encoders of ``--parts=layers`` (random Flax init). AMDIM at a quarter of AMDIM-Medium's width
#: and depth (ndf 256, n_rkhs 2048, depth 10 in the release), with the release's ``use_bn=False``
#: (BN only at layer 9), to fit the 2-core machine; the layer layout is the released one.
LAYER_ENCODERS = {
    "ResNet-50": {"name": "resnet", "depth": 50},
    "SimCLR 2x width (ResNet-50, width 2)": {"name": "resnet", "depth": 50, "width": 2},
    "AMDIM (ndf 64, n_rkhs 512, depth 3)": {
        "name": "amdim",
        "ndf": 64,
        "n_rkhs": 512,
        "n_depth": 3,
    },
}


def _demo_images(workdir: str, count: int) -> np.ndarray:
    """``count`` demo database images (``configs/demo.py``'s set and resize policy, 362 px),
    cropped to their common top-left size so that they stack: ``uint8 [count, h, w, 3]``."""
    from configs import demo
    from jretrieval import experiment
    from jretrieval.datasets import images as images_lib

    config = demo.get_config()
    config.workdir = workdir
    config.data.root = os.path.join(workdir, "data")
    dataset = experiment.load_data(config)
    policy = images_lib.as_policy(dict(config.extraction.policy))
    if len(dataset.db_paths) < count:
        raise ValueError(f"demo set has {len(dataset.db_paths)} database images; need {count}")
    imgs = [images_lib.load_image(p, policy=policy) for p in dataset.db_paths[:count]]
    h = min(im.shape[0] for im in imgs)
    w = min(im.shape[1] for im in imgs)
    return np.stack([im[:h, :w] for im in imgs])


def layer_errors(workdir: str, calibration: int = 16, evaluation: int = 8) -> list[dict]:
    """bfloat16 against float32 for each of ``LAYER_ENCODERS``, BN statistics as initialised
    (mean 0, var 1: a tame network) and recalibrated ("exact", on ``calibration`` demo images).

    float32 is the plain module (lax convolutions, BN unfolded); compared with it: float32 with
    BN folded, and the bfloat16 extraction path (BN folded, ``with_dtype("bfloat16")``: im2col +
    dot on CPU). Per row: relative L2 error ``||x - f32|| / ||f32||`` of every stage output, and
    the cosine of R-MAC (L=3) descriptors of the feature map to float32's, on ``evaluation``
    other demo images."""
    import jax
    import jax.numpy as jnp

    from jretrieval import models, pooling
    from jretrieval.models.fold import fold_batch_norm
    from jretrieval.recalibration import recalibrate_bn
    from jretrieval.steps import normalise

    imgs = _demo_images(workdir, calibration + evaluation)
    calib, test = imgs[:calibration], imgs[calibration:]

    @functools.partial(jax.jit, static_argnames="module")
    def forward(module: Any, variables: Any, x: Any) -> Any:
        fmap, stages = module.apply(variables, x, train=False)
        stages = {k: v.astype(jnp.float32) for k, v in stages.items()}
        return pooling.rmac(fmap.astype(jnp.float32), levels=3), stages

    rows = []
    for name, architecture in LAYER_ENCODERS.items():
        base = models.init_encoder(architecture, seed=0)
        x = normalise(test, base.preprocessing["mean"], base.preprocessing["std"])
        for bn in ("initialised", "recalibrated"):
            encoder = base
            if bn == "recalibrated":
                encoder = recalibrate_bn(base, [calib[i : i + 4] for i in range(0, len(calib), 4)])
            folded = fold_batch_norm(encoder)
            ref_desc, ref = forward(encoder.module, encoder.variables, x)
            ref_desc = np.asarray(ref_desc, np.float64)
            for variant, enc in (
                ("float32, BN folded", folded),
                ("bfloat16 (extraction path)", folded.with_dtype("bfloat16")),
            ):
                desc, stages = forward(enc.module, enc.variables, x)
                desc = np.asarray(desc, np.float64)
                cos = (desc * ref_desc).sum(1) / (
                    np.linalg.norm(desc, axis=1) * np.linalg.norm(ref_desc, axis=1)
                )
                errors = {
                    k: float(jnp.linalg.norm(stages[k] - ref[k]) / jnp.linalg.norm(ref[k]))
                    for k in ref
                }
                row = {"encoder": name, "bn": bn, "variant": variant, "errors": errors}
                row.update(cos_min=float(cos.min()), cos_mean=float(cos.mean()))
                row["shape"] = tuple(test.shape[1:3])
                rows.append(row)
                print(f"  layers {name} {bn} {variant}: cos min {row['cos_min']:.6f}", flush=True)
        jax.clear_caches()
    return rows


def layers_table(rows: list[dict]) -> str:
    lines = [
        f"Images: {rows[0]['shape'][0]}x{rows[0]['shape'][1]} crops of demo database images. "
        "Cosine of R-MAC (L=3) descriptors to float32 (min / mean), and relative L2 error "
        "`||x - f32|| / ||f32||` of each stage output (in order).",
        "",
        "| encoder | BN | variant | cos min | cos mean | relative error per stage |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        lines.append(
            f"| {r['encoder']} | {r['bn']} | {r['variant']} | {r['cos_min']:.6f} | "
            f"{r['cos_mean']:.6f} | {errs} |"
        )
    return "\n".join(lines)


def demo_accuracy(workdir: str, bn_modes: tuple[str, ...] = ("exact", "none")) -> list[dict]:
    """mAP (%) of every Table 1 column on the offline demo set (``configs/demo.py``): float32,
    bfloat16, and float32 on inputs with +-1 grey level of noise (two seeds; the size of
    perturbation the ranking must tolerate anyway), for each BN mode in ``bn_modes``."""
    from configs import demo
    from jretrieval import evaluation, experiment, ranking
    from jretrieval import extract as extract_lib
    from jretrieval.datasets import images as images_lib
    from jretrieval.steps import Loading

    config = demo.get_config()
    config.workdir = workdir
    config.data.root = os.path.join(workdir, "data")
    dataset = experiment.load_data(config)
    dims = experiment.parse_dims(config.whitening.dim)
    params = ranking.params_from_config(config)
    policy = images_lib.as_policy(dict(config.extraction.policy))
    parts = ((dataset.db_paths, None), (dataset.query_paths, dataset.query_bbx))
    rows = []
    for bn in bn_modes:
        config.bn.mode = bn
        encoder = experiment.load_encoder(config, "random_resnet50")
        encoder = experiment.recalibrate(config, "random_resnet50", encoder, dataset)
        variants = {
            "float32": (encoder, None),
            "bfloat16": (encoder.with_dtype("bfloat16"), None),
            "float32, input +-1 grey level (seed 0)": (encoder, _noisy_loader(0)),
            "float32, input +-1 grey level (seed 1)": (encoder, _noisy_loader(1)),
        }
        stage_errors = _stage_errors(encoder, dataset.db_paths[:4], policy)
        print(f"  demo bn={bn}: bfloat16 relative error per stage {stage_errors}", flush=True)
        base = None
        for name, (enc, loader) in variants.items():
            out = []
            for paths, bbx in parts:
                desc, report = extract_lib.extract(
                    enc,
                    paths,
                    bbx=bbx,
                    loading=Loading(policy, config.extraction.batch_size, loader=loader),
                    desc=f"demo {bn} {name}",
                )
                out.append((desc, np.asarray(report["kept"], np.int64)))
            desc = evaluation.Descriptors(out[0][0], out[1][0], out[0][1], out[1][1], {})
            table = evaluation.evaluate_row(
                [desc], dataset, dims=dims, columns=list(config.ranking.columns), params=params
            ).figures
            base = desc if base is None else base
            a, b = base.database.astype(np.float64), desc.database.astype(np.float64)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            maps = {col: vals["mAP"] for col, vals in table.items()}
            rows.append(
                {
                    "bn": bn,
                    "variant": name,
                    "cos_min": float(cos.min()),
                    "mAP": maps,
                    "stage_errors": stage_errors,
                }
            )
            print(f"  demo bn={bn} {name}: {maps}", flush=True)
    return rows


def demo_table(rows: list[dict]) -> str:
    columns = list(rows[0]["mAP"])
    lines = [
        "| BN | encoder | min cos to float32 (database R-MAC) | " + " | ".join(columns) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for r in rows:
        base = next(b for b in rows if b["bn"] == r["bn"] and b["variant"] == "float32")
        cells = []
        for c in columns:
            delta = r["mAP"][c] - base["mAP"][c]
            cells.append(f"{r['mAP'][c]:.2f}" + ("" if r is base else f" ({delta:+.2f})"))
        lines.append(f"| {r['bn']} | {r['variant']} | {r['cos_min']:.5f} | {' | '.join(cells)} |")
    lines += [
        "",
        "Relative L2 error `||bf16 - f32|| / ||f32||` of each stage output (4 database images):",
        "",
        "| BN | " + " | ".join(rows[0]["stage_errors"]) + " |",
        "| --- | " + " | ".join("---:" for _ in rows[0]["stage_errors"]) + " |",
    ]
    for bn in dict.fromkeys(r["bn"] for r in rows):
        errs = next(r["stage_errors"] for r in rows if r["bn"] == bn)
        lines.append(f"| {bn} | " + " | ".join(f"{v:.2e}" for v in errs.values()) + " |")
    return "\n".join(lines)


def demo_dtypes(dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[dict]:
    """The offline demo (``configs/demo.py``) run by ``experiment.run``, the runner of
    ``python -m jretrieval.main``, once per ``extraction.dtype``, each in a fresh temporary
    workdir (BN statistics, descriptor stores and report; only the built image set, an input, is
    shared). Returns per dtype its figures ``{"<column> <metric>": percent}``, its raw
    descriptors (database and queries, L2-normalised) and its wall time."""
    import tempfile

    from configs import demo
    from jretrieval import experiment, store

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        for dtype in dtypes:
            config = demo.get_config()
            config.workdir = os.path.join(tmp, dtype)
            config.data.root = os.path.join(tmp, "data")
            config.extraction.dtype = dtype
            start = time.perf_counter()
            results = experiment.run(config)
            seconds = time.perf_counter() - start
            (model,) = results["models"]
            figures = {
                f"{col} {metric}": vals[metric]
                for col, vals in results["models"][model].items()
                for metric in results["metrics"]
            }
            desc = np.concatenate(
                [store.read_store(path)[0] for path in results["stores"][model].values()]
            ).astype(np.float64)
            desc /= np.linalg.norm(desc, axis=1, keepdims=True)
            rows.append({"dtype": dtype, "figures": figures, "desc": desc, "seconds": seconds})
            print(f"  demo {dtype} ({seconds:.0f}s): {figures}", flush=True)
    return rows


def accuracy_table(rows: list[dict]) -> str:
    base, other = rows
    deltas = {k: other["figures"][k] - v for k, v in base["figures"].items()}
    worst = max(abs(d) for d in deltas.values())
    lines = [
        f"| figure (%) | {base['dtype']} | {other['dtype']} | difference (points) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, v in base["figures"].items():
        lines.append(f"| {k} | {v:.2f} | {other['figures'][k]:.2f} | {deltas[k]:+.2f} |")
    held = "holds" if worst <= ACCURACY_TARGET else "is NOT met"
    lines += [
        "",
        f"Worst |difference| {worst:.2f} points: the target (every figure within "
        f"{ACCURACY_TARGET} points of {base['dtype']}) {held}. Max |difference| of the "
        f"L2-normalised raw descriptors ({len(base['desc'])} database + query images): "
        f"{np.abs(other['desc'] - base['desc']).max():.2e}. Wall time per run: "
        + ", ".join(f"{r['dtype']} {r['seconds']:.0f} s" for r in rows)
        + ".",
    ]
    return "\n".join(lines)


#: XLA op kinds of the bfloat16 step, by the prefix of their HLO names, for ``profile``.
OP_KINDS = (
    ("ffi_call", "native convolutions: conv_bf16 with bias, shortcut, ReLU"),
    ("ynn_fusion", "dots: YNNPACK's bfloat16 GEMM (im2col path)"),
    ("concatenate", "im2col: the views side by side"),
    ("pad_slice", "im2col: padding and the views"),
    ("and_pad", "stem max pool: sign bits cleared, padded"),
    ("maximum_bitcast", "stem max pool: rows, then columns"),
    ("bitcast-convert", "im2col: bit patterns read as bfloat16"),
    ("maximum_convert", "epilogues: bias, ReLU, rounding to bfloat16"),
    ("reduce-window", "max pool (nn.max_pool)"),
    ("pad_convert", "input: normalise, round to bfloat16"),
)


def profile_ops(batch: int, size: int, rounds: int = 2) -> list[dict]:
    """Where the bfloat16 step's time goes: XLA op time per image by kind (``jax.profiler``
    trace of ``rounds`` calls, ops named by their HLO op), beside PyTorch's whole bfloat16
    channels_last forward (median of ``rounds + 1`` calls, same batch) in the same process.
    Ops of one call may overlap on the 2 cores, so kinds can sum to more than the wall time."""
    import collections
    import glob
    import gzip
    import re
    import tempfile

    import jax

    from bench import harness

    x = images(batch, size)
    step = jretrieval_step(JRETRIEVAL[2], x)
    torch_fwd = torch_step("bfloat16", "channels_last", batch, size, cores())
    for fn in (step, step, torch_fwd, torch_fwd):  # compile, oneDNN primitives
        fn(x)
    torch_ms = statistics.median(harness.call_ms(lambda: torch_fwd(x))[0] for _ in range(3))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(rounds):
            step(x)
        wall_ms = (time.perf_counter() - start) * 1e3 / rounds
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
            per_op[re.sub(r"[.\d]+$", "", e["args"]["hlo_op"])] += e["dur"] / 1e3
    scale = 1.0 / (rounds * batch)
    rows = [{"op": op, "what": op_kind(op), "ms": ms * scale} for op, ms in per_op.most_common()]
    rows.append({"op": "", "what": "jretrieval bfloat16 step, wall", "ms": wall_ms / batch})
    rows.append({"op": "", "what": "PyTorch bfloat16 forward, wall", "ms": torch_ms / batch})
    return [{**row, "batch": batch} for row in rows]


def op_kind(op: str) -> str:
    """What an XLA op of the bfloat16 step does (``OP_KINDS``), or ``""``."""
    return next((what for prefix, what in OP_KINDS if prefix in op), "")


def profile_table(rows: list[dict]) -> str:
    lines = [
        "| batch | XLA op (HLO name) | what it is | ms per image |",
        "| ---: | --- | --- | ---: |",
    ]
    for r in rows:
        if r["ms"] >= 0.5 or not r["op"]:
            lines.append(
                f"| {r['batch']} | {r['op'] or '**wall**'} | {r['what']} | {r['ms']:.1f} |"
            )
    return "\n".join(lines)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds ``ratio_fp32`` (images/s over the fastest PyTorch float32 row, any layout or thread
    count) and ``ratio_bf16`` (over PyTorch bfloat16 channels_last) at the same batch size."""
    for row in rows:
        same = [r for r in rows if r["framework"] == "pytorch" and r["batch"] == row["batch"]]
        fp32 = max(r["images_per_s"] for r in same if r["dtype"] == "float32")
        bf16 = [r["images_per_s"] for r in same if r["dtype"] == "bfloat16"]
        row["ratio_fp32"] = row["images_per_s"] / fp32
        row["ratio_bf16"] = row["images_per_s"] / bf16[0] if bf16 else float("nan")
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| framework | dtype | variant | batch | images/s (median) | images/s (best) "
        "| vs PyTorch fp32 (best) | vs PyTorch bf16 channels_last | load (1 min) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['framework']} | {r['dtype']} | {r['variant']} | {r['batch']} | "
            f"{r['images_per_s']:.3f} | {r['best_images_per_s']:.3f} | {r['ratio_fp32']:.2f}x | "
            f"{r['ratio_bf16']:.2f}x | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def markers(name: str) -> tuple[str, str]:
    """The comment lines around the generated section ``name`` of the results file."""
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def write_doc(path: str, sections: dict[str, str]) -> None:
    """Replaces each ``{name: text}`` between ``markers(name)`` in ``path``; the hand-written
    notes around them and sections not run this time stay. A section without markers yet is
    appended. Written to a temp name, then renamed."""
    doc = "# Encoder throughput and bfloat16: jretrieval vs PyTorch (`bench/extract.py`)\n"
    if os.path.exists(path):
        with open(path) as f:
            doc = f.read()
    for name, text in sections.items():
        start, end = markers(name)
        body = f"{start}\n{text}{end}"
        if start in doc and end in doc:
            head, rest = doc.split(start, 1)
            doc = head + body + rest.split(end, 1)[1]
        else:
            doc = f"{doc.rstrip()}\n\n{body}\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
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
        "--parts",
        default="main",
        help="comma-separated: main (the comparison), variants (the candidates), profile (the "
        "bfloat16 step's XLA ops), layers (bfloat16 error per layer), demo (mAP), accuracy "
        "(bfloat16 vs float32 through the runner)",
    )
    parser.add_argument("--demo-workdir", default="runs/bench_extract")
    parser.add_argument("--out", default=DOC, help="results file (markdown); '' to skip")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    known = ("main", "variants", "profile", "layers", "demo", "accuracy")
    if not parts <= set(known):
        raise ValueError(f"--parts={args.parts!r}; expected a subset of {','.join(known)}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    import torch

    torch.set_num_threads(cores())  # XLA CPU uses every core too
    env = environment()
    sections = []
    if "main" in parts:
        load_before = os.getloadavg()
        rows = measure(batch_sizes, args.size, args.repeats)
        sections.append(("main", rows, load_before, os.getloadavg()))
        print(table(rows))
    if "variants" in parts:
        load_before = os.getloadavg()
        rows = measure(batch_sizes, args.size, args.repeats, VARIANTS)
        sections.append(("variants", rows, load_before, os.getloadavg()))
        print(table(rows))
    if "profile" in parts:
        load_before = os.getloadavg()
        rows = [row for batch in batch_sizes for row in profile_ops(batch, args.size)]
        sections.append(("profile", rows, load_before, os.getloadavg()))
        print(profile_table(rows))
    if "layers" in parts:
        load_before = os.getloadavg()
        rows = layer_errors(args.demo_workdir)
        sections.append(("layers", rows, load_before, os.getloadavg()))
        print(layers_table(rows))
    if "demo" in parts:
        load_before = os.getloadavg()
        rows = demo_accuracy(args.demo_workdir)
        sections.append(("demo", rows, load_before, os.getloadavg()))
        print(demo_table(rows))
    if "accuracy" in parts:
        load_before = os.getloadavg()
        rows = demo_dtypes()
        sections.append(("accuracy", rows, load_before, os.getloadavg()))
        print(accuracy_table(rows))
    print(json.dumps(env))
    if args.out:
        write_doc(args.out, render(env, sections, args))


def render(env: dict, sections: list[tuple], args: argparse.Namespace) -> dict[str, str]:
    """``{section name: generated markdown}`` for ``docs/bench_extract.md``."""
    loads = lambda v: " / ".join(f"{x:.2f}" for x in v)
    titles = {
        "main": ("jretrieval vs PyTorch", table),
        "variants": ("the bfloat16 step before and after each change (`VARIANTS`)", table),
        "profile": ("the bfloat16 step's XLA ops beside PyTorch's forward", profile_table),
        "layers": ("bfloat16 vs float32 per layer, three encoders", layers_table),
        "demo": ("mAP (%) on the demo set, float32 vs bfloat16", demo_table),
        "accuracy": (
            "`--config.extraction.dtype=bfloat16` on the demo set, end to end",
            accuracy_table,
        ),
    }
    out = {}
    for name, rows, before, after in sections:
        title, fmt = titles[name]
        out[name] = "\n".join(
            [
                f"**{title}**: `python -m bench.extract --parts={name}"
                + (
                    f" --batch-sizes={args.batch_sizes} --size={args.size} --repeats={args.repeats}"
                    if name in ("main", "variants")
                    else f" --batch-sizes={args.batch_sizes} --size={args.size}"
                    if name == "profile"
                    else ""
                )
                + "`, "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {env['cpu']}, "
                f"{env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads), "
                f"jax {env['jax']}, XLA_FLAGS=`{env['XLA_FLAGS'] or '(none)'}`; load average "
                f"(1/5/15 min) before {loads(before)}, after {loads(after)}.",
                "",
                fmt(rows),
                "",
            ]
        )
    return out


if __name__ == "__main__":
    main()
