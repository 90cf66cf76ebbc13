"""scripts/train.sbatch and scripts/launch.sh: dry runs, a faked Slurm run, argument errors."""

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dualpipe.config.validate import world_size
from megatron_dualpipe.plan import load_plan_recipe

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "scripts" / "train.sbatch"
LAUNCH = ROOT / "scripts" / "launch.sh"
V3 = "recipes/deepseek_v3_671b_ep64_tp1_pp16_h800.yaml"
PROXY = "recipes/deepseek_v3_proxy_8gpu.yaml"


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(extra)
    return env


def run(args, env=None, script=SBATCH):
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, env=env or clean_env(),
                          check=False, capture_output=True, text=True, timeout=60)


def node_commands(stdout):
    return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def flag(cmd, name):
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}="))


def sets(cmd):
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]


@pytest.mark.parametrize("nodes, recipe", [(1, PROXY), (2, PROXY), (256, V3)])
def test_dry_run_prints_one_torchrun_per_node(nodes, recipe):
    proc = run(["--dry-run", "--nodes", str(nodes), recipe, "--set", "train.steps=7"])
    assert proc.returncode == 0, proc.stderr
    cmds = node_commands(proc.stdout)
    assert len(cmds) == nodes
    addrs = set()
    for rank, cmd in enumerate(cmds):
        assert cmd[0] == "torchrun"
        assert flag(cmd, "node-rank") == str(rank)
        assert flag(cmd, "nnodes") == str(nodes) and flag(cmd, "nproc-per-node") == "8"
        addrs.add((flag(cmd, "master-addr"), flag(cmd, "master-port")))
        i = cmd.index("-m")
        assert cmd[i + 1:i + 4] == ["megatron_dualpipe", "train", recipe]
        assert sets(cmd) == ["train.steps=7", f"parallel.num_nodes={nodes}",
                             "parallel.nproc_per_node=8"]
    assert len(addrs) == 1  # every node meets at the same rendezvous
    assert "CUDA_DEVICE_MAX_CONNECTIONS=" in proc.stdout and "NCCL_DEBUG=" in proc.stdout


@pytest.mark.parametrize("nodes, recipe", [(1, PROXY), (256, V3)])
def test_dry_run_command_is_a_valid_job(nodes, recipe):
    cmd = node_commands(run(["--dry-run", "--nodes", str(nodes), recipe]).stdout)[0]
    i = cmd.index("train")
    recipe_obj = load_plan_recipe(ROOT / cmd[i + 1], sets(cmd))
    assert world_size(recipe_obj) == nodes * 8


def test_overrides_with_shell_characters_survive_quoting():
    proc = run(["--dry-run", PROXY, "--set", "parallel.layers_per_stage=[3, 4,4,4]",
                "--set=train.log_dir=runs/a b"])
    cmd = node_commands(proc.stdout)[0]
    assert sets(cmd)[:2] == ["parallel.layers_per_stage=[3, 4,4,4]", "train.log_dir=runs/a b"]


def test_sbatch_defaults():
    text = SBATCH.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.MULTILINE))
    assert directives["gpus-per-node"] == "8" and directives["ntasks-per-node"] == "1"
    assert directives["signal"] == "USR1@120"  # checkpoint 2 minutes before the time limit
    for script in (SBATCH, LAUNCH):
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


def test_fake_slurm_run_starts_one_torchrun_per_node(tmp_path):
    """Under Slurm: srun starts launch.sh --exec-node on every node, with SLURM_NODEID."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho gpu-node-17\necho gpu-node-18\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'echo "srun $*" >> "$LOG"\n'
        'n=1; for a in "$@"; do case "$a" in --nodes=*) n=${a#*=};; esac; done\n'
        'while [[ "$1" == --* ]]; do shift; done\n'
        'for ((i = 0; i < n; i++)); do SLURM_NODEID=$i "$@"; done\n')
    (bin_dir / "torchrun").write_text(
        '#!/bin/bash\necho "torchrun $*" >> "$LOG"\n'
        'echo "$(grep SigIgn /proc/$$/status) $TORCHELASTIC_SIGNALS_TO_HANDLE" >> "$LOG.sig"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "log"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log), SLURM_JOB_ID="42",
                    SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu-node-[17-18]",
                    SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96", PYTHON=sys.executable)
    proc = run([PROXY, "--set", "train.steps=3"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "world size 16 = 2 nodes x 8 GPUs" in proc.stderr  # the pre-flight plan
    lines = log.read_text().splitlines()
    assert lines[0].startswith("srun ") and "--ntasks-per-node=1" in lines[0]
    assert "--cpus-per-task=96" in lines[0]
    runs = [shlex.split(line) for line in lines[1:]]
    assert [flag(c, "node-rank") for c in runs] == ["0", "1"]
    assert {flag(c, "master-addr") for c in runs} == {"gpu-node-17"}
    assert all(sets(c) == ["train.steps=3", "parallel.num_nodes=2", "parallel.nproc_per_node=8"]
               for c in runs)
    # torchrun ignores SIGTERM and SIGUSR1 (the workers checkpoint on them; docs/troubleshooting.md)
    for line in Path(f"{log}.sig").read_text().splitlines():
        mask, handled = line.split()[1:]
        assert int(mask, 16) & (1 << (signal.SIGTERM - 1)) and int(mask, 16) & (
            1 << (signal.SIGUSR1 - 1)), line
        assert handled == "SIGINT,SIGHUP,SIGQUIT"


@pytest.mark.parametrize("args, message", [
    ([PROXY], "not inside a Slurm job"),
    (["--dry-run", PROXY, "--foo"], "unexpected argument"),
    (["--dry-run", "--nodes", "0", PROXY], "positive integer"),
    (["--dry-run"], "usage"),
])
def test_launcher_errors(args, message):
    proc = run(args)
    assert proc.returncode == 2 and message in proc.stderr
