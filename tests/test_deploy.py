"""deploy/: the manifests and scripts name commands, options and config keys that exist; the
Slurm script really starts Ray, trains through it and stops it (only `srun`/`scontrol` stubbed,
there is no Slurm here); the training entrypoint runs through the Ray Jobs API as KubeRay submits it."""

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from pipeline.cli import app
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE_CONFIGS = "/opt/hvae-pipeline/configs/"  # where deploy/docker/Dockerfile copies configs/
BIN = Path(sys.executable).parent
# RAY_AUTH_MODE set explicitly: an in-process ray.init() (other tests) writes ~/.ray/auth_token,
# after which a `ray start` cluster with the mode unset expects a token its clients do not send.
ENV = {**os.environ, "TQDM_DISABLE": "1", "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}


def entrypoints() -> list[tuple[str, list[str]]]:
    """(manifest, argv without the program name) of every hvae-pipeline invocation in deploy/kuberay."""
    found = []
    for manifest in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        for document in yaml.safe_load_all(manifest.read_text()):
            spec = document["spec"]
            if document["kind"] == "RayJob":
                found.append((manifest.name, shlex.split(spec["entrypoint"])))
            elif document["kind"] == "RayCronJob":
                found.append((manifest.name, shlex.split(spec["jobTemplate"]["entrypoint"])))
            elif document["kind"] == "PersistentVolumeClaim":
                continue  # the shard job's spill volume: no command
            elif document["kind"] == "CronJob":
                container = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
                found.append((manifest.name, ["hvae-pipeline", *container["args"]]))
            else:
                raise AssertionError(f"{manifest.name}: unexpected kind {document['kind']}")
    return found


def check_invocation(where: str, argv: list[str]) -> None:
    """The subcommand and every option exist and parse; a train config and its overrides validate."""
    assert argv[0] == "hvae-pipeline", f"{where}: runs {argv[0]!r}, not hvae-pipeline"
    group = get_command(app)
    command = group.commands.get(argv[1])
    assert command is not None, f"{where}: no subcommand {argv[1]!r}"
    try:
        command.make_context(argv[1], list(argv[2:]), resilient_parsing=False)
    except Exception as error:  # click's UsageError (typer may carry its own copy of click)
        if not any(cls.__name__ == "UsageError" for cls in type(error).__mro__):
            raise
        raise AssertionError(f"{where}: {' '.join(argv)}: {error.format_message()}") from None
    if argv[1] == "train":
        config = argv[argv.index("--config") + 1]
        overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
        assert config.startswith(IMAGE_CONFIGS), f"{where}: config {config} is not one the image ships"
        load_config(ROOT / "configs" / config[len(IMAGE_CONFIGS) :], overrides)


def test_kuberay_manifests_run_commands_and_keys_that_exist():
    found = entrypoints()
    assert {name for name, _ in found} == {
        "rayjob-train.yaml",
        "rayjob-shard.yaml",
        "raycronjob-embed-release.yaml",
        "cronjob-embed-release.yaml",
    }
    for where, argv in found:
        check_invocation(where, argv)
    with pytest.raises(AssertionError, match="No such option: --census "):  # the check itself can fail
        check_invocation("bad", ["hvae-pipeline", "embed-release", "--census", "latest"])
    with pytest.raises(Exception, match="train.max_step"):
        check_invocation("bad", ["hvae-pipeline", "train", "--config", IMAGE_CONFIGS + "demo.yaml", "train.max_step=3"])
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "COPY configs ./configs" in dockerfile and "WORKDIR /opt/hvae-pipeline" in dockerfile
    images = {
        line.split("image:")[1].strip()
        for m in (DEPLOY / "kuberay").glob("*.yaml")
        for line in m.read_text().splitlines()
        if "image:" in line
    }
    assert len(images) == 1, f"the manifests name several images: {images}"


def test_slurm_scripts_parse():
    for script in [*(DEPLOY / "slurm").glob("*.sbatch"), DEPLOY / "slurm" / "ray-cluster.sh"]:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        for line in script.read_text().splitlines():
            if "hvae-pipeline " in line and not line.lstrip().startswith("#"):
                subcommand = line.split("hvae-pipeline ")[1].split()[0]
                assert subcommand in get_command(app).commands, f"{script.name}: {line}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "shards"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "simulate",
            str(out),
            "--format",
            "shards",
            "--n-cells",
            "2000",
            "--n-genes",
            "200",
            "--shard-size",
            "500",
        ],
        check=True,
        capture_output=True,
        env=ENV,
    )
    return out


STUBS = {
    # srun: run the command here, after srun's own options (-w NODE takes a value).
    "srun": '#!/bin/bash\necho "srun $*" >> "$STUB_LOG"\n'
    'while [ $# -gt 0 ]; do case "$1" in -w|--nodelist) shift 2;; -*) shift;; *) break;; esac; done\n'
    'exec "$@"\n',
    # scontrol show hostnames LIST: one node per comma-separated name.
    "scontrol": '#!/bin/bash\necho "scontrol $*" >> "$STUB_LOG"\necho "$3" | tr , "\\n"\n',
}


@pytest.mark.slow
@pytest.mark.ray
def test_slurm_train_script_starts_ray_trains_through_it_and_stops_it(shards, tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "stub.log"
    env = {
        **ENV,
        "PATH": f"{stubs}:{ENV['PATH']}",
        "STUB_LOG": str(log),
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_CPUS_PER_TASK": "2",
        "SLURM_GPUS_ON_NODE": "0",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "RAY_PORT": str(free_port()),
        "RAY_WAIT_SECONDS": "120",
    }
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [
            "bash",
            str(DEPLOY / "slurm" / "train.sbatch"),
            str(ROOT / "configs" / "demo.yaml"),
            f"data.path={shards}",
            "data.validation_shards=0",
            "scaling.num_workers=2",
            "train.max_steps=20",
            "train.batch_size=64",
            "checkpoint.every_steps=10",
            "train.progress=false",
            f"run.storage_path={tmp_path / 'runs'}",
            "run.name=slurm",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    calls = log.read_text()
    assert "scontrol show hostnames node001" in calls and "-w node001 ray start --head" in calls
    assert "ray stop --force" in calls
    assert "ray: 1 node(s) up" in result.stdout and "trained to step 20" in result.stdout
    assert (tmp_path / "runs" / "slurm" / "checkpoint_00000020" / "model.pt").exists()
    status = subprocess.run(
        [str(BIN / "ray"), "status", "--address", f"127.0.0.1:{env['RAY_PORT']}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert status.returncode != 0, "the script left its Ray cluster running"


@pytest.mark.slow
@pytest.mark.ray
def test_training_entrypoint_through_the_ray_jobs_api(shards, tmp_path):
    """What KubeRay's submitter does: `ray job submit --address http://HEAD:8265 -- ENTRYPOINT`."""
    port, dashboard = free_port(), free_port()
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    start = subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        entrypoint = (
            f"hvae-pipeline train --config {ROOT / 'configs' / 'demo.yaml'} data.path={shards} "
            f"data.validation_shards=0 scaling.num_workers=2 train.max_steps=20 train.batch_size=64 "
            f"checkpoint.every_steps=10 train.progress=false run.storage_path={tmp_path / 'runs'} run.name=jobs"
        )
        deadline = time.time() + 120
        while True:  # the dashboard's job server comes up a little after `ray start` returns
            submit = subprocess.run(
                [
                    str(BIN / "ray"),
                    "job",
                    "submit",
                    "--address",
                    f"http://127.0.0.1:{dashboard}",
                    "--submission-id",
                    f"hvae-train-{port}",
                    "--",
                    *shlex.split(entrypoint),
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp_path,
                timeout=600,
            )
            output = submit.stderr + submit.stdout
            if (
                submit.returncode == 0
                or time.time() > deadline
                or not any(
                    busy in output
                    for busy in ("Connection", "No available agent")  # the job agent starts after the head
                )
            ):
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "trained to step 20" in submit.stdout and "succeeded" in submit.stdout
        assert (tmp_path / "runs" / "jobs" / "checkpoint_00000020" / "model.pt").exists()
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, env=env)
