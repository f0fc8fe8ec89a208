"""weight_conversion end to end: PyTorch file in each published layout -> CLI -> models.load ->
the Flax map equals the PyTorch map.

Shape convention: torch inputs NCHW, Flax inputs NHWC; maps compared in NHWC.

References are the random PyTorch modules of ``references.torch_resnet`` run in float64, so the
measured error is the Flax float32 error alone. Tolerance: max |flax - torch| / max |torch| below
1e-4 (the project's tolerance for a whole network). Inference mode is checked on 33 px (odd: every
stride-2 op sees an odd size) and 32 px (even: every stride-2 op sees an even size, where 'SAME'
padding would differ) inputs. Training mode (batch statistics) is checked on 8 x 65 px: with
fewer values per BN channel a random float32 ResNet-50 in train mode is itself ill-conditioned
(torch float32 vs float64 differs by 1.5e-4 at 2 x 33 px, 5e-5 here).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest
import torch

from jretrieval import models
from references import torch_resnet as tr
from weight_conversion.__main__ import main
from weight_conversion.checkpoint import PCAStub, RestrictedUnpickler
from weight_conversion.detect import detect

TOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


INPUTS = {"odd": _input((2, 3, 33, 33), 1), "even": _input((2, 3, 32, 32), 2)}
X_TRAIN = _input((8, 3, 65, 65), 3)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


@functools.partial(jax.jit, static_argnames="module")
def train_map(module, variables, x):
    """The map with batch statistics (``train=True``), as BN recalibration runs it."""
    (fmap, _), _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return fmap


def references(model: torch.nn.Module, sizes=("odd", "even"), train: bool = True) -> dict:
    """float64 torch maps (and AP-GeM descriptors) for the shared inputs."""
    m64 = copy.deepcopy(model).double().eval()
    out = {}
    with torch.no_grad():
        for name in sizes:
            y = m64(INPUTS[name].double())
            if isinstance(y, tuple):
                y, out[f"{name}/descriptor"] = y[0], y[1].numpy()
            out[name] = tr.to_nhwc(y)
        if train:
            y = m64.train()(X_TRAIN.double())
            out["train"] = tr.to_nhwc(y[0] if isinstance(y, tuple) else y)
    return out


def convert(src: str, out: str, *extra: str) -> None:
    assert main(["--src", src, "--out", out, *extra]) == 0
    assert os.path.isfile(out)


def check_maps(enc: models.Encoder, refs: dict) -> None:
    for name in ("odd", "even"):
        if name in refs:
            err = rel_err(np.asarray(enc.feature_map(nhwc(INPUTS[name]))), refs[name])
            assert err < TOL, (name, err)
    if "train" in refs:
        err = rel_err(
            np.asarray(train_map(enc.module, enc.variables, nhwc(X_TRAIN))), refs["train"]
        )
        assert err < TOL, ("train", err)


@pytest.fixture(scope="module")
def r50():
    """A random torchvision-layout ResNet-50 and its float64 reference maps."""
    model = tr.torch_resnet(50, seed=0)
    return model, references(model)


def _simclr_file(model, path):
    s = tr.ResNet(50, simclr_order=True)
    s.load_state_dict(model.state_dict())
    keys = list(s.state_dict())
    assert keys.index("layer1.0.downsample.0.weight") < keys.index("layer1.0.conv1.weight")
    tr.save_simclr(s, path)


LAYOUTS = {
    "torchvision": (tr.save_torchvision, "torchvision"),
    "simclr": (_simclr_file, "simclr"),
    "moco_v1_training": (functools.partial(tr.save_moco, version=1, layout="training"), "moco"),
    "moco_v2_training": (functools.partial(tr.save_moco, version=2, layout="training"), "moco"),
    "moco_v2_released": (functools.partial(tr.save_moco, version=2, layout="released"), "moco"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resnet50_layouts(layout, r50, tmp_path):
    model, refs = r50
    save, fmt = LAYOUTS[layout]
    src, out = str(tmp_path / f"{layout}.pth"), str(tmp_path / f"{layout}.h5")
    save(model, src)
    convert(src, out)
    enc = models.load(out)
    assert enc.architecture == {"name": "resnet", "depth": 50, "width": 1}
    assert enc.metadata["format"] == fmt
    expected = models.IDENTITY if fmt == "simclr" else models.IMAGENET
    assert enc.preprocessing == expected
    # Exactly the backbone tensors main_lincls.py keeps: 53 convs + 53 BN x 4.
    assert len(jax.tree.leaves(enc.variables)) == 265
    check_maps(enc, refs)
    with h5py.File(out, "r") as f:
        assert f.attrs["source"] == os.path.basename(src)
        with open(src, "rb") as g:
            assert f.attrs["sha256"] == hashlib.sha256(g.read()).hexdigest()
        assert json.loads(f.attrs["architecture"]) == enc.architecture
        assert (f.attrs["depth"], f.attrs["width"]) == (50, 1)


def test_simclr_2x_shapes_key_order_and_map(tmp_path):
    model = tr.torch_resnet(50, width=2, simclr_order=True, seed=4)
    assert tuple(model.state_dict()["conv1.weight"].shape) == (128, 3, 7, 7)
    src, out = str(tmp_path / "r50_2x.pth"), str(tmp_path / "r50_2x.h5")
    tr.save_simclr(model, src)
    convert(src, out, "--format", "simclr")
    enc = models.load(out)
    assert enc.architecture == {"name": "resnet", "depth": 50, "width": 2}
    params = enc.variables["params"]
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 128)
    assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 512, 1024)
    assert params["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 1024, 4096)
    np.testing.assert_array_equal(
        params["layer1_0"]["conv2"]["kernel"],
        model.layer1[0].conv2.weight.detach().permute(2, 3, 1, 0).numpy(),
    )
    check_maps(enc, references(model, sizes=("odd",), train=False))


def test_resnet101_torchvision(tmp_path):
    model = tr.torch_resnet(101, seed=5)
    src, out = str(tmp_path / "r101.pth"), str(tmp_path / "r101.h5")
    tr.save_torchvision(model, src)
    convert(src, out)
    enc = models.load(out)
    assert enc.architecture == {"name": "resnet", "depth": 101, "width": 1}
    check_maps(enc, references(model, sizes=("odd",), train=False))


def test_apgem(tmp_path):
    """dirtorch layout (naver/deep-image-retrieval) with a pickled sklearn PCA; ResNet-50 trunk."""
    model = tr.torch_apgem(50, p=3.3, seed=6)
    pca = tr.pca_arrays(2048, 64, seed=6)
    src, out = str(tmp_path / "Resnet-50-AP-GeM.pt"), str(tmp_path / "apgem.h5")
    tr.save_apgem(model, src, pca)
    with pytest.raises(pickle.UnpicklingError, match="sklearn"):
        torch.load(src, weights_only=True)
    convert(src, out)
    enc = models.load(out)
    assert enc.metadata["format"] == "apgem"
    assert enc.architecture == {
        "name": "apgem",
        "depth": 50,
        "width": 1,
        "out_dim": 2048,
        "pca_dim": 64,
        "pca_whiten": True,
    }
    np.testing.assert_allclose(enc.variables["params"]["adpool"]["p"], [3.3], rtol=1e-6)
    refs = references(model)
    check_maps(enc, refs)
    x = nhwc(INPUTS["odd"])
    desc = refs["odd/descriptor"]
    assert rel_err(np.asarray(enc.global_descriptor(x)), desc) < TOL
    # dirtorch test_dir.py: (x - mean_) @ components_.T / explained_variance_ ** 0.25, then L2.
    white = (desc - pca["mean_"]) @ pca["components_"].T / pca["explained_variance_"] ** 0.25
    white /= np.linalg.norm(white, axis=1, keepdims=True)
    assert rel_err(np.asarray(enc.global_descriptor(x, pca_power=0.25)), white) < TOL


def test_subprocess_cli(r50, tmp_path):
    model, refs = r50
    src, out = str(tmp_path / "resnet50-0676ba61.pth"), str(tmp_path / "r50.h5")
    tr.save_torchvision(model, src)
    run = subprocess.run(
        [sys.executable, "-m", "weight_conversion", "--src", src, "--out", out],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    enc = models.load(out)
    assert rel_err(np.asarray(enc.feature_map(nhwc(INPUTS["odd"]))), refs["odd"]) < TOL


# ---------------------------------------------------------------------------- refusals


def refused(tmp_path, capsys, src: str, *extra: str) -> str:
    """Runs the CLI expecting a refusal; returns stderr; checks that nothing was written."""
    out = tmp_path / "out" / "model.h5"
    out.parent.mkdir(exist_ok=True)
    assert main(["--src", src, "--out", str(out), *extra]) == 1
    assert os.listdir(out.parent) == []
    return capsys.readouterr().err


def _resnet18_like() -> dict[str, torch.Tensor]:
    """BasicBlock keys (two 3x3 convs per block, two blocks per stage)."""
    sd = {"conv1.weight": torch.randn(64, 3, 7, 7)}
    bn = lambda p, n: {
        f"{p}.{k}": torch.rand(n) for k in ("weight", "bias", "running_mean", "running_var")
    }  # noqa: E501
    sd.update(bn("bn1", 64))
    cin = 64
    for i, c in enumerate((64, 128, 256, 512), 1):
        for j in range(2):
            sd[f"layer{i}.{j}.conv1.weight"] = torch.randn(c, cin, 3, 3)
            sd.update(bn(f"layer{i}.{j}.bn1", c))
            sd[f"layer{i}.{j}.conv2.weight"] = torch.randn(c, c, 3, 3)
            sd.update(bn(f"layer{i}.{j}.bn2", c))
            cin = c
    return sd


def test_refuses_wrong_architecture(r50, tmp_path, capsys):
    src = str(tmp_path / "resnet18.pth")
    torch.save(_resnet18_like(), src)
    err = refused(tmp_path, capsys, src)
    assert "not a supported bottleneck ResNet" in err and "(2, 2, 2, 2)" in err

    model, _ = r50
    fpn = str(tmp_path / "fpn.pt")
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "model_options": {"arch": "resnet101_fpn_rmac"}}, fpn)
    assert "resnet101_fpn_rmac" in refused(tmp_path, capsys, fpn)

    tv = str(tmp_path / "tv.pth")
    tr.save_torchvision(model, tv)
    assert "no key starts with" in refused(tmp_path, capsys, tv, "--format", "moco")


def test_refuses_missing_extra_misshaped_keys(r50, tmp_path, capsys):
    sd = dict(r50[0].state_dict())
    del sd["layer2.1.bn2.running_var"]
    sd["layer4.0.extra.weight"] = torch.zeros(3)
    sd["layer3.0.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    src = str(tmp_path / "bad.pth")
    torch.save(sd, src)
    err = refused(tmp_path, capsys, src)
    assert "batch_stats/layer2_1/bn2/var" in err
    assert "layer4.0.extra.weight" in err
    assert "params/layer3_0/conv2/kernel: got (1, 1, 256, 256), expected (3, 3, 256, 256)" in err


def test_refuses_truncated_file(r50, tmp_path, capsys):
    src = tmp_path / "full.pth"
    tr.save_torchvision(r50[0], src)
    data = src.read_bytes()
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(data[: len(data) // 2])
    err = refused(tmp_path, capsys, str(cut))
    assert "truncated.pth" in err and "cannot read checkpoint" in err


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["pickle", "torch_zip"])
def test_refuses_code_in_pickle(container, tmp_path, capsys):
    marker = tmp_path / "executed"
    src = tmp_path / "evil.pth"
    payload = {"state_dict": {"conv1.weight": _Evil(str(marker))}}
    if container == "pickle":
        src.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, src)
    err = refused(tmp_path, capsys, str(src))
    assert "refused global" in err and "system" in err
    assert not marker.exists()


def test_refuses_missing_file_and_bad_format(tmp_path, capsys):
    assert "does not exist" in refused(tmp_path, capsys, str(tmp_path / "nope.pth"))
    src = str(tmp_path / "other.pth")
    torch.save({"weights": torch.zeros(3)}, src)
    assert "cannot detect the checkpoint format" in refused(tmp_path, capsys, src)


# ---------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "obj, fmt",
    [
        ({"conv1.weight": 0, "layer1.0.conv1.weight": 0}, "torchvision"),
        ({"state_dict": {"conv1.weight": 0}}, "simclr"),
        ({"state_dict": {"module.encoder_q.conv1.weight": 0, "module.queue": 0}}, "moco"),
        ({"state_dict": {"encoder_q.conv1.weight": 0}}, "moco"),
        ({"state_dict": {"module.conv1.weight": 0}, "model_options": {}}, "apgem"),
        ({"state_dict": {"module.adpool.p": 0}}, "apgem"),
        ({"model": {"encoder.module.layer_list.0.conv.weight": 0}, "hyperparams": {}}, "amdim"),
    ],
)
def test_detect(obj, fmt):
    assert detect(obj) == fmt


def test_restricted_unpickler_reads_sklearn_pca_as_data():
    """Both sklearn module paths become an inert PCAStub holding NumPy arrays."""
    for module in ("sklearn.decomposition.pca", "sklearn.decomposition._pca"):
        data = pickle.dumps({"p": _FakePCA(module)}, protocol=2).replace(
            b"tests.test_convert\n_FakePCA", module.encode() + b"\nPCA"
        )
        obj = RestrictedUnpickler(io.BytesIO(data)).load()["p"]
        assert isinstance(obj, PCAStub)
        np.testing.assert_array_equal(obj.mean_, np.arange(3.0))
        assert obj.whiten is True and obj.n_components_ == 2
    with pytest.raises(pickle.UnpicklingError, match="refused global .*eval"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(eval, protocol=2))).load()


class _FakePCA:
    def __init__(self, module: str):
        self.mean_ = np.arange(3.0)
        self.whiten = True
        self.n_components_ = np.int64(2)


# ---------------------------------------------------------------------------- bin/ scripts


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_download_script_help_and_dry_run(tmp_path):
    run = _sh("bin/download_checkpoints.sh", "-h")
    assert run.returncode == 0 and "tonylins/simclr-converter" in run.stdout
    target = tmp_path / "ckpt"
    run = _sh("bin/download_checkpoints.sh", "--dry-run", "--dir", str(target))
    assert run.returncode == 0, run.stderr
    assert (
        f"would run: curl -fL --retry 3 -C - -o {target}/resnet50-0676ba61.pth.part" in run.stdout
    )
    assert "moco_v2_200ep_pretrain.pth.tar" in run.stdout and "Resnet-101-AP-GeM" in run.stdout
    assert not target.exists()
    # Idempotent: an existing file is skipped, a corrupt one (checksum prefix) is reported.
    target.mkdir()
    (target / "amdim_ndf256_rkhs2048_rd10.pth").write_bytes(b"x")
    run = _sh("bin/download_checkpoints.sh", "--dry-run", "--dir", str(target), "--only", "amdim")
    assert run.returncode == 0 and "skip amdim" in run.stdout
    (target / "moco_v1_200ep_pretrain.pth.tar").write_bytes(b"x")
    run = _sh("bin/download_checkpoints.sh", "--dir", str(target), "--only", "mocov1")
    assert run.returncode == 1 and "does not start with b251726a" in run.stderr
    assert _sh("bin/download_checkpoints.sh", "--only", "nope").returncode == 2


def test_convert_script(r50, tmp_path):
    run = _sh("bin/convert_checkpoints.sh", "-h")
    assert run.returncode == 0 and "baseline.h5" in run.stdout
    src, out = tmp_path / "ckpt", tmp_path / "converted"
    src.mkdir()
    tr.save_torchvision(r50[0], src / "resnet50-0676ba61.pth")
    args = ("bin/convert_checkpoints.sh", "--dir", str(src), "--out", str(out))
    run = _sh(*args, "--dry-run")
    assert run.returncode == 0, run.stderr
    assert (
        f"would run: python -m weight_conversion --src {src}/resnet50-0676ba61.pth "
        f"--out {out}/baseline.h5 --format torchvision"
    ) in run.stdout
    assert f"missing {src}/resnet50-4x.pth" in run.stdout and not out.exists()
    run = _sh(*args)
    assert run.returncode == 0, run.stderr
    assert models.load(out / "baseline.h5").metadata["format"] == "torchvision"
    run = _sh(*args)
    assert run.returncode == 0 and f"up to date: {out}/baseline.h5" in run.stdout


# ---------------------------------------------------------------------------- issue 9 item 9


@pytest.fixture(scope="module")
def r50_state():
    """A random torchvision ResNet-50 state dict (no reference maps needed here)."""
    return tr.torch_resnet(50, seed=3).state_dict()


def test_refuses_out_equal_to_src(r50_state, tmp_path, capsys):
    """Today: exit 0, and the checkpoint is replaced by the HDF5 file."""
    src = tmp_path / "resnet50.pth"
    torch.save(r50_state, src)
    before = src.read_bytes()
    link = tmp_path / "link.pth"
    link.symlink_to(src)
    for out in (src, tmp_path / "." / "resnet50.pth", link):
        assert main(["--src", str(src), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "is the checkpoint --src" in err and "overwrite" in err
    assert src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["link.pth", "resnet50.pth"]


def test_refuses_out_that_is_a_directory(r50_state, tmp_path, capsys):
    """Today: a traceback (IsADirectoryError from os.replace)."""
    src = tmp_path / "resnet50.pth"
    torch.save(r50_state, src)
    folder = tmp_path / "converted"
    folder.mkdir()
    assert main(["--src", str(src), "--out", str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"--out {str(folder)!r} is a directory" in err and "model.h5" in err
    assert os.listdir(folder) == []


def test_refuses_nonfinite_weights_unless_allowed(r50_state, tmp_path, capsys):
    """Today: exit 0; the run later ranks with NaN descriptors and blames nothing."""
    state = {k: v.clone() for k, v in r50_state.items()}
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["layer2.1.bn2.running_var"][:3] = float("inf")
    src = tmp_path / "diverged.pth"
    torch.save(state, src)
    err = refused(tmp_path, capsys, str(src))
    assert "diverged.pth: 2 variables hold NaN or infinite values" in err
    assert "params/layer1_0/conv1/kernel (1 of 4096 values)" in err
    assert "batch_stats/layer2_1/bn2/var (3 of 128 values)" in err
    assert "--allow-nonfinite" in err
    out = tmp_path / "allowed.h5"
    old = os.umask(0o022)
    try:
        assert main(["--src", str(src), "--out", str(out), "--allow-nonfinite"]) == 0
    finally:
        os.umask(old)
    kernel = np.asarray(models.load(out).variables["params"]["layer1_0"]["conv1"]["kernel"])
    assert np.isnan(kernel).sum() == 1
    assert os.stat(out).st_mode & 0o777 == 0o644  # the user's umask, not mkstemp's 0600
