"""The download scripts and bin/paper_tables.sh, without the network.

The download script runs against a fake ``curl`` put first on ``PATH`` (it logs its arguments
and writes small files and tar.gz archives shaped like the real ones), so the whole flow runs:
arguments, what is fetched from where, resuming ``.part`` files, extraction and flattening,
idempotence. ``paper_tables.sh`` runs against a fake ``PYTHON`` that logs its arguments. The
checkpoint script's ``gdown`` command line goes through the installed ``gdown``'s own parser
(its download function replaced by one that writes a small zip).
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import tarfile
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOWNLOAD = os.path.join(REPO, "bin", "download_datasets.sh")
CHECKPOINTS = os.path.join(REPO, "bin", "download_checkpoints.sh")
TABLES = os.path.join(REPO, "bin", "paper_tables.sh")

VGG = "https://www.robots.ox.ac.uk/~vgg/data"
URLS = {
    "oxford5k": [
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/oxford5k/gnd_oxford5k.pkl",
        f"{VGG}/oxbuildings/oxbuild_images-v1.tgz",
    ],
    "paris6k": [
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/paris6k/gnd_paris6k.pkl",
        f"{VGG}/parisbuildings/paris_1-v1.tgz",
        f"{VGG}/parisbuildings/paris_2-v1.tgz",
    ],
    "roxford5k": ["http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl"],
    "rparis6k": ["http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl"],
    "instre": [
        "ftp://ftp.irisa.fr/local/texmex/corpus/diffusion/gnd/gnd_instre.mat",
        "ftp://ftp.irisa.fr/local/texmex/corpus/instre/instre.tar.gz",
    ],
}

FAKE_CURL = r"""#!/usr/bin/env python3
import io, os, sys, tarfile
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(args) + "\n")
out, url = args[args.index("-o") + 1], args[-1]
if os.environ.get("FAKE_FAIL", "\0") in url:
    sys.exit(22)
if url.endswith((".tgz", ".tar.gz")):
    base = os.path.basename(url).split(".")[0]
    with tarfile.open(out, "w:gz") as tar:  # nested folders, like the real archives
        for i in range(2):
            data = f"{url}#{i}".encode()
            info = tarfile.TarInfo(f"top/{base}/img_{base}_{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
else:
    with open(out, "ab") as f:
        f.write(b"content of " + url.encode())
"""

FAKE_PYTHON = r"""#!/usr/bin/env python3
import os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
config = next(a for a in sys.argv if a.startswith("--config="))
if os.environ.get("FAKE_FAIL", "\0") in config:
    sys.exit(3)
out = next(a for a in sys.argv if a.startswith("--config.output.dir=")).split("=", 1)[1]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "results.json"), "w").write("{}")
"""


#: ``gdown`` as installed, parsing its real command line; only the network call is replaced.
FAKE_GDOWN = f"""#!{sys.executable}
import importlib, json, os, sys, zipfile
try:
    cli = importlib.import_module("gdown.cli")  # gdown < 5
except ImportError:
    cli = importlib.import_module("gdown.__main__")
def download(url=None, output=None, id=None, **kwargs):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({{"url": url, "id": id, "output": output}}) + "\\n")
    with zipfile.ZipFile(output, "w") as z:
        z.writestr("Resnet-101-AP-GeM/Resnet-101-AP-GeM.pt", b"weights")
    return output
cli.download = download
sys.argv[0] = "gdown"
cli.main()
"""


def _executable(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


@pytest.fixture
def fake(tmp_path):
    """A PATH whose curl is the fake, and the log file it appends its arguments to."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    _executable(bin_dir / "curl", FAKE_CURL)
    _executable(bin_dir / "python-fake", FAKE_PYTHON)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log))
    return env, log, bin_dir


def run(script, *args, env=None, cwd=None):
    return subprocess.run(
        ["bash", script, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def calls(log):
    return log.read_text().splitlines() if log.exists() else []


def test_download_arguments():
    done = run(DOWNLOAD, "-h")
    assert done.returncode == 0 and done.stdout.startswith("Usage: bin/download_datasets.sh")
    assert "--dry-run" in done.stdout and "revisitop1m" in done.stdout
    done = run(DOWNLOAD, "--frobnicate")
    assert done.returncode == 2 and "unknown option '--frobnicate'" in done.stderr
    done = run(DOWNLOAD, "--dry-run", "oxford6k")
    assert done.returncode == 2 and "unknown dataset 'oxford6k'" in done.stderr
    assert run(DOWNLOAD, "--dir").returncode == 2


def test_download_dry_run_lists_the_published_files(tmp_path):
    data = tmp_path / "data"
    done = run(DOWNLOAD, "--dry-run", "--dir", data)
    assert done.returncode == 0, done.stderr
    fetched = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("fetch ")]
    expected = [u for name in URLS for u in URLS[name]]  # default: the paper's five datasets
    assert sorted(fetched) == sorted(expected)  # the shared Oxford/Paris archives only once
    assert f"fetch {URLS['oxford5k'][0]} -> {data}/oxford5k/gnd_oxford5k.pkl" in done.stdout
    assert f"extract {data}/.downloads/paris_2-v1.tgz -> {data}/paris6k/jpg" in done.stdout
    assert f"extract {data}/.downloads/instre.tar.gz -> {data}/instre" in done.stdout
    assert "revisitop1m" not in done.stdout
    assert not data.exists()  # a dry run creates nothing

    r1m = run(DOWNLOAD, "--dry-run", "--dir", data, "revisitop1m").stdout
    archives = [line for line in r1m.splitlines() if line.startswith("fetch ") and "tar.gz" in line]
    assert len(archives) == 100
    assert "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.100.tar.gz" in r1m
    assert "http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt" in r1m
    everything = run(DOWNLOAD, "--dry-run", "--dir", data, "all").stdout
    assert everything.count("fetch ") == len(expected) + 101


def test_download_dry_run_skips_what_is_there(tmp_path):
    data = tmp_path / "data"
    (data / "oxford5k").mkdir(parents=True)
    (data / "oxford5k" / "gnd_oxford5k.pkl").write_bytes(b"x")
    (data / "oxford5k" / ".extracted-oxbuild_images-v1.tgz").touch()
    (data / "paris6k").mkdir()
    (data / "paris6k" / "gnd_paris6k.pkl.part").write_bytes(b"half")
    out = run(DOWNLOAD, "--dry-run", "--dir", data, "oxford5k", "paris6k").stdout
    assert f"skip {data}/oxford5k/gnd_oxford5k.pkl (exists)" in out
    assert f"skip {URLS['oxford5k'][1]} (already extracted into {data}/oxford5k/jpg)" in out
    assert f"(resuming {data}/paris6k/gnd_paris6k.pkl.part)" in out
    assert "fetch " + URLS["oxford5k"][0] not in out


def test_download_fetches_extracts_flattens_and_is_idempotent(tmp_path, fake):
    env, log, _ = fake
    data = tmp_path / "data"
    done = run(DOWNLOAD, "--dir", data, "oxford5k", "roxford5k", env=env)
    assert done.returncode == 0, done.stderr
    urls = [line.split()[-1] for line in calls(log)]
    assert sorted(urls) == sorted(URLS["oxford5k"] + URLS["roxford5k"])  # archive once
    assert all("-C -" in line and "-fL" in line.split() for line in calls(log))
    gnd = data / "roxford5k" / "gnd_roxford5k.pkl"
    assert gnd.read_bytes() == b"content of " + URLS["roxford5k"][0].encode()
    jpg = data / "oxford5k" / "jpg"
    assert sorted(os.listdir(jpg)) == [f"img_oxbuild_images-v1_{i}.jpg" for i in range(2)]
    assert (data / "oxford5k" / ".extracted-oxbuild_images-v1.tgz").exists()
    assert os.listdir(data / ".downloads") == []  # archive removed after extraction
    assert not any(name.endswith(".part") for _, _, names in os.walk(data) for name in names)

    again = run(DOWNLOAD, "--dir", data, "oxford5k", "roxford5k", env=env)
    assert again.returncode == 0 and len(calls(log)) == 3  # nothing fetched again
    assert again.stdout.count("skip ") == 3


def test_download_resumes_a_partial_file(tmp_path, fake):
    env, log, _ = fake
    data = tmp_path / "data"
    (data / "rparis6k").mkdir(parents=True)
    part = data / "rparis6k" / "gnd_rparis6k.pkl.part"
    part.write_bytes(b"partial|")
    (data / "paris6k").mkdir()
    for n in (1, 2):
        (data / "paris6k" / f".extracted-paris_{n}-v1.tgz").touch()
    done = run(DOWNLOAD, "--dir", data, "rparis6k", env=env)
    assert done.returncode == 0, done.stderr
    [line] = calls(log)  # only the ground truth: the images are marked extracted
    assert "-C -" in line and line.endswith(URLS["rparis6k"][0])
    final = data / "rparis6k" / "gnd_rparis6k.pkl"
    assert final.read_bytes().startswith(b"partial|content of ") and not part.exists()


def test_download_failure_leaves_no_complete_looking_file(tmp_path, fake):
    env, log, _ = fake
    data = tmp_path / "data"
    env = dict(env, FAKE_FAIL="paris_2")
    done = run(DOWNLOAD, "--dir", data, "--keep-archives", "paris6k", env=env)
    assert done.returncode != 0
    assert (data / "paris6k" / ".extracted-paris_1-v1.tgz").exists()
    assert not (data / "paris6k" / ".extracted-paris_2-v1.tgz").exists()
    assert not (data / ".downloads" / "paris_2-v1.tgz").exists()
    with tarfile.open(data / ".downloads" / "paris_1-v1.tgz") as tar:  # kept, complete
        assert len(tar.getnames()) == 2
    # the next run fetches only what is missing
    env.pop("FAKE_FAIL")
    n = len(calls(log))
    assert run(DOWNLOAD, "--dir", data, "paris6k", env=env).returncode == 0
    assert [line.split()[-1] for line in calls(log)[n:]] == [URLS["paris6k"][2]]
    assert len(os.listdir(data / "paris6k" / "jpg")) == 4


def test_paper_tables_arguments_and_dry_run(tmp_path):
    done = run(TABLES, "-h")
    assert done.returncode == 0 and "Table 3" in done.stdout
    assert run(TABLES, "--tables", "4", "--dry-run").returncode == 2
    assert run(TABLES, "--bogus").returncode == 2
    out = tmp_path / "reports"
    done = run(TABLES, "--dry-run", "--out", out, env=dict(os.environ, PYTHON="py"))
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 8  # 3 + 2 + 3 runs
    configs = [line.split()[3] for line in lines]
    assert configs == [
        "--config=configs/oxford.py",
        "--config=configs/paris.py",
        "--config=configs/instre.py",
        "--config=configs/roxford.py",
        "--config=configs/rparis.py",
        "--config=configs/table3.py:oxford5k",
        "--config=configs/table3.py:paris6k",
        "--config=configs/table3.py:instre",
    ]
    assert lines[0].split()[:3] == ["py", "-m", "jretrieval.main"]
    assert f"--config.output.dir={out}/table2/rparis6k" in lines[4]
    done = run(
        TABLES,
        "--dry-run",
        "--tables",
        "2",
        "--models",
        "baseline",
        "--data",
        "d",
        "--checkpoint-dir",
        "/ck",
        "--",
        "--config.bn.mode=exact",
        cwd=tmp_path,
    )
    [rox, rpar] = done.stdout.splitlines()
    assert rox.split()[5:] == [
        "--config.models=baseline",
        f"--config.data.root={tmp_path}/d",  # relative to where the script was called
        "--config.checkpoint_dir=/ck",
        "--config.bn.mode=exact",
    ]
    assert "configs/rparis.py" in rpar


def test_paper_tables_runs_skips_and_reports_failures(tmp_path, fake):
    env, log, bin_dir = fake
    env = dict(env, PYTHON=str(bin_dir / "python-fake"), FAKE_FAIL="paris")
    out = tmp_path / "reports"
    done = run(TABLES, "--tables", "1,3", "--out", out, env=env)
    assert done.returncode == 1  # two paris runs failed, the others ran
    assert "ran 4, skipped 0, failed 2: table1/paris6k table3/paris6k" in done.stdout
    assert len(calls(log)) == 6
    assert (out / "table3" / "instre" / "results.json").exists()
    env.pop("FAKE_FAIL")
    again = run(TABLES, "--tables", "1,3", "--out", out, env=env)
    assert again.returncode == 0, again.stdout
    assert "ran 2, skipped 4, failed 0" in again.stdout
    assert len(calls(log)) == 8
    forced = run(TABLES, "--tables", "3", "--out", out, "--force", env=env)
    assert forced.returncode == 0 and "ran 3, skipped 0" in forced.stdout


def test_download_instre_ground_truth_falls_back(tmp_path, fake):
    """The authors' path first (Iscen et al.'s diffusion code), the dataset's folder second."""
    env, log, _ = fake
    data = tmp_path / "data"
    dry = run(DOWNLOAD, "--dry-run", "--dir", data, "instre").stdout
    assert f"fetch {URLS['instre'][0]} -> {data}/instre/gnd_instre.mat" in dry
    env = dict(env, FAKE_FAIL="diffusion")
    done = run(DOWNLOAD, "--dir", data, "instre", env=env)
    assert done.returncode == 0, done.stderr
    fallback = "ftp://ftp.irisa.fr/local/texmex/corpus/instre/gnd_instre.mat"
    assert [line.split()[-1] for line in calls(log)] == [
        URLS["instre"][0],
        fallback,
        URLS["instre"][1],
    ]
    assert (data / "instre" / "gnd_instre.mat").read_bytes() == b"content of " + fallback.encode()
    assert f"failed: {URLS['instre'][0]} (trying the next source)" in done.stderr
    # both sources failing stops the script with nothing in place
    env["FAKE_FAIL"] = "gnd_instre"
    failed = run(DOWNLOAD, "--dir", tmp_path / "other", "instre", env=env)
    assert (
        failed.returncode != 0 and not (tmp_path / "other" / "instre" / "gnd_instre.mat").exists()
    )


def test_download_help_states_the_sources():
    text = run(DOWNLOAD, "-h").stdout
    assert "face-blurred" in text and "2022" in text
    text = run(CHECKPOINTS, "-h").stdout
    assert "resnet101-63fe2227.pth" in text and "torchvision 0.13" in text
    for path in (
        DOWNLOAD,
        CHECKPOINTS,
        TABLES,
        os.path.join(REPO, "bin", "convert_checkpoints.sh"),
    ):
        with open(path) as f:
            script = f.read()
        # nothing outside the repository: the lead's design notes are not shipped to users
        # (the names are split so that this test does not cite them itself)
        notes = ("CHECKPOINTS", "paper", "DESIGN", "STYLE")
        for outside in [
            "shared/",
            *(f"shared {name}" for name in notes),
            *(f"{n}.md" for n in notes),
        ]:
            assert outside not in script, (path, outside)


def test_checkpoint_gdown_command_line_is_accepted_by_installed_gdown(tmp_path, fake):
    pytest.importorskip("gdown")
    env, log, bin_dir = fake
    _executable(bin_dir / "gdown", FAKE_GDOWN)
    drive_id = "1UWJGDuHtzaQdFhSMojoYVQjmCXhIwVvy"
    dest = tmp_path / "ck"
    done = run(CHECKPOINTS, "--dir", dest, "--only", "apgem", env=env)
    assert done.returncode == 0, done.stderr
    [call] = [json.loads(line) for line in calls(log)]
    assert call == {
        "url": f"https://drive.google.com/uc?id={drive_id}",
        "id": None,
        "output": f"{dest}/apgem/Resnet-101-AP-GeM.zip.part",
    }
    assert zipfile.is_zipfile(dest / "apgem" / "Resnet-101-AP-GeM.zip")
    assert (dest / "Resnet-101-AP-GeM.pt").read_bytes() == b"weights"
    # the form the script used before is refused by the same parser (so this test can fail)
    old = subprocess.run(
        [str(bin_dir / "gdown"), "--id", drive_id, "-O", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert old.returncode == 2 and "--id" in old.stderr


TPU_RUN = os.path.join(REPO, "bin", "tpu_run.sh")

FAKE_GCLOUD = r"""#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
"""

FAKE_WORKER_PYTHON = r"""#!/usr/bin/env python3
import json, os, sys
with open(os.environ["WORKER_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(os.getcwd()), *sys.argv[1:]]) + "\n")
"""


def test_tpu_run_launches_one_config_on_every_worker(tmp_path, fake):
    env, log, bin_dir = fake
    _executable(bin_dir / "gcloud-fake", FAKE_GCLOUD)
    _executable(bin_dir / "py-worker", FAKE_WORKER_PYTHON)
    env = dict(env, GCLOUD=str(bin_dir / "gcloud-fake"), WORKER_LOG=str(tmp_path / "worker.log"))
    note = '--config.output.note=it\'s a "test" $HOME'  # survives both shells unchanged
    args = ["--tpu", "pod", "--zone", "us-central2-b", "--project", "p1", "--python", "py-worker"]
    done = run(
        TPU_RUN, *args, "--install", "configs/oxford.py", "--config.models=baseline", note, env=env
    )
    assert done.returncode == 0, done.stderr
    install, launch = [json.loads(line) for line in calls(log)]
    head = ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-central2-b", "--project=p1"]
    assert launch[:-2] == head and launch[-2] == "--worker=all"
    assert install[:-1] == launch[:-1]
    assert install[-1] == "--command=cd jretrieval && py-worker -m pip install -e '.[tpu]'"
    # what every worker's shell runs, here with a fake interpreter in a folder named jretrieval
    (tmp_path / "jretrieval").mkdir()
    remote = launch[-1].removeprefix("--command=")
    subprocess.run(["bash", "-c", remote], cwd=tmp_path, env=env, check=True)
    [worker] = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()]
    assert worker == [
        "jretrieval",
        "-m",
        "jretrieval.main",
        "--config=configs/oxford.py",
        "--config.distributed.multihost=True",
        "--config.models=baseline",
        note,
    ]
    # the dry run prints the same command line, runs nothing
    dry = run(
        TPU_RUN, *args, "--dry-run", "configs/oxford.py", "--config.models=baseline", note, env=env
    )
    assert dry.returncode == 0 and len(calls(log)) == 2
    assert shlex.split(dry.stdout) == [env["GCLOUD"], *launch]
    # mistakes: exit 2 with a line
    assert run(TPU_RUN, "--zone", "z", "configs/oxford.py").returncode == 2
    assert run(TPU_RUN, "--tpu", "t", "--zone", "z").returncode == 2
    assert run(TPU_RUN, "--tpu", "t", "--zone", "z", "--bogus", "c.py").returncode == 2
    assert "Usage: bin/tpu_run.sh" in run(TPU_RUN, "-h").stdout
