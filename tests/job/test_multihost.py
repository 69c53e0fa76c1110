"""The job across real network hosts (issue 18): two hosts made as Linux network namespaces
(tests/support/netns.py), 2 ranks each, torchrun c10d rendezvous on host A's address, gloo over the
hosts' own interfaces, the shared file system as the cluster's shared storage.

1. FSDP2, HSDP and DeepSpeed ZeRO-2 over ``launch/torchrun_multi_node.sh`` on 2 hosts equal
   the same job on 1 host with 4 ranks: losses and final parameters within 1e-6 relative,
   g-SNR equal.
2. Host B dies (link cut, every process SIGKILLed; during a step, or while a checkpoint is
   written): with ``--nnodes 1:2 --max-restarts 1`` host A's ranks fail within
   ``--pg-timeout``, the job re-forms on host A at world size 2, resumes from the last
   complete checkpoint (resharded) and equals, step for step, a run that trained to that
   checkpoint on 4 ranks and the rest on 2. A checkpoint being written when the host died
   is never taken for a complete one (item 4).
3. The network splits (link down, processes alive): every rank exits within the bound with
   an error naming the step and the ranks on the other side; after the link is back
   ``--resume auto`` continues from the last complete checkpoint, which is intact.
5. Wrong settings fail fast and clearly: a rendezvous endpoint nobody serves, hosts started
   with different flags, an interface gloo cannot use.
6. mpirun (MPICH Hydra) across the hosts, its "ssh" being ``ip netns exec``.

Measured times are printed (``-s``) and recorded in docs/fault_tolerance.md.
Select with ``-m multihost``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sai_dist.train import run_checkpoints as ckpt_io
from tests.support import netns
from tests.support.job_runs import REPO, TINY, job_env, losses, run_ok

REASON = netns.unavailable()
pytestmark = [
    pytest.mark.multihost,
    pytest.mark.distributed,
    pytest.mark.skipif(REASON is not None, reason=f"no network-namespace hosts: {REASON}"),
]

PORT = 29400  # free by construction: the hosts' network stacks are new
DS_ZERO2 = ["--backend", "deepspeed", "--deepspeed-config", str(REPO / "configs" / "ds_zero2.json")]


@pytest.fixture
def cluster():  # type: ignore[no-untyped-def]
    with netns.Cluster(2) as c:
        yield c


class Launched:
    """A launcher started on a host; its output is read as it comes, with arrival times."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, pattern: str) -> float | None:
        """Arrival time of the first output line matching ``pattern``."""
        rx = re.compile(pattern)
        return next((t for t, line in self.lines if rx.search(line)), None)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.proc.args[:8]} still running after {timeout} s:\n{self.text[-4000:]}"
            ) from None
        self._reader.join(timeout=10)
        return code


def launch(c: netns.Cluster, host: int, args: list[str], nnodes: str = "2", **env: str) -> Launched:
    """``launch/torchrun_multi_node.sh`` on ``host``: the README's multi-node command with
    this host's address and, on host 0, the rendezvous store."""
    variables = dict(
        NNODES=nnodes,
        NPROC="2",
        RDZV_ENDPOINT=f"{c.addrs[0]}:{PORT}",
        RDZV_ID="job",
        NODE_ADDR=c.addrs[host],
        RDZV_IS_HOST=str(int(host == 0)),
    )
    variables.update(env)
    cmd = ["bash", "launch/torchrun_multi_node.sh", *TINY, *args]
    return Launched(c.popen(host, cmd, env=job_env(**variables), cwd=REPO))


def both(c: netns.Cluster, args: list[str], **env: str) -> list[Launched]:
    return [launch(c, h, args, **env) for h in (0, 1)]


def wait_ok(nodes: list[Launched], timeout: float = 300) -> None:
    for node in nodes:
        code = node.wait(timeout)
        assert code == 0, f"exit {code}:\n{node.text[-4000:]}"


def final_params(run: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{step:06d}"
    engine = ckpt / "engine" / "mp_rank_00_model_states.pt"
    if engine.is_file():
        return torch.load(engine, map_location="cpu", weights_only=False)["module"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run / f"final_{step}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=False)["model"]


def assert_params_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Every parameter within 1e-6 relative (elementwise, with a 1e-9 floor near zero);
    returns the largest relative difference."""
    assert a.keys() == b.keys() and len(a) > 0
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        rel = float(((x - y).abs() / (y.abs() + 1e-9)).max())
        worst = max(worst, rel)
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-9), (k, rel)
    return worst


def assert_losses_close(a: dict[int, float], b: dict[int, float]) -> None:
    assert list(a) == list(b)
    for step in b:
        assert a[step] == pytest.approx(b[step], rel=1e-6), step


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "events.jsonl")]


def starts(run: Path) -> list[dict]:
    return [e for e in events(run) if e["event"] == "start"]


def gsnr(run: Path) -> list[dict]:
    return json.loads((run / "gsnr_table.json").read_text())


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def logged_steps(run: Path) -> int:
    try:
        return max(
            (r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if r["kind"] == "train"),
            default=0,
        )
    except (OSError, ValueError):
        return 0


# -- 1. two hosts equal one host ------------------------------------------------------------


@pytest.mark.parametrize(
    "backend",
    [["--backend", "fsdp2"], ["--backend", "hsdp"], DS_ZERO2],
    ids=["fsdp2", "hsdp", "deepspeed-zero2"],
)
def test_two_hosts_equal_one_host_of_four_ranks(
    tmp_path: Path, cluster: netns.Cluster, backend: list[str]
) -> None:
    if backend[1] == "deepspeed":
        pytest.importorskip("sai_dist.deepspeed", reason="sai_dist.deepspeed not on this branch")
    common = [*backend, "--runs-dir", str(tmp_path)]
    t0 = time.time()
    wait_ok(both(cluster, [*common, "--name", "two"]))
    t_two = time.time() - t0
    run_ok([sys.executable, "-m", "sai_dist.train", *TINY, *common, "--nproc", "4", "--name", "one"])
    two, one = tmp_path / "two", tmp_path / "one"
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["world_size"], summary["backend"]) == (4, backend[1])
    assert_losses_close(losses(two), losses(one))
    worst = assert_params_close(final_params(two, 8), final_params(one, 8))
    assert gsnr(two) == gsnr(one)
    assert losses(two)[8] < losses(two)[1] - 0.05  # it learns
    print(f"\n{backend[1]}: 2 hosts x 2 ranks in {t_two:.1f} s; max rel param diff vs 1x4 {worst:.2g}")


# -- 2 and 4. a host dies ----------------------------------------------------------------

ELASTIC = ["--steps", "16", "--ckpt-every", "4", "--eval-every", "4", "--pg-timeout", "8"]
ELASTIC_ENV = dict(
    NNODES="1:2",
    MAX_RESTARTS="1",
    # Once one host joined, wait up to 10 s for the other (the first start) before forming.
    RDZV_CONF="last_call_timeout=10,read_timeout=10",
    TORCHRUN_ARGS="--monitor-interval 0.5",
)


def reference_4_then_2(tmp_path: Path, backend: list[str], ckpt_step: int) -> Path:
    """The same job on one host: 4 ranks up to the checkpoint of ``ckpt_step`` (the run stops
    right after it), then resumed from it on 2 ranks."""
    common = [*TINY, *ELASTIC, *backend, "--runs-dir", str(tmp_path), "--name", "ref"]
    cmd = [sys.executable, "-m", "sai_dist.train", *common, "--nproc", "4"]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=job_env(SAI_DIST_TRAIN_DIE_AFTER_STEP=str(ckpt_step)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "fault injection" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    ref = tmp_path / "ref"
    assert ckpt_io.latest(str(ref / "checkpoints")) == str(ref / "checkpoints" / f"step_{ckpt_step:06d}")
    run_ok([sys.executable, "-m", "sai_dist.train", "--resume", str(ref), "--nproc", "2", "--no-progress"])
    return ref


@pytest.mark.parametrize(
    ("fault", "lost_step"),
    [
        ({"SAI_DIST_TRAIN_HANG_IN_SAVE": "8"}, 8),
        # Covered by the first case too (a death mid-run); `-m "multihost and not slow"` skips it.
        pytest.param({"SAI_DIST_TRAIN_HANG_AFTER_STEP": "6"}, 6, marks=pytest.mark.slow),
    ],
    ids=["dies-while-saving-step-8", "dies-after-step-6"],
)
def test_host_dies_job_reforms_on_survivor_and_resumes(
    tmp_path: Path, cluster: netns.Cluster, fault: dict[str, str], lost_step: int
) -> None:
    """Host B's ranks (2 and 3) stop at a chosen point (inside the save of step 8, with
    their shards written, or after step 6); the test then cuts B's link and SIGKILLs every
    process on B at once. Nothing on B says goodbye."""
    args = [*ELASTIC, "--backend", "fsdp2", "--runs-dir", str(tmp_path), "--name", "run", "--resume", "auto"]
    env = {**ELASTIC_ENV, **fault, "SAI_DIST_TRAIN_DIE_RANK": "2,3"}
    a, b = (launch(cluster, h, args, **env) for h in (0, 1))
    run = tmp_path / "run"
    wait_for(lambda: b.text.count("fault injection: rank") == 2, 240, "host B's ranks to reach the fault")
    latest_before = ckpt_io.latest(str(run / "checkpoints"))
    steps_done = logged_steps(run)
    t_fail = time.time()
    cluster.cut(1)
    killed = cluster.kill_host(1)
    assert killed >= 3  # the agent and its two ranks
    code = a.wait(240)
    assert code == 0, a.text[-4000:]
    t_detect = a.first(r"a collective failed in step")
    assert t_detect is not None, a.text[-4000:]
    first, resumed = starts(run)
    assert (first["attempt"], first["world_size"]) == (0, 4)
    assert (resumed["attempt"], resumed["world_size"]) == (1, 2)
    # The checkpoint being written when B died was never complete: the previous one is used.
    assert latest_before == str(run / "checkpoints" / "step_000004")
    assert resumed["resumed_from"] == "step_000004" and resumed["gsnr"] == "loaded"
    assert steps_done == lost_step and steps_done - 4 <= 4  # steps lost <= the checkpoint interval
    assert not list((run / "checkpoints").glob("*.partial"))
    # Both of A's ranks name B's ranks as unreachable.
    for r in (0, 1):
        assert re.search(
            rf"rank {r} \(10\.77\.0\.1\): a collective failed in step \d+; unreachable \(host dead or "
            rf"network split\): rank 2 \(10\.77\.0\.2\), rank 3 \(10\.77\.0\.2\)",
            a.text,
        ), a.text[-3000:]
    ref = reference_4_then_2(tmp_path, ["--backend", "fsdp2"], 4)
    assert_losses_close(losses(run), losses(ref))
    assert sorted(losses(run)) == list(range(1, 17))
    worst = assert_params_close(final_params(run, 16), final_params(ref, 16))
    assert gsnr(run) == gsnr(ref)
    print(
        f"\nhost B died after step {steps_done} (checkpoint 4): detected by host A after "
        f"{t_detect - t_fail:.1f} s (--pg-timeout 8), job re-formed at world size 2 and resumed "
        f"{resumed['time'] - t_fail:.1f} s after the failure; steps lost {steps_done - 4}; "
        f"max rel param diff vs 4-then-2 {worst:.2g}"
    )


# -- 3. the network splits -----------------------------------------------------------------

SPLIT = ["--steps", "24", "--ckpt-every", "4", "--eval-every", "4", "--pg-timeout", "8"]


def test_network_split_every_rank_exits_in_bound_then_resumes(tmp_path: Path, cluster: netns.Cluster) -> None:
    args = [*SPLIT, "--backend", "fsdp2", "--runs-dir", str(tmp_path), "--name", "run", "--resume", "auto"]
    env = {"RDZV_CONF": "read_timeout=10"}
    a, b = both(cluster, args, **env)
    run = tmp_path / "run"
    wait_for(lambda: logged_steps(run) >= 6, 240, "step 6")
    before = losses(run)
    t_cut = time.time()
    cluster.cut(1)
    assert a.wait(120) != 0
    error = (
        r"rank (\d) \((10\.77\.0\.\d)\): a collective failed in step (\d+); "
        r"unreachable \(host dead or network split\): (.*?)(?:; exited|\. The wait)"
    )
    wait_for(lambda: len(set(re.findall(error, a.text + b.text))) >= 4, 60, "every rank's error")
    found = {int(r): (addr, lost) for r, addr, _, lost in re.findall(error, a.text + b.text)}
    assert sorted(found) == [0, 1, 2, 3]
    for r, (addr, lost) in found.items():
        # Each rank names the ranks on the other side of the split (and only those).
        other = "10.77.0.2" if addr == "10.77.0.1" else "10.77.0.1"
        named = re.findall(r"rank (\d) \((10\.77\.0\.\d)\)", lost)
        assert {h for _, h in named} == {other}, (r, lost)
        assert len(named) == 2, (r, lost)
    t_all = max(t for node in (a, b) for t, line in node.lines if "a collective failed in step" in line)
    # Host B's torchrun agent waits on the rendezvous store across the split; it gives up
    # once the link is back (or when the scheduler kills it).
    cluster.restore(1)
    t_restore = time.time()
    assert b.wait(120) != 0
    t_b_exit = time.time()
    # Nothing written before the split is lost or half-written.
    latest = ckpt_io.latest(str(run / "checkpoints"))
    assert latest is not None
    for ckpt in sorted((run / "checkpoints").glob("step_*[0-9]")):
        ckpt_io.verify(str(ckpt))  # every complete checkpoint matches its manifest
    kept = int(Path(latest).name.split("_")[1])
    assert kept >= 4
    t0 = time.time()
    wait_ok(both(cluster, args, **env))
    t_resume = time.time() - t0
    resumed = starts(run)[-1]
    assert resumed["resumed_from"] == Path(latest).name and resumed["world_size"] == 4
    after = losses(run)
    assert sorted(after) == list(range(1, 25))
    for step, value in before.items():  # kept, and the redone steps reproduce the first try
        assert after[step] == pytest.approx(value, rel=1e-6), step
    print(
        f"\nsplit after step {max(before)}: all 4 ranks failed {t_all - t_cut:.1f} s after the cut "
        f"(--pg-timeout 8); host B's agent exited {t_b_exit - t_restore:.1f} s after the link came back; "
        f"resumed from {Path(latest).name}, relaunch to the end {t_resume:.1f} s"
    )


# -- 5. wrong cluster settings fail fast ---------------------------------------------------


def test_rendezvous_endpoint_nobody_serves_fails_within_the_timeout(
    tmp_path: Path, cluster: netns.Cluster
) -> None:
    """Host B alone, pointed at host A's address where no store listens."""
    t0 = time.time()
    node = launch(cluster, 1, ["--runs-dir", str(tmp_path), "--name", "x"], RDZV_CONF="read_timeout=5")
    assert node.wait(120) != 0
    elapsed = time.time() - t0
    assert "The connection to the C10d store has failed" in node.text, node.text[-3000:]
    assert not (tmp_path / "x").exists()
    print(
        f"\nno rendezvous store at {cluster.addrs[0]}:{PORT}: torchrun exited after {elapsed:.1f} s "
        "(read_timeout=5)"
    )


def test_hosts_with_different_settings_fail_naming_the_difference(
    tmp_path: Path, cluster: netns.Cluster
) -> None:
    common = ["--backend", "fsdp2", "--runs-dir", str(tmp_path), "--name", "x", "--pg-timeout", "8"]
    a = launch(cluster, 0, common)
    b = launch(cluster, 1, [*common, "--lr", "0.5"])
    for node in (a, b):
        assert node.wait(180) != 0
        text = node.text
        assert "started with different sai-dist settings" in text, text[-3000:]
        assert re.search(r"--lr: (None|0\.5) on ranks \d,\d; (None|0\.5) on ranks \d,\d", text), text[-3000:]
        assert "a collective failed" not in text


def test_interface_gloo_cannot_use_fails_with_a_clear_error(tmp_path: Path, cluster: netns.Cluster) -> None:
    common = ["--backend", "fsdp2", "--runs-dir", str(tmp_path), "--name", "x", "--pg-timeout", "8"]
    t0 = time.time()
    a = launch(cluster, 0, common)
    b = launch(cluster, 1, common, GLOO_SOCKET_IFNAME="nosuch0")
    assert b.wait(180) != 0
    assert "GLOO_SOCKET_IFNAME=nosuch0" in b.text and "ip -br addr" in b.text, b.text[-3000:]
    assert a.wait(180) != 0
    print(
        f"\nbad GLOO_SOCKET_IFNAME on host B: both hosts exited after {time.time() - t0:.1f} s "
        "(--pg-timeout 8)"
    )


# -- 6. mpirun across hosts ------------------------------------------------------------------


def test_mpirun_across_hosts_equals_one_host(tmp_path: Path, cluster: netns.Cluster) -> None:
    """MPICH Hydra needs no ssh: its ``-launcher-exec`` is any program called like ssh
    (``PROG [-opts] HOST COMMAND``); here one that runs COMMAND with ``ip netns exec`` on the
    host of that address, and logs each call."""
    shell, calls = tmp_path / "netns-shell", tmp_path / "calls"
    cases = "".join(f"  {addr}) ns={ns};;\n" for addr, ns in zip(cluster.addrs, cluster.hosts, strict=True))
    shell.write_text(
        "#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nhost=$1; shift\n"
        f'echo "$host" >> {calls}\ncase $host in\n{cases}'
        '  *) echo "unknown host $host" >&2; exit 255;;\nesac\n'
        'exec ip netns exec "$ns" bash -c "$*"\n'
    )
    shell.chmod(0o755)
    common = ["--backend", "ddp", "--runs-dir", str(tmp_path)]
    env = job_env(
        NP="4",
        HOSTS=f"{cluster.addrs[0]}:2,{cluster.addrs[1]}:2",
        MPIEXEC_ARGS=f"-launcher ssh -launcher-exec {shell} -iface eth0",
        MPIEXEC=str(Path(sys.executable).parent / "mpiexec"),
        # The host name resolves to 127.0.0.1 on every host: name rank 0's address and a port,
        # so no MPI traffic (mpi4py's rendezvous, which dials by host name) is needed either.
        MASTER_ADDR=cluster.addrs[0],
        MASTER_PORT=str(PORT),
        GLOO_SOCKET_IFNAME="eth0",
    )
    t0 = time.time()
    node = Launched(
        cluster.popen(0, ["bash", "launch/mpirun.sh", *TINY, *common, "--name", "mpi"], env=env, cwd=REPO)
    )
    try:
        code = node.wait(150)
    except AssertionError:
        left = {h: cluster.pids(h) for h in (0, 1)}
        ps = subprocess.run(
            ["ps", "-o", "pid,stat,wchan:20,args", "-p", ",".join(str(p) for v in left.values() for p in v)],
            capture_output=True,
            text=True,
        ).stdout
        raise AssertionError(f"still running: {left}\n{ps}\n{node.text[-2000:]}") from None
    assert code == 0, node.text[-4000:]
    elapsed = time.time() - t0
    assert "ddp on 4 rank(s)" in node.text
    assert cluster.addrs[1] in calls.read_text().split()  # ranks were started on host B
    run_ok([sys.executable, "-m", "sai_dist.train", *TINY, *common, "--nproc", "4", "--name", "one"])
    assert_losses_close(losses(tmp_path / "mpi"), losses(tmp_path / "one"))
    print(f"\nmpirun over 2 hosts x 2 ranks: {elapsed:.1f} s")
