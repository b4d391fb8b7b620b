"""mtl_jax.launch: N workers joined by jax.distributed (gloo on CPU), watched, and always all stopped."""
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mtl_jax import launch as L

PY = sys.executable

# A worker: joins the others, prints its pid, then does what argv[1] says (worker 1 misbehaves).
WORKER = textwrap.dedent("""
    import os, signal, sys, time
    mode, join = sys.argv[1], sys.argv[2] == "join"
    if join:
        from mtl_jax.launch import initialize
        initialize()
    me = int(os.environ["MTL_JAX_PROCESS_ID"])
    print(f"pid {os.getpid()}", flush=True)
    if me == 1:
        if mode == "kill":
            time.sleep(0.5)
            print(f"dying at {time.time()!r}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "exit3":
            from mtl_jax.launch import exit_worker
            print(f"dying at {time.time()!r}", flush=True)
            exit_worker(3)      # sys.exit(3) would wait in JAX's shutdown barrier for the others
        if mode == "raise":
            print(f"dying at {time.time()!r}", flush=True)
            raise RuntimeError("a bug in worker 1")
    if mode == "kill" and me == 0:
        # Worker 0 waits in a cross-process all-reduce that worker 1 never joins.
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        mesh = Mesh(np.array(jax.devices()), ("p",))
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("p")), np.ones(1), (2,))
        print(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x), flush=True)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
    time.sleep(600)
""")


def worker(mode, join=False):
    """The argv of WORKER; ``join``: call ``initialize()`` first (slower: JAX starts)."""
    return [PY, "-c", WORKER, mode, "join" if join else "plain"]


def _group_members(pgid):
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_all_gone(pids):
    assert pids
    left = [pid for pid in pids if _alive(pid) or _group_members(pid)]
    assert not left, f"left behind: {left}"


def pids_in(text):
    return [int(p) for p in re.findall(r"^\[worker \d+\] pid (\d+)$", text, re.MULTILINE)]


# ----------------------------------------------------------------------------- worker side

def test_free_port_is_bindable():
    import socket

    port = L.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_settings_from_arguments_environment_or_one_process(monkeypatch):
    for name in (L.ENV_COORDINATOR, L.ENV_NUM_PROCESSES, L.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert L.distributed_settings() == (0, 1, None)
    assert L.initialize() == (0, 1)      # a single process: nothing to join
    assert L.distributed_settings(1, 2, "h:1") == (1, 2, "h:1")
    monkeypatch.setenv(L.ENV_COORDINATOR, "node0:1234")
    monkeypatch.setenv(L.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(L.ENV_PROCESS_ID, "3")
    assert L.distributed_settings() == (3, 4, "node0:1234")
    with pytest.raises(ValueError, match="process_id"):
        L.distributed_settings(process_id=4)
    monkeypatch.delenv(L.ENV_COORDINATOR)
    with pytest.raises(ValueError, match="coordinator"):
        L.distributed_settings()
    monkeypatch.setenv(L.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="not an integer"):
        L.distributed_settings()


def test_bad_launch_arguments():
    with pytest.raises(ValueError, match="command"):
        L.launch("python -c pass", 2)
    with pytest.raises(ValueError, match="num_processes"):
        L.launch([PY, "-c", "pass"], 0)
    with pytest.raises(ValueError, match="timeout"):
        L.launch([PY, "-c", "pass"], 1, timeout=0)
    with pytest.raises(FileNotFoundError):
        L.launch(["/nonexistent/mtl-jax-worker"], 2)


# ----------------------------------------------------------------------------- launching

@pytest.mark.slow
def test_two_processes_compute_the_global_sum(capsys):
    assert L.launch([PY, "-m", "mtl_jax.launch", "--selftest"], 2, timeout=120) == 0
    out = capsys.readouterr().out
    assert "[worker 0] selftest ok: 2 processes, 2 devices (cpu), global sum 66 (expected 66)" in out
    assert "[worker 1] selftest ok" not in out       # printed by process 0 only


def test_output_is_prefixed_and_all_exit_zero():
    out = io.StringIO()
    code = "import os; print('hello from', os.environ['MTL_JAX_PROCESS_ID'], 'of', os.environ['MTL_JAX_NUM_PROCESSES'])"
    assert L.launch([PY, "-c", code], 3, output=out) == 0
    lines = sorted(out.getvalue().splitlines())
    assert lines == [f"[worker {i}] hello from {i} of 3" for i in range(3)]


@pytest.mark.slow
def test_a_killed_worker_stops_all_and_is_named():
    out = io.StringIO()
    with pytest.raises(L.LaunchError) as info:
        L.launch(worker("kill", join=True), 2, output=out, timeout=120, grace=2)
    reported = time.time()
    e = info.value
    died = float(re.search(r"dying at ([0-9.]+)", out.getvalue()).group(1))
    assert reported - died < 60
    print(f"killed worker reported {reported - died:.2f} s after its death")
    assert e.process_id == 1 and e.reason == "signal" and e.returncode == -signal.SIGKILL
    assert e.exit_code == 128 + signal.SIGKILL
    assert f"worker 1 (pid {e.pid}) was killed by SIGKILL" in str(e)
    assert sorted(pids_in(out.getvalue())) == sorted(e.pids)
    assert_all_gone(e.pids)


@pytest.mark.parametrize("join", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_worker_exiting_3_is_named_and_the_others_stopped(join):
    out = io.StringIO()
    launcher = L.Launcher(worker("exit3", join), 3, output=out, grace=10, timeout=120)
    with launcher, pytest.raises(L.LaunchError) as info:
        launcher.start()
        launcher.wait()
    reported = time.time()
    e = info.value
    assert (e.process_id, e.returncode, e.reason, e.exit_code) == (1, 3, "exit", 3)
    assert f"worker 1 (pid {launcher.pids[1]}) exited with code 3" in str(e)
    assert "last output of worker 1:" in str(e) and "dying at" in str(e)
    # SIGTERM ends the others at once (JAX's preemption service, which would catch it, is off).
    assert [p.returncode for p in launcher.processes] == [-signal.SIGTERM, 3, -signal.SIGTERM]
    died = float(re.search(r"dying at ([0-9.]+)", out.getvalue()).group(1))
    print(f"exit 3 ({'joined' if join else 'plain'}) reported {reported - died:.2f} s after it")
    assert reported - died < 10
    assert_all_gone(launcher.pids)


@pytest.mark.slow
def test_an_uncaught_exception_ends_a_joined_worker_at_once():
    out = io.StringIO()
    with pytest.raises(L.LaunchError) as info:
        L.launch(worker("raise", join=True), 2, output=out, grace=10, timeout=120)
    reported = time.time()
    e = info.value
    assert (e.process_id, e.returncode) == (1, 1)
    assert "RuntimeError: a bug in worker 1" in str(e)
    died = float(re.search(r"dying at ([0-9.]+)", out.getvalue()).group(1))
    assert reported - died < 10
    assert_all_gone(e.pids)


def test_a_hanging_worker_is_reported_after_the_timeout():
    out = io.StringIO()
    start = time.monotonic()
    with pytest.raises(L.LaunchError) as info:
        L.launch(worker("sleep"), 2, timeout=3, output=out, grace=1)
    assert time.monotonic() - start < 20
    e = info.value
    assert e.reason == "timeout" and e.returncode is None and e.exit_code == L.EXIT_TIMEOUT
    assert f"worker 0 (pid {e.pids[0]}) still running after the time-out of 3 s" in str(e)
    assert_all_gone(e.pids)


def test_a_silent_worker_is_reported_as_hanging_unless_it_beats():
    with pytest.raises(L.LaunchError) as info:
        L.launch(worker("sleep"), 2, heartbeat=1.5, output=False, grace=1, timeout=60)
    e = info.value
    assert e.reason == "hang" and "hangs: no output or heartbeat for 1.5 s" in str(e)
    assert_all_gone(e.pids)
    # Silent for 2.5 s but beating: loads launch.py by path (importing the package can take 1.5 s here).
    beating = textwrap.dedent(f"""
        import importlib.util, time
        spec = importlib.util.spec_from_file_location("launch", {L.__file__!r})
        launch = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(launch)
        for _ in range(25):
            launch.heartbeat()
            time.sleep(0.1)
    """)
    assert L.launch([PY, "-c", beating], 2, heartbeat=1.5, output=False, timeout=60) == 0


def test_a_worker_ignoring_sigterm_is_killed_after_the_grace_period():
    out = io.StringIO()
    launcher = L.Launcher(worker("stubborn"), 2, timeout=2, output=out, grace=1)
    with launcher, pytest.raises(L.LaunchError, match="time-out"):
        launcher.start()
        launcher.wait()
    assert "ignoring SIGTERM" in out.getvalue()
    assert [p.returncode for p in launcher.processes] == [-signal.SIGKILL] * 2
    assert_all_gone(launcher.pids)


def _launcher_in_a_subprocess(join, tmp, sigint_ignored=False):
    """``python -m mtl_jax.launch --processes 2 -- WORKER sleep``, once both workers printed their pids
    (``sigint_ignored``: started as a shell starts a background job, with SIGINT ignored)."""
    shell = ["sh", "-c", 'trap "" INT; exec "$0" "$@"'] if sigint_ignored else []
    proc = subprocess.Popen(shell + [PY, "-m", "mtl_jax.launch", "--processes", "2", "--grace", "2", "--"]
                            + worker("sleep", join), env=dict(os.environ, TMPDIR=str(tmp)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 60
    while len(pids_in("".join(lines))) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    pids = pids_in("".join(lines))
    assert len(pids) == 2, "".join(lines) + proc.stderr.read()
    return proc, pids


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, message, ignored", [(signal.SIGINT, 130, "interrupted", False),
                                                            (signal.SIGINT, 130, "interrupted", True),
                                                            (signal.SIGTERM, 143, "SIGTERM", False)])
def test_ctrl_c_or_sigterm_to_the_launcher_stops_all_workers(signum, code, message, ignored, tmp_path):
    # ignored: a launcher started in the background by a script (SIGINT ignored) still stops on SIGINT
    proc, pids = _launcher_in_a_subprocess(signum == signal.SIGINT, tmp_path, sigint_ignored=ignored)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert message in err and "all workers stopped" in err
    assert_all_gone(pids)
    assert not list(tmp_path.iterdir())     # the heartbeat files removed


def test_the_launcher_cli_propagates_a_worker_exit_code():
    code = "import os, sys, time; sys.exit(3) if os.environ['MTL_JAX_PROCESS_ID'] == '1' else time.sleep(600)"
    result = subprocess.run([PY, "-m", "mtl_jax.launch", "--processes", "2", "--grace", "1", "--", PY, "-c", code],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3
    assert re.search(r"error: worker 1 \(pid \d+\) exited with code 3; all workers stopped", result.stderr)


def test_workers_die_with_a_killed_launcher(tmp_path):
    proc, pids = _launcher_in_a_subprocess(False, tmp_path)   # (its heartbeat folder stays in tmp_path)
    proc.kill()            # no chance to clean up: the kernel kills the workers (PR_SET_PDEATHSIG)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_all_gone(pids)


def test_exit_worker_outside_a_distributed_run_is_sys_exit():
    with pytest.raises(SystemExit) as info:
        L.exit_worker(3)
    assert info.value.code == 3
    with pytest.raises(SystemExit) as info:
        L.run_worker(lambda: None)
    assert info.value.code == 0
