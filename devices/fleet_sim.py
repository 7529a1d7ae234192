"""Simulated fleets for load tests of the backend: ``edgeadapt fleet-sim``.

Each simulated device is a real field device: its own device root (provisioned, flashed through
the A/B health gate), the real :class:`devices.runner.FieldRunner` (the runtime ``Agent`` on
onnxruntime, the simulated plant, safe mode, commands) and the real telemetry client with its
persisted SQLite outbox, publishing to an MQTT broker. Bundles of any family (PEARL, RL², MAML)
run side by side: device ``k`` runs bundle ``k mod len(bundles)``.

Devices are grouped into *hosts* of ``per_host`` devices; one paced loop steps all devices of a
host (each device keeps its own telemetry client threads), so a core carries hundreds of them:

- with ``ray`` set, every host is a Ray actor (``local``: Ray started on this machine; ``auto``
  or an address: a running cluster joined), so a fleet spreads over a cluster's nodes;
- without it, every host is a local child process.

Each bundle is flashed once into a template device root (one real health gate per bundle); the
template travels to the hosts as a tar archive (through Ray's object store) and every device
unpacks its own copy, so device roots never share files.

Ray is imported only when ``ray`` is set, and only here: nothing on the device side imports
this module (``tests/test_device_side_no_torch.py`` checks both).
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError, EdgeadaptError

log = logging.getLogger(__name__)

#: Telemetry batches of a simulated device leave at least this often (s): fewer, larger messages
#: than a single robot's default keep hundreds of clients per core affordable.
DEFAULT_BATCH_PERIOD_S = 0.2
#: Per-step trace entries a simulated device keeps (its runner's trace is trimmed to this).
TRACE_KEEP = 1000
RAY_MISSING = "fleet-sim --ray needs Ray: pip install 'edgeadapt[ray]'"


@dataclass(frozen=True)
class FleetOptions:
    """What to simulate (rates in Hz, times in s)."""

    devices: int
    bundles: tuple[str, ...]
    broker: str  #: mqtt://host:port
    rate_hz: float = 10.0
    duration_s: float = 10.0
    pubkey: str | None = None  #: trusted key of signed bundles (devices then require it)
    fleet: str = "sim"
    prefix: str = "sim"  #: device ids are ``{prefix}-{k:04d}``
    profile: str = "x86-cpu"
    per_host: int = 100
    batch_period_s: float = DEFAULT_BATCH_PERIOD_S
    drain_s: float = 60.0
    ray: str | None = None  #: None: local processes; "local", "auto" or an address: Ray actors
    host_cpus: float = 0.5  #: CPUs Ray reserves per host actor (at most CPUs / hosts)
    seed: int = 0


@dataclass(frozen=True)
class HostSpec:
    """One host's share of the fleet (picklable: it crosses process and Ray boundaries)."""

    index: int
    first: int
    count: int
    templates: tuple[bytes, ...]  #: tar archives of the flashed template device roots
    broker: str
    fleet: str
    prefix: str
    rate_hz: float
    batch_period_s: float
    drain_s: float
    seed: int


@dataclass
class DeviceResult:
    """What one simulated device did."""

    device: str
    bundle: int  #: index into the fleet's bundles
    algorithm: str
    steps: int = 0
    last_seq: int = 0  #: records it created (seq runs 1..last_seq on a fresh outbox)
    drained: bool = False  #: every record acknowledged by the broker at exit
    late_steps: int = 0  #: steps started more than one control period late (host overloaded)
    missed_deadlines: int = 0  #: steps over the profile's step budget
    step_us_median: float = 0.0  #: the runtime's own step latency (µs), last TRACE_KEEP steps
    error: str | None = None


@dataclass
class FleetResult:
    """The whole fleet's run (JSON-ready through :func:`dataclasses.asdict`)."""

    devices: int
    hosts: int
    mode: str
    rate_hz: float
    duration_s: float
    setup_s: float
    run_s: float
    records: int
    steps: int
    host_cpu_s: float  #: CPU time of the host processes while they ran (s), all hosts
    host_cpu_us_per_step: float  #: that per device step: control loop and telemetry client
    step_hz_per_device_median: float
    late_steps: int
    missed_deadlines: int
    all_drained: bool
    failed: list[str]
    algorithms: dict[str, int]
    nodes: int  #: machines the hosts ran on (Ray nodes; 1 for local processes)
    unconnected_at_start: int  #: devices not connected to the broker when the clock started
    last_seq: dict[str, int] = field(repr=False)


# --- one host ------------------------------------------------------------------------------------
class FleetHost:
    """``spec.count`` field runners in one process, stepped by one paced loop."""

    def __init__(self, spec: HostSpec, workdir: str | None = None) -> None:
        self.spec = spec
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"edgeadapt-fleet-{spec.index}-"))
        self.runners: list[Any] = []
        self.results: list[DeviceResult] = []
        self.unconnected_at_start = 0
        self.steps: list[int] = []

    def setup(self) -> float:
        """Unpack each device root and boot its runner (bundle verified); returns seconds."""
        from devices.runner import FieldRunner, RunnerOptions
        from devices.telemetry.config import TelemetryConfig

        t0 = time.perf_counter()
        s = self.spec
        for k in range(s.first, s.first + s.count):
            name = f"{s.prefix}-{k:04d}"
            which = k % len(s.templates)
            root = self.workdir / name
            _unpack(s.templates[which], root)
            tele = TelemetryConfig(broker=s.broker, fleet=s.fleet, device=name,
                                   outbox=str(root / "telemetry-outbox.sqlite"),
                                   batch_period_s=s.batch_period_s)  # fmt: skip
            opts = RunnerOptions(device_root=root, episodes=1_000_000_000, seed=s.seed + k,
                                 rate_hz=s.rate_hz, realtime=False, safe="hold",
                                 telemetry=tele, drain_s=s.drain_s)  # fmt: skip
            runner = FieldRunner(opts)
            self.runners.append(runner)
            alg = str(runner.agent.manifest.algorithm)
            self.results.append(DeviceResult(name, which, alg))
            self.steps.append(0)
        return time.perf_counter() - t0

    def run(self, duration_s: float) -> dict[str, Any]:
        """Step every device at the control rate for ``duration_s``, then stop and drain them.

        One paced loop steps all devices of the host (no thread per control loop: hundreds of
        devices per core). Device ``i`` of ``n`` is due at ``start + j/rate + i/(n*rate)`` in
        tick ``j``, so the fleet's steps spread over the period instead of bursting.
        """
        cpu0 = time.process_time()
        gens: list[Iterator[int] | None] = [r.steps() for r in self.runners]
        for i in range(len(gens)):  # first step: opens the outbox, connects, boots the loop
            self._step(gens, i)
        self.unconnected_at_start = self._wait_connected(60.0)
        period = 1.0 / self.spec.rate_hz
        n = len(gens)
        start = time.perf_counter()
        end = start + duration_s
        tick = 0
        while time.perf_counter() < end:
            base = start + tick * period
            for i in range(n):
                due = base + period * i / n
                delay = due - time.perf_counter()
                if delay > 0.001:  # devices due within 1 ms share one wake-up
                    time.sleep(delay)
                elif delay < -period:
                    self.results[i].late_steps += 1
                self._step(gens, i)
            tick += 1
        self._stop_all(gens)
        cpu_s = time.process_time() - cpu0  # this process: control loops and telemetry clients
        shutil.rmtree(self.workdir, ignore_errors=True)
        return {"devices": [asdict(r) for r in self.results], "cpu_s": cpu_s,
                "unconnected_at_start": self.unconnected_at_start}  # fmt: skip

    def _wait_connected(self, timeout_s: float) -> int:
        """Sleep (the clients' network threads need the GIL) until every device is connected
        to the broker, before the paced clock starts; returns how many are not."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = sum(1 for r in self.runners
                          if r.telemetry is not None and not r.telemetry.connected)  # fmt: skip
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)

    def node(self) -> str:
        """The Ray node this host runs on (called only when hosts are Ray actors)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def _step(self, gens: list[Iterator[int] | None], i: int) -> None:
        """One control step of device ``i``; a device that fails is reported and left out."""
        gen = gens[i]
        if gen is None:
            return
        try:
            self.steps[i] = next(gen)
        except StopIteration:
            gens[i] = None
        except Exception as exc:  # one broken device must not stop the host
            log.exception("simulated device %s failed", self.results[i].device)
            self.results[i].error = f"{type(exc).__name__}: {exc}"[:300]
            gens[i] = None
            return
        if self.steps[i] % TRACE_KEEP == 0:
            self.runners[i].trace.trim(TRACE_KEEP)

    def _stop_all(self, gens: list[Iterator[int] | None]) -> None:
        """Stop every device (the runner ends its episode and drains its outbox), collect."""
        for r in self.runners:
            r.stop()
        # one drain deadline for the whole host; then each device closes without waiting again
        # (what is not drained by then stays in its outbox and the device reports drained=False)
        deadline = time.monotonic() + self.spec.drain_s
        for r in self.runners:
            if r.telemetry is not None:
                r.telemetry.wait_drained(max(deadline - time.monotonic(), 0.0))
            r.opts = replace(r.opts, drain_s=0.0)
        for i, gen in enumerate(gens):
            if gen is not None:
                with contextlib.suppress(StopIteration):
                    while True:  # the stopped run finishes its episode, drains and closes
                        next(gen)
            self._collect(i)

    def _collect(self, i: int) -> None:
        runner, res = self.runners[i], self.results[i]
        summary = runner.trace.summary()
        res.steps = self.steps[i]  # the trace keeps only the last TRACE_KEEP steps
        res.missed_deadlines = summary["missed_deadlines"]
        res.step_us_median = round(summary["step_us_median"], 1)
        if runner.telemetry is not None:
            st = runner.telemetry.stats()
            res.last_seq = st.last_seq
            res.drained = st.queued == 0 and st.stored == 0 and st.inflight_messages == 0


# --- the fleet -----------------------------------------------------------------------------------
def run_fleet(opts: FleetOptions, workdir: str | Path | None = None) -> FleetResult:
    """Provision, start, run and stop the fleet; returns what every device did."""
    check_options(opts)
    with tempfile.TemporaryDirectory(prefix="edgeadapt-fleet-") as tmp:
        base = Path(workdir) if workdir is not None else Path(tmp)
        templates = flash_templates(opts.bundles, opts.pubkey, opts.profile, base / "templates")
        specs = host_specs(opts, templates)
        runner = _run_ray if opts.ray else _run_processes
        setup_s, run_s, hosts = runner(opts, specs, base)
    return _summarize(opts, setup_s, run_s, hosts)


def flash_templates(
    bundles: tuple[str, ...], pubkey: str | None, profile: str, where: Path
) -> tuple[bytes, ...]:
    """Flash each bundle (health gate included) into a fresh device root; return them as tars."""
    from devices.flash import flash
    from devices.slots import init_device

    out = []
    for i, bundle in enumerate(bundles):
        root = where / f"template-{i}"
        init_device(root, profile, pubkey)
        res = flash(bundle, root)
        if not res.ok:
            raise EdgeadaptError(f"{bundle}: the device refused the bundle ({res.reason})")
        out.append(_pack(root))
    return tuple(out)


def host_specs(opts: FleetOptions, templates: tuple[bytes, ...]) -> list[HostSpec]:
    """The fleet cut into hosts of at most ``per_host`` devices."""
    return [
        HostSpec(index=i, first=first, count=min(opts.per_host, opts.devices - first),
                 templates=templates, broker=opts.broker, fleet=opts.fleet, prefix=opts.prefix,
                 rate_hz=opts.rate_hz, batch_period_s=opts.batch_period_s, drain_s=opts.drain_s,
                 seed=opts.seed)
        for i, first in enumerate(range(0, opts.devices, opts.per_host))
    ]  # fmt: skip


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error naming the extra."""
    try:
        import ray
    except ImportError:
        raise EdgeadaptError(RAY_MISSING) from None
    return ray


def _run_ray(
    opts: FleetOptions, specs: list[HostSpec], base: Path
) -> tuple[float, float, list[dict[str, Any]]]:
    """(setup s, run s, each host's :meth:`FleetHost.run` result)."""
    """Every host a Ray actor: set all up, then start all runs together."""
    ray = import_ray()
    if not ray.is_initialized():
        _connect(ray, opts.ray)
    # a reservation every host gets on this cluster (more hosts than CPUs must not wait forever)
    cpus = min(opts.host_cpus, ray.cluster_resources().get("CPU", 1.0) / len(specs))
    actor = ray.remote(num_cpus=cpus, max_restarts=0)(FleetHost)
    hosts = [actor.options(scheduling_strategy="SPREAD").remote(s) for s in specs]
    try:
        t0 = time.perf_counter()
        ray.get([h.setup.remote() for h in hosts])
        nodes = ray.get([h.node.remote() for h in hosts])
        t1 = time.perf_counter()
        results = ray.get([h.run.remote(opts.duration_s) for h in hosts])
        t2 = time.perf_counter()
        for result, node in zip(results, nodes, strict=True):
            result["node"] = node
    finally:
        for h in hosts:
            ray.kill(h)
    return t1 - t0, t2 - t1, results


def _connect(ray: Any, address: str | None) -> None:
    """``local``: start Ray on this machine (workers at this process's niceness: Ray's default
    of 15 starves them on a shared machine); ``auto`` or an address: join that cluster."""
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address in (None, "local"):
        os.environ.setdefault("RAY_worker_niceness", str(os.getpriority(os.PRIO_PROCESS, 0)))
        ray.init(**common)
        return
    try:
        ray.init(address=address, **common)
    except ConnectionError as exc:
        raise ConfigError(f"cannot join the Ray cluster at {address!r}: {exc}") from None


def _run_processes(
    opts: FleetOptions, specs: list[HostSpec], base: Path
) -> tuple[float, float, list[dict[str, Any]]]:
    """(setup s, run s, each host's :meth:`FleetHost.run` result)."""
    """Every host a local child process (spawned: no inherited threads or sockets)."""
    ctx = mp.get_context("spawn")
    ready, done, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_host_process, args=(s, opts.duration_s, ready, done, go),
                         daemon=True) for s in specs]  # fmt: skip
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    try:
        for _ in procs:
            msg = _receive(ready, procs, 600)
            if "error" in msg:
                raise EdgeadaptError(f"fleet host {msg['host']} failed to start: {msg['error']}")
        t1 = time.perf_counter()
        go.set()
        results: list[dict[str, Any]] = []
        for _ in procs:
            msg = _receive(done, procs, opts.duration_s + opts.drain_s + 600)
            if "error" in msg:
                raise EdgeadaptError(f"fleet host {msg['host']} failed: {msg['error']}")
            results.append(msg["result"])
        t2 = time.perf_counter()
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return t1 - t0, t2 - t1, results


def _receive(queue: Any, procs: list[Any], timeout_s: float) -> dict[str, Any]:
    """The next host message; a host process that died without one is an error, not a hang."""
    import queue as queue_module

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=1.0)
        except queue_module.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise EdgeadaptError(
                    f"a fleet host process died (exit code {dead[0].exitcode})"
                ) from None
    raise EdgeadaptError(f"no answer from the fleet hosts in {timeout_s:.0f} s")


def _host_process(spec: HostSpec, duration_s: float, ready: Any, done: Any, go: Any) -> None:
    """Child process body: set up, report ready, wait for the start, run, report."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        host = FleetHost(spec)
        ready.put({"host": spec.index, "setup_s": host.setup()})
    except Exception as exc:
        ready.put({"host": spec.index, "error": f"{type(exc).__name__}: {exc}"[:500]})
        return
    go.wait()
    try:
        done.put({"host": spec.index, "result": host.run(duration_s)})
    except Exception as exc:
        done.put({"host": spec.index, "error": f"{type(exc).__name__}: {exc}"[:500]})


def _summarize(
    opts: FleetOptions, setup_s: float, run_s: float, hosts: list[dict[str, Any]]
) -> FleetResult:
    devices = [d for h in hosts for d in h["devices"]]
    steps = sum(d["steps"] for d in devices)
    cpu_s = sum(h["cpu_s"] for h in hosts)
    rates = [d["steps"] / opts.duration_s for d in devices] or [0.0]
    algs: dict[str, int] = {}
    for d in devices:
        algs[d["algorithm"]] = algs.get(d["algorithm"], 0) + 1
    return FleetResult(
        devices=len(devices), hosts=len(hosts), mode="ray" if opts.ray else "processes",
        rate_hz=opts.rate_hz, duration_s=opts.duration_s, setup_s=round(setup_s, 2),
        run_s=round(run_s, 2), records=sum(d["last_seq"] for d in devices),
        steps=steps, host_cpu_s=round(cpu_s, 2),
        host_cpu_us_per_step=round(1e6 * cpu_s / max(steps, 1), 1),
        step_hz_per_device_median=round(statistics.median(rates), 2),
        late_steps=sum(d["late_steps"] for d in devices),
        missed_deadlines=sum(d["missed_deadlines"] for d in devices),
        all_drained=all(d["drained"] for d in devices),
        failed=[f"{d['device']}: {d['error']}" for d in devices if d["error"]],
        algorithms=algs, nodes=len({h.get("node", "local") for h in hosts}),
        unconnected_at_start=sum(h["unconnected_at_start"] for h in hosts),
        last_seq={d["device"]: d["last_seq"] for d in devices},
    )  # fmt: skip


def check_options(opts: FleetOptions) -> None:
    """Refuse options that cannot run, with a one-line reason."""
    if opts.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {opts.devices}")
    if not opts.bundles:
        raise ConfigError("fleet-sim needs at least one --bundle")
    if not opts.rate_hz > 0 or not opts.duration_s > 0:
        raise ConfigError("--rate and --duration must be > 0")
    if opts.per_host < 1:
        raise ConfigError(f"--per-host must be >= 1, got {opts.per_host}")
    for b in opts.bundles:
        if not Path(b).is_dir():
            raise ConfigError(f"no bundle directory at {b}")
    if opts.ray:
        import_ray()  # fail before any work


# --- device roots as archives --------------------------------------------------------------------
def _pack(root: Path) -> bytes:
    """A device root as a gzip'd tar (bundle files are small ONNX graphs: kB to a few MB)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(root, arcname=".")
    return buf.getvalue()


def _unpack(data: bytes, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=False)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(root, filter="data")


# --- what reached the collector ------------------------------------------------------------------
def broker_url(text: str) -> str:
    """``HOST:PORT`` (or an ``mqtt://``/``mqtts://`` URL) as a broker URL."""
    if text.startswith(("mqtt://", "mqtts://")):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--broker: expected HOST:PORT or mqtt://HOST:PORT, got {text!r}")
    return f"mqtt://{host}:{port}"


def collector_check(db: str | Path, last_seq: dict[str, int], timeout_s: float) -> dict[str, Any]:
    """Wait (up to ``timeout_s``) for every record of ``last_seq``'s devices, then count.

    ``lost``: records a device created (seq 1..last_seq) that the database lacks; ``duplicates``:
    sequence numbers stored twice (the primary key makes it 0 unless a device lost its outbox);
    ``duplicates_dropped``: redelivered copies the collector(s) recognised and dropped.
    """
    from devices.telemetry import collector_db, database

    expected = sum(last_seq.values())
    names = sorted(last_seq)

    def stored() -> int:
        with database.connect(db, readonly=True) as conn:
            marks = ",".join("?" * len(names))
            sql = f"SELECT COUNT(*) FROM records WHERE device IN ({marks})"
            return int(conn.execute(sql, names).fetchone()[0])

    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while stored() < expected and time.monotonic() < deadline:
        time.sleep(0.25)
    waited = time.monotonic() - t0
    with database.connect(db, readonly=True) as conn:
        stats = collector_db.device_stats(conn)
    mine = {d: stats.get(d, {}) for d in names}
    return {
        "expected": expected,
        "stored": sum(s.get("received", 0) for s in mine.values()),
        "lost": sum(max(n - _in_range(mine[d], n), 0) for d, n in last_seq.items()),
        "duplicates": sum(s.get("duplicate_seqs_stored", 0) for s in mine.values()),
        "duplicates_dropped": sum(s.get("duplicates_dropped", 0) for s in mine.values()),
        "gaps": sum(s.get("gaps", 0) for s in mine.values()),
        "waited_s": round(waited, 2),
    }


def _in_range(stats: dict[str, Any], last_seq: int) -> int:
    """Distinct sequence numbers stored (all in 1..last_seq: a fresh outbox numbers from 1)."""
    return stats.get("received", 0) - stats.get("duplicate_seqs_stored", 0)


class PrivateBackend:
    """A Mosquitto on a free loopback port and a collector writing ``db`` (no ``--broker``)."""

    def __init__(self, workdir: Path, db: str | Path) -> None:
        from devices.telemetry.collector import Collector
        from devices.telemetry.mosquitto import Mosquitto, basic_config, free_port
        from devices.telemetry.transport import parse_broker_url

        port = free_port()
        cfg = basic_config(port, workdir / "broker", save_on_every_change=False)
        self.broker = Mosquitto(workdir / "broker", cfg, port)
        self.broker.start()
        self.url = self.broker.url
        self.collector = Collector(parse_broker_url(self.url), db).start()
        if not self.collector.wait_subscribed(15):
            self.close()
            raise EdgeadaptError("the private collector did not subscribe")

    def close(self) -> None:
        """Stop the collector, then the broker."""
        self.collector.stop()
        self.broker.kill()
