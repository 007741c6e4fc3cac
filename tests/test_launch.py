"""Launch scripts: input checks, the exact commands they build, Slurm requeue on preemption (fake Slurm)."""
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def _script(path, text):
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(0o755)


def _fake_slurm(tmp_path):
    """scontrol and srun shims that record how they were called; srun runs the node command with `echo`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    _script(bin_dir / "scontrol", f'echo "scontrol $*" >> {log}\n'
            'if [ "$1 $2" = "show hostnames" ]; then printf "gpu003\\ngpu004\\n"; fi\n')
    # srun: record the node command; for each of 2 "nodes", expand $SLURM_NODEID in it like srun would.
    _script(bin_dir / "srun", f'echo "srun $*" >> {log}\n'
            'cmd="${@: -1}"\n'
            f'for n in 0 1; do SLURM_NODEID=$n bash -c "echo node$n: $cmd" >> {log}; done\n'
            'trap "echo srun got TERM >> ' + str(log) + '; kill \\$sp 2>/dev/null; exit 0" TERM\n'
            'if [ -n "${FAKE_SRUN_SLEEP:-}" ]; then sleep "$FAKE_SRUN_SLEEP" & sp=$!; wait $sp; fi\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "CONFIG": str(DEMO)}
    return env, log


def test_slurm_builds_per_node_deepspeed_commands(tmp_path):
    env, log = _fake_slurm(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "launch/slurm.sbatch"), "train.steps=10", "run.name=a b"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    hostfile = (tmp_path / ".hostfile.4242").read_text().splitlines()
    assert hostfile == ["gpu003 slots=8", "gpu004 slots=8"]
    node = [c for c in calls if c.startswith("node")]
    port = 20000 + 4242
    for rank in (0, 1):
        assert (f"node{rank}: deepspeed --hostfile {tmp_path}/.hostfile.4242 --no_ssh --node_rank {rank} "
                f"--master_addr gpu003 --master_port {port} --module vitscale train --config {DEMO} "
                "train.steps=10 run.name=a b") in node
    assert any(c.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1") for c in calls)
    assert "+ srun" in r.stdout  # prints the exact command


def test_slurm_preemption_forwards_sigterm_and_requeues(tmp_path):
    env, log = _fake_slurm(tmp_path)
    env["FAKE_SRUN_SLEEP"] = "30"
    p = subprocess.Popen(["bash", str(ROOT / "launch/slurm.sbatch")], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if log.exists() and "node1" in log.read_text():
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers before the time limit
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    calls = log.read_text()
    assert "srun got TERM" in calls and "scontrol requeue 4242" in calls


def test_slurm_refuses_missing_config(tmp_path):
    env, _ = _fake_slurm(tmp_path)
    env["CONFIG"] = str(tmp_path / "nope.yaml")
    r = subprocess.run(["bash", str(ROOT / "launch/slurm.sbatch")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "config not found" in r.stderr


def test_deepspeed_scripts_check_inputs_and_print_command(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    env = {**os.environ, "DRY_RUN": "1", "MASTER_PORT": "29123"}
    r = subprocess.run(["bash", str(ROOT / "launch/deepspeed_node.sh"), str(hostfile), "1", "127.0.0.1",
                        str(DEMO), "train.steps=3"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"+ deepspeed --hostfile {hostfile} --no_ssh --node_rank 1 --master_addr 127.0.0.1 "
                                f"--master_port 29123 --module vitscale train --config {DEMO} train.steps=3")
    bad = subprocess.run(["bash", str(ROOT / "launch/deepspeed_node.sh"), str(hostfile), "2", "127.0.0.1",
                          str(DEMO)], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "lists 2 nodes" in bad.stderr
    missing = subprocess.run(["bash", str(ROOT / "launch/deepspeed.sh"), str(tmp_path / "nohost"), str(DEMO)],
                             env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "hostfile not found" in missing.stderr
    r = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), "1", "2", "0", "127.0.0.1", str(DEMO)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "torchrun --nnodes 1 --nproc_per_node 2" in r.stdout
