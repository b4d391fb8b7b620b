"""One JAX program in N worker processes: JAX's own multi-controller runtime, started and watched.

Every worker runs the same program (single program, multiple data). :func:`initialize` joins the
worker to the others through ``jax.distributed.initialize`` (a coordination service hosted by process
0); afterwards ``jax.devices()`` lists the devices of all processes, ``jax.local_devices()`` this
process's, and a jitted computation over a mesh of all devices runs its collectives across
processes: on CPU through gloo (set here, before the runtime starts), on GPUs through NCCL (JAX's
default, left alone; the gloo setting concerns the CPU client only).

:func:`launch` starts the N workers on this host, each in its own process group, with a fresh
coordinator port and the environment below; it prefixes their output (``[worker 1] ...``) and watches
them. A worker that exits non-zero or is killed, hangs (no output and no :func:`heartbeat` for
``heartbeat`` seconds) or outlives ``timeout`` stops all of them (SIGTERM, SIGKILL after ``grace``
seconds) and raises :class:`LaunchError` naming it (process id, pid, exit code or signal). Ctrl-C
(or SIGTERM to the launcher) stops all workers too. No worker outlives :func:`launch`; on Linux a
worker is also killed if the launcher itself dies (``PR_SET_PDEATHSIG``).

    from mtl_jax.launch import launch
    launch([sys.executable, "-m", "mtl_jax.launch", "--selftest"], 2)       # 0, or LaunchError

    python -m mtl_jax.launch --processes 2 --selftest                  # the same from the shell
    python -m mtl_jax.launch --processes 4 --timeout 600 -- python my_worker.py --flag

Environment of a worker (set by :func:`launch`, read by :func:`initialize` called without arguments):

* ``MTL_JAX_COORDINATOR``: ``host:port`` of the coordination service (process 0 binds it);
* ``MTL_JAX_NUM_PROCESSES``: the number of processes;
* ``MTL_JAX_PROCESS_ID``: this process's id, 0 .. N-1;
* ``MTL_JAX_HEARTBEAT_FILE``: a file whose modification time :func:`heartbeat` refreshes.

Several hosts (no launcher; the same worker command on every host, the variables set by hand)::

    # host 0 (reachable as node0 by the others; the port must be free on node0 and open to them):
    MTL_JAX_COORDINATOR=node0:12345 MTL_JAX_NUM_PROCESSES=2 MTL_JAX_PROCESS_ID=0 python my_worker.py
    # host 1:
    MTL_JAX_COORDINATOR=node0:12345 MTL_JAX_NUM_PROCESSES=2 MTL_JAX_PROCESS_ID=1 python my_worker.py

The coordinator address is always host 0's (process 0 serves it), every process gets its own id,
and all start within ``initialization_timeout`` seconds of each other. With several GPUs per host and
one process per GPU, give each process its devices (``CUDA_VISIBLE_DEVICES`` or
``JAX_LOCAL_DEVICE_IDS``; :func:`launch` does this with ``devices_per_process``). On GPUs NCCL is JAX's
default and needs nothing here; on CPUs gloo is used (``JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi``
in the environment chooses MPI instead).

A worker program: ``initialize()`` first, then the work, then ``exit_worker(code)`` (or the whole
thing as ``run_worker(main)``): a worker that fails must end at once rather than wait, in JAX's
shutdown barrier at exit, for the others to finish (an uncaught exception is handled so by
:func:`initialize`; a plain ``sys.exit(2)`` is not). JAX's preemption service, which would catch
SIGTERM, is turned off, so stopping a worker takes no grace period even inside a collective.

Inside a worker, a global array is built from each process's rows with
``jax.make_array_from_process_local_data(sharding, local_rows, global_shape)`` and brought back whole
with ``jax.experimental.multihost_utils.process_allgather(array, tiled=True)`` (see :func:`selftest`).
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

ENV_COORDINATOR = "MTL_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MTL_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MTL_JAX_PROCESS_ID"
ENV_HEARTBEAT = "MTL_JAX_HEARTBEAT_FILE"

EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


# ----------------------------------------------------------------------------- worker side

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the coordinator's; another process could take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def distributed_settings(process_id=None, num_processes=None, coordinator=None) -> tuple[int, int, str | None]:
    """``(process_id, num_processes, coordinator)``: the arguments, else the ``MTL_JAX_*`` variables, else one process.

    Raises ``ValueError`` on an incomplete or inconsistent setting (several processes without a
    coordinator, an id outside 0 .. N-1, a number that is not an integer).
    """
    def number(value, name):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: not an integer: {value!r}") from None

    env = os.environ
    if num_processes is None:
        num_processes = number(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES) if env.get(ENV_NUM_PROCESSES) else 1
    if process_id is None:
        process_id = number(env[ENV_PROCESS_ID], ENV_PROCESS_ID) if env.get(ENV_PROCESS_ID) else 0
    if coordinator is None:
        coordinator = env.get(ENV_COORDINATOR) or None
    num_processes, process_id = number(num_processes, "num_processes"), number(process_id, "process_id")
    if num_processes < 1:
        raise ValueError(f"num_processes: must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: must be between 0 and {num_processes - 1}, got {process_id}")
    if num_processes > 1 and not coordinator:
        raise ValueError(f"{num_processes} processes need a coordinator address host:port ({ENV_COORDINATOR})")
    return process_id, num_processes, coordinator


def initialize(process_id: int | None = None, num_processes: int | None = None, coordinator: str | None = None,
               *, preemption_service: bool = False, fail_fast: bool = True, **kwargs) -> tuple[int, int]:
    """Join this process to the others: ``jax.distributed.initialize`` with gloo for CPU collectives.

    Arguments left out are read from ``MTL_JAX_PROCESS_ID``, ``MTL_JAX_NUM_PROCESSES`` and
    ``MTL_JAX_COORDINATOR``; with none of them set this is a single process and nothing is
    initialised. Must run before anything else in JAX touches a device. ``kwargs`` go to
    ``jax.distributed.initialize`` (e.g. ``initialization_timeout``, ``local_device_ids``). Calling it
    again in an initialised process does nothing. Returns ``(process_id, num_processes)``.

    ``preemption_service``: JAX's preemption service catches SIGTERM (a worker then keeps running
    and must be SIGKILLed); off by default, so SIGTERM ends a worker at once, even one waiting in a
    collective. ``fail_fast``: an uncaught exception prints its traceback and ends the process at
    once (``os._exit(1)``) instead of waiting at exit, in JAX's shutdown barrier, for the processes
    that are still working (which would look like a hang). A non-zero ``sys.exit`` has the same
    problem: end a worker through :func:`exit_worker` or :func:`run_worker`.
    """
    process_id, num_processes, coordinator = distributed_settings(process_id, num_processes, coordinator)
    if num_processes == 1:
        return 0, 1
    import jax

    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    if not preemption_service:
        try:
            jax.config.update("jax_enable_preemption_service", False)
        except (AttributeError, KeyError, ValueError):   # a JAX without the option
            pass
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        # The CPU client's cross-process collectives; GPU clients keep their own (NCCL).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    host, _, port = coordinator.rpartition(":")
    if host in _LOOPBACK and "coordinator_bind_address" not in kwargs \
            and not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        kwargs["coordinator_bind_address"] = f"{host if host != 'localhost' else '127.0.0.1'}:{port}"
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **kwargs)
    if fail_fast and not getattr(sys.excepthook, "_mtl_jax_fail_fast", False):
        sys.excepthook = _fail_fast_hook(sys.excepthook)
    return process_id, num_processes


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _fail_fast_hook(previous):
    def hook(kind, value, tb):
        try:
            previous(kind, value, tb)
        finally:
            _flush()
            os._exit(EXIT_INTERRUPTED if issubclass(kind, KeyboardInterrupt) else 1)

    hook._mtl_jax_fail_fast = True
    return hook


def _distributed() -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def exit_worker(code=0):
    """End this worker with ``code`` (``sys.exit`` semantics: None is 0, a string is printed and 1).

    0 is a normal exit (JAX's shutdown waits for every process, as it should); anything else in a
    process joined by :func:`initialize` is ``os._exit(code)`` after flushing output, so that the
    failure reaches the launcher now rather than after the others finish or time out.
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    if code != 0 and _distributed():
        _flush()
        os._exit(code)
    sys.exit(code)


def run_worker(main, *args, **kwargs):
    """``exit_worker(main(*args, **kwargs))``: an exception or a ``SystemExit`` ends the worker at once too."""
    try:
        code = main(*args, **kwargs)
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        code = EXIT_INTERRUPTED
    except BaseException:  # noqa: BLE001 -- any failure ends the worker, with its traceback
        import traceback

        traceback.print_exc()
        code = 1
    exit_worker(code)


def heartbeat() -> None:
    """Tell the launcher this worker is alive (refreshes its heartbeat file); a no-op outside :func:`launch`.

    A worker that computes longer than the launcher's ``heartbeat`` seconds without printing should
    call this now and then (e.g. once per round), or it is reported as hanging.
    """
    path = os.environ.get(ENV_HEARTBEAT)
    if path:
        try:
            os.utime(path)
        except OSError:
            pass


def selftest() -> int:
    """The worker of the self-test: a global array over all processes' devices, a jitted sum, a gather.

    Process ``p`` contributes the rows ``p*L*2 .. (p+1)*L*2 - 1`` of ``arange(D*2*3).reshape(D*2, 3)``
    (``L`` its devices, ``D`` all devices); every process checks the all-reduced sum and the gathered
    array; process 0 prints the result. Returns 0, or raises ``AssertionError``.
    """
    process_id, num_processes = initialize()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices), ("processes",))
    rows_per_device, cols = 2, 3
    num_rows = len(devices) * rows_per_device
    first = sum(d.process_index < jax.process_index() for d in devices) * rows_per_device
    local_rows = jax.local_device_count() * rows_per_device
    everything = np.arange(num_rows * cols, dtype=np.float32).reshape(num_rows, cols)
    local = everything[first:first + local_rows]
    array = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("processes")), local,
                                                   everything.shape)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(array)
    total = float(total.addressable_data(0))
    expected = float(everything.sum())
    assert total == expected, f"process {process_id}: global sum {total}, expected {expected}"
    gathered = np.asarray(multihost_utils.process_allgather(array, tiled=True))
    assert np.array_equal(gathered, everything), f"process {process_id}: the gathered array differs"
    if process_id == 0:
        print(f"selftest ok: {num_processes} processes, {len(devices)} devices "
              f"({jax.default_backend()}), global sum {total:g} (expected {expected:g})", flush=True)
    return 0


# ----------------------------------------------------------------------------- launcher side

class LaunchError(RuntimeError):
    """A worker failed, hung or timed out; all workers have been stopped.

    ``process_id``, ``pid``: the worker blamed; ``returncode``: its exit status as ``Popen`` reports
    it (negative: killed by that signal; None: it was still running, a hang or time-out);
    ``reason``: ``"exit"``, ``"signal"``, ``"timeout"`` or ``"hang"``; ``pids``: all workers' pids;
    ``exit_code``: a code for the launcher to exit with (the worker's, 128 + signal, or 124).
    """

    def __init__(self, message, *, process_id, pid, returncode, reason, pids=()):
        super().__init__(message)
        self.process_id, self.pid, self.returncode, self.reason = process_id, pid, returncode, reason
        self.pids = list(pids)

    @property
    def exit_code(self) -> int:
        if self.returncode is None:
            return EXIT_TIMEOUT
        return self.returncode if self.returncode > 0 else 128 - self.returncode


class Terminated(KeyboardInterrupt):
    """The launcher received SIGTERM (or SIGHUP): the workers were stopped as for Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _death_signal():
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when the launcher dies (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def preexec():
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


class Launcher:
    """N workers running ``command``: :meth:`start`, :meth:`wait` (0 or :class:`LaunchError`), :meth:`stop`.

    Use as a context manager (``stop`` on leaving) or through :func:`launch`. ``pids`` are the workers'
    pids, which are also their process groups.
    """

    def __init__(self, command: Sequence[str], num_processes: int, *, timeout: float | None = None,
                 heartbeat: float | None = 60.0, grace: float = 5.0, env: dict | None = None, output=None,
                 coordinator: str | None = None, devices_per_process: int | None = None, poll: float = 0.1):
        if isinstance(command, (str, bytes)) or not command:
            raise ValueError("command: a non-empty list of arguments, e.g. [sys.executable, '-m', 'mtl_jax', ...]")
        if int(num_processes) < 1:
            raise ValueError(f"num_processes: must be at least 1, got {num_processes}")
        for name, value in (("timeout", timeout), ("heartbeat", heartbeat)):
            if value is not None and not value > 0:
                raise ValueError(f"{name}: must be positive or None, got {value}")
        self.command = [os.fspath(a) for a in command]
        self.num_processes = int(num_processes)
        self.timeout, self.heartbeat, self.grace, self.poll = timeout, heartbeat, float(grace), float(poll)
        self.env = dict(os.environ if env is None else env)
        self.output = output
        self.coordinator = coordinator
        self.devices_per_process = devices_per_process
        self.processes: list[subprocess.Popen] = []
        self.tails: list[collections.deque] = []
        self._last_output: list[float] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._folder = None
        self._started = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- starting

    def start(self) -> Launcher:
        """Start the workers (all before any output is read, so no thread exists during the forks)."""
        if self.processes:
            raise RuntimeError("already started")
        out = sys.stdout if self.output is None else self.output
        self._out = out
        self._folder = tempfile.TemporaryDirectory(prefix="mtl_jax_launch_")
        coordinator = self.coordinator or f"127.0.0.1:{free_port()}"
        preexec = _death_signal()
        self._started = time.monotonic()
        for i in range(self.num_processes):
            beat = os.path.join(self._folder.name, f"heartbeat.{i}")
            open(beat, "w").close()
            env = dict(self.env)
            env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(self.num_processes),
                        ENV_PROCESS_ID: str(i), ENV_HEARTBEAT: beat, "PYTHONUNBUFFERED": "1"})
            if self.devices_per_process:
                k = int(self.devices_per_process)
                env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(j) for j in range(i * k, (i + 1) * k))
            # preexec_fn only calls prctl; no thread of ours runs yet (the readers start after the forks).
            process = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, process_group=0,
                                       preexec_fn=preexec)  # noqa: PLW1509
            self.processes.append(process)
            self.tails.append(collections.deque(maxlen=20))
            self._last_output.append(time.monotonic())
        for i, process in enumerate(self.processes):
            thread = threading.Thread(target=self._pump, args=(i, process.stdout), daemon=True,
                                      name=f"mtl_jax-launch-worker-{i}")
            thread.start()
            self._threads.append(thread)
        return self

    def _pump(self, i, stream):
        prefix = f"[worker {i}] "
        try:
            for raw in iter(stream.readline, b""):
                self._last_output[i] = time.monotonic()
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.tails[i].append(line)
                if self._out is not False:
                    with self._lock:
                        try:
                            self._out.write(prefix + line + "\n")
                            self._out.flush()
                        except (OSError, ValueError):
                            pass
        except (OSError, ValueError):
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    # -- watching

    def _silent_for(self, i, now) -> float:
        since_output = now - self._last_output[i]
        try:
            since_beat = time.time() - os.stat(os.path.join(self._folder.name, f"heartbeat.{i}")).st_mtime
        except OSError:
            since_beat = since_output
        return min(since_output, since_beat)

    def _describe(self, i, detail) -> str:
        return f"worker {i} (pid {self.processes[i].pid}) {detail}"

    def _error(self, i, detail, reason, others_failed=()) -> LaunchError:
        process = self.processes[i]
        lines = [self._describe(i, detail) + "; all workers stopped"]
        lines += [f"also {self._describe(j, d)}" for j, d in others_failed]
        tail = list(self.tails[i])[-10:]
        if tail:
            lines.append(f"last output of worker {i}:")
            lines += [f"  {line}" for line in tail]
        returncode = process.returncode if reason in ("exit", "signal") else None
        return LaunchError("\n".join(lines), process_id=i, pid=process.pid,
                           returncode=returncode, reason=reason, pids=self.pids)

    @staticmethod
    def _exit_detail(code) -> tuple[str, str]:
        if code < 0:
            return f"was killed by {_signal_name(-code)}", "signal"
        return f"exited with code {code}", "exit"

    def wait(self) -> int:
        """Watch the workers until all exit 0 (returns 0) or one fails (stops all, raises :class:`LaunchError`)."""
        if not self.processes:
            raise RuntimeError("not started")
        error = None
        try:
            while True:
                now = time.monotonic()
                codes = [p.poll() for p in self.processes]
                failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                running = [i for i, c in enumerate(codes) if c is None]
                if failed:
                    details = [(i, self._exit_detail(c)) for i, c in failed]
                    i, (detail, reason) = details[0]
                    error = (i, detail, reason, [(j, d) for j, (d, _) in details[1:]])
                    break
                if not running:
                    break
                if self.timeout is not None and now - self._started > self.timeout:
                    i = running[0]
                    names = ", ".join(str(j) for j in running)
                    detail = f"still running after the time-out of {self.timeout:g} s (worker(s) {names} still running)"
                    error = (i, detail, "timeout", [])
                    break
                if self.heartbeat is not None:
                    silent = [i for i in running if self._silent_for(i, now) > self.heartbeat]
                    if silent:
                        error = (silent[0], f"hangs: no output or heartbeat for {self.heartbeat:g} s", "hang",
                                 [(j, "hangs too") for j in silent[1:]])
                        break
                time.sleep(self.poll)
        finally:
            self.stop()
        if error is not None:
            raise self._error(*error)
        return 0

    # -- stopping

    def stop(self) -> None:
        """SIGTERM every worker's process group, SIGKILL after ``grace`` seconds, reap; idempotent.

        A second Ctrl-C during the grace period goes straight to SIGKILL (and is raised afterwards).
        """
        interrupted = None
        if self.processes:
            for process in self.processes:
                if process.poll() is None:
                    self._signal_group(process, signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            try:
                while any(p.poll() is None for p in self.processes) and time.monotonic() < deadline:
                    time.sleep(0.02)
            except KeyboardInterrupt as e:
                interrupted = e
            for process in self.processes:
                # Also the exited ones: whatever is left of their process groups.
                self._signal_group(process, signal.SIGKILL)
            for process in self.processes:
                process.wait()
            for thread in self._threads:
                thread.join(timeout=5)
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
        if interrupted is not None:
            raise interrupted

    @staticmethod
    def _signal_group(process, signum):
        try:
            os.killpg(process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def launch(command: Sequence[str], num_processes: int, *, timeout: float | None = None,
           heartbeat: float | None = 60.0, grace: float = 5.0, env: dict | None = None, output=None,
           coordinator: str | None = None, devices_per_process: int | None = None) -> int:
    """Run ``command`` in ``num_processes`` workers joined by JAX's runtime; 0 when all exit 0.

    ``command``: the argv of every worker (e.g. ``[sys.executable, "-m", "mtl_jax", "fit", ...]``),
    whose program calls :func:`initialize` first. ``timeout``: seconds for the whole run (None: no
    limit). ``heartbeat``: seconds a running worker may go without a line of output or a
    :func:`heartbeat` before it counts as hung (None: never). ``grace``: seconds between SIGTERM and
    SIGKILL when stopping. ``env``: the workers' base environment (default ``os.environ``).
    ``output``: where the prefixed lines go (default ``sys.stdout``; ``False``: nowhere).
    ``coordinator``: ``host:port`` (default: a free localhost port). ``devices_per_process``: give
    worker ``i`` the devices ``i*k .. (i+1)*k - 1`` (``JAX_LOCAL_DEVICE_IDS``, GPUs).

    Raises :class:`LaunchError` (a worker failed, hung or timed out) and re-raises
    ``KeyboardInterrupt`` (Ctrl-C; :class:`Terminated` for SIGTERM/SIGHUP), every time after all
    workers are stopped and reaped.
    """
    launcher = Launcher(command, num_processes, timeout=timeout, heartbeat=heartbeat, grace=grace, env=env,
                        output=output, coordinator=coordinator, devices_per_process=devices_per_process)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def terminated(signum, frame):
            raise Terminated(signum)

        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, terminated)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # A shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C
            # handler: the launcher would outlive `kill -INT` with its workers running.
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with launcher:
            launcher.start()
            return launcher.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    """``python -m mtl_jax.launch``: ``--selftest`` (a worker), ``--processes N [-- COMMAND ...]`` (the launcher)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m mtl_jax.launch",
        description="Run one JAX program in N worker processes on this host (jax.distributed; gloo on CPU).",
        epilog="examples:\n  python -m mtl_jax.launch --processes 2 --selftest\n"
               "  python -m mtl_jax.launch --processes 2 -- python -m mtl_jax.launch --selftest",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, help="launch this many workers running COMMAND (after --)")
    parser.add_argument("--selftest", action="store_true",
                        help="with --processes: launch the self-test; without: be a self-test worker")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole run (default: none)")
    parser.add_argument("--heartbeat", type=float, default=60.0,
                        help="seconds without output before a worker counts as hung (0: never; default 60)")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds from SIGTERM to SIGKILL (default 5)")
    args = parser.parse_args(argv)
    if args.processes is None:
        if not args.selftest or command:
            parser.error("give --processes N and a COMMAND after --, or --selftest")
        run_worker(selftest)
    if args.processes < 1:
        parser.error("--processes: must be at least 1")
    if args.selftest:
        if command:
            parser.error("--selftest with --processes launches the self-test; give no COMMAND")
        command = [sys.executable, "-m", "mtl_jax.launch", "--selftest"]
    if not command:
        parser.error("no COMMAND after --")
    try:
        return launch(command, args.processes, timeout=args.timeout, heartbeat=args.heartbeat or None,
                      grace=args.grace)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except Terminated as e:
        print(f"error: {e.args[0]}: all workers stopped", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("error: interrupted: all workers stopped", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
