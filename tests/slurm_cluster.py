"""A real one-node Slurm "cluster" on localhost for the tests: munged, slurmctld and slurmd started as
children of this process (as root) from a slurm.conf in a temporary directory, and stopped by PID.

Nothing system-wide is touched: MUNGE's key, socket, pid and log files, Slurm's state, spool, pid and log
files all live in the temporary directory; the daemons listen on free ports; clients find the cluster
through ``SLURM_CONF`` (see :meth:`LocalSlurm.env`). ``slurm/install-test-slurm.sh`` installs the
packages. Standalone use, for poking at it by hand::

    python tests/slurm_cluster.py /tmp/slurm-play    # starts it, prints the SLURM_CONF line, Ctrl-C stops it
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
INSTALL_HINT = "install them with `bash slurm/install-test-slurm.sh` (as root; Debian/Ubuntu: slurmctld slurmd " \
               "slurm-client munge), as .ci/run does"


def missing_binaries() -> list:
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


SLURM_CONF = """\
# Written by tests/slurm_cluster.py: a one-node test cluster on localhost.
ClusterName=wpntest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (default 120 s) is also how long a requeued job waits before it may start again (begin time =
# requeue + cred_expire + 1); forcing an earlier start makes slurmd refuse the job ("credential revoked").
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=600
SlurmdTimeout=60
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    def __init__(self, root: str, cpus: int = 2, cred_expire: int = 10):
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"Slurm/MUNGE binaries missing: {', '.join(missing)}; {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise RuntimeError("the local test Slurm runs its daemons as root (SlurmUser=root); run the tests as root")
        self.root = os.path.abspath(root)
        self.cpus, self.cred_expire = cpus, cred_expire
        self.procs = {}  # name -> Popen
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket.2")

    # --- environment for clients -------------------------------------------------------------
    def env(self, base: dict | None = None, **extra) -> dict:
        env = dict(os.environ if base is None else base)
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            del env[key]  # not from an enclosing allocation
        env["SLURM_CONF"] = self.conf
        env.update(extra)
        return env

    def run(self, *args, check=True, timeout=60, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), env=kwargs.pop("env", None) or self.env(), capture_output=True,
                                text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    # --- start / stop -------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "LocalSlurm":
        for sub in ("munge", "state", "spool"):
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        key = os.path.join(self.root, "munge", "munge.key")
        if not os.path.exists(key):
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
            os.chmod(key, 0o400)
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(root=self.root, ctld_port=_free_port(), slurmd_port=_free_port(),
                                      munge_socket=self.munge_socket, cpus=self.cpus, cred_expire=self.cred_expire,
                                      mem_mb=max(512, _mem_mb() // 2)))
        try:
            munge_dir = os.path.join(self.root, "munge")
            self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid",
                                   f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"])
            self._wait(lambda: os.path.exists(self.munge_socket), timeout, "munged's socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
            self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, timeout,
                       "slurmctld to answer `scontrol ping`")
            self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", self.conf])
            self._wait(self._node_idle, timeout, "node localhost to be idle in `sinfo`")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list) -> None:
        log = open(os.path.join(self.root, f"{name}.stdout"), "ab")
        self.procs[name] = subprocess.Popen(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.root)
        log.close()

    def _node_idle(self) -> bool:
        state = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False).stdout.strip()
        return state in ("idle", "mixed", "allocated")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode} while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("munged.stdout", "munge/munged.log", "slurmctld.stdout", "slurmctld.log", "slurmd.stdout",
                     "slurmd.log"):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}\n{f.read()[-tail:]}")
        return "\n".join(out)

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job of this cluster and wait until none runs (their processes are gone)."""
        if "slurmctld" not in self.procs or self.procs["slurmctld"].poll() is not None:
            return
        self.run("scancel", "--full", "--user", str(os.getuid()), check=False)  # USR/TERM then KILL
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                return
            time.sleep(1)

    def stop(self) -> None:
        """Stop the daemons we started, by PID: slurmd, slurmctld, munged (SIGTERM, then SIGKILL)."""
        try:
            self.cancel_all()
        except Exception:
            pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    # --- jobs ---------------------------------------------------------------------------------
    def sbatch(self, *args, env: dict | None = None, cwd: str | None = None) -> int:
        result = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (keys like JobState, ExitCode, Restarts, Reason); {} if unknown."""
        result = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait_job(self, job_id: int, until=None, timeout: float = 300, poll: float = 1.0) -> dict:
        """Poll until ``until(info)`` (default: the job reached a final state); returns the job's info."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        until = until or (lambda info: info.get("JobState") in final)
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) after {timeout:.0f}s")


def main(argv) -> None:
    root = argv[1] if len(argv) > 1 else "/tmp/wpn-slurm"
    # Ctrl-C or a SIGTERM to this process stops the daemons (a background job ignores SIGINT: use TERM).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}   # munged, slurmctld, slurmd: PIDs "
              f"{', '.join(str(p.pid) for p in cluster.procs.values())}; Ctrl-C or `kill {os.getpid()}` "
              f"stops them", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main(sys.argv)
