"""CLI: ``collect``, ``telemetry stats|plot|export``, ``dashboard``, ``command``,
``bench telemetry`` and ``bench fleet``.

Top-level imports are stdlib only; handlers import paho, sqlite, psycopg, matplotlib, mcap and
the dashboard's web stack when they run. ``--db`` takes an SQLite path or a ``postgresql://`` URL.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

ACTIONS = ("reset-state", "reset-belief", "set-mode", "rebirth", "update-bundle")
DB_HELP = "collector database: SQLite path or postgresql://user@host:port/dbname"


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add the telemetry subcommands to the ``edgeadapt`` parser."""
    p = sub.add_parser("collect", help="store a fleet's MQTT telemetry (SQLite or PostgreSQL)")
    _broker_args(p)
    p.add_argument("--db", required=True, help=DB_HELP + "; created if missing")
    p.add_argument("--fleet", default="+", help="fleet to collect ('+': all)")
    p.add_argument("--share", metavar="GROUP", help="MQTT 5 shared subscription group")
    p.add_argument("--client-id", default="edgeadapt-collector", help="stable id (session)")
    p.add_argument("--session-expiry", type=int, default=86_400, help="broker session (s)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--max-payload", type=int, default=1 << 20, help="largest message (bytes)")
    p.set_defaults(handler=cmd_collect)

    p = sub.add_parser("dashboard", help="live fleet dashboard in the browser (read-only)")
    p.add_argument("--db", required=True, help=DB_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8080, help="TCP port")
    p.add_argument("--token", help="required by every request (default: $EDGEADAPT_DASHBOARD_TOKEN)"
                   "; needed when --host is not loopback")  # fmt: skip
    p.add_argument("--poll", type=float, default=0.2, help="live update period (s)")
    p.set_defaults(handler=cmd_dashboard)

    tel = sub.add_parser("telemetry", help="inspect a collector database")
    tsub = tel.add_subparsers(dest="telemetry_command", metavar="WHAT", required=True)
    p = tsub.add_parser("stats", help="per device: received, max_seq, gaps, duplicates, online")
    p.add_argument("--db", required=True, help=DB_HELP)
    p.add_argument("--device", help="only this device")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_stats)
    p = tsub.add_parser("plot", help="PNG: reward, adaptation summary with its band, OOD score")
    p.add_argument("--db", required=True, help=DB_HELP)
    p.add_argument("--device", required=True, help="device id")
    p.add_argument("--out", required=True, help="PNG path")
    p.set_defaults(handler=cmd_plot)
    p = tsub.add_parser("export", help="one device's records as an MCAP file (Foxglove)")
    p.add_argument("--db", required=True, help=DB_HELP)
    p.add_argument("--device", required=True, help="device id")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--format", choices=("mcap",), default="mcap", help="file format")
    p.add_argument("--start", type=float, help="first device time to include (unix s)")
    p.add_argument("--end", type=float, help="last device time to include (unix s)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("command", help="send a signed command to a device and wait for its ack")
    p.add_argument("device", help="device id")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("value", nargs="?", help="set-mode: safe | adaptive")
    p.add_argument("--source", help="update-bundle: http(s) URL or absolute path of the bundle")
    p.add_argument("--sha256", help="update-bundle: sha256 of the bundle archive")
    _broker_args(p)
    p.add_argument("--fleet", default="default", help="the device's fleet")
    p.add_argument("--key", required=True, help="fleet command private key (PEM, Ed25519)")
    p.add_argument("--ttl", type=float, default=60.0, help="command lifetime (s)")
    p.add_argument("--timeout", type=float, default=10.0, help="wait for the ack (s)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for the ack")
    p.set_defaults(handler=cmd_command)

    p = bench.add_parser("telemetry", help="MQTT telemetry throughput, latency, fleet of devices")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--records", type=int, default=200_000, help="records for the throughput run")
    p.add_argument("--latency-seconds", type=float, default=10.0, help="100 Hz latency run (s)")
    p.add_argument("--devices", type=int, default=100, help="simulated devices in the fleet run")
    p.add_argument("--fleet-rate", type=float, default=50.0, help="Hz per simulated device")
    p.add_argument("--fleet-seconds", type=float, default=60.0, help="fleet run duration (s)")
    p.add_argument("--processes", type=int, default=4, help="processes hosting the fleet")
    p.add_argument("--skip-fleet", action="store_true", help="skip the fleet run")
    p.add_argument(
        "--cpu-seconds",
        type=float,
        default=5.0,
        help="seconds per rate of the worker-CPU run (idle, 20 Hz, 100 Hz)",
    )
    p.set_defaults(handler=cmd_bench)

    p = bench.add_parser("fleet", help="fleet backend: PostgreSQL collectors, a killed collector, "
                         "fleet-sim, dashboard paint and latency")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--parts", default="pg,kill,sim,dashboard", help="comma-separated parts")
    p.add_argument("--bundle", action="append", default=[], help="bundle for fleet-sim (repeat)")
    p.add_argument("--pubkey", help="public key the bundles are signed with")
    p.add_argument("--ray", nargs="?", const="local", metavar="auto|ADDRESS",
                   help="fleet-sim hosts as Ray actors: alone, Ray started here; 'auto' or "
                   "an address: that cluster (default: local processes)")  # fmt: skip
    p.add_argument("--per-host", type=int, default=100, help="fleet-sim devices per host")
    p.add_argument("--pg-messages", type=int, default=2000, help="100-record messages (pg part)")
    p.add_argument("--kill-devices", type=int, default=500)
    p.add_argument("--kill-rate", type=float, default=10.0, help="Hz per device")
    p.add_argument("--kill-seconds", type=float, default=30.0)
    p.add_argument("--sim-devices", type=int, default=200)
    p.add_argument("--sim-rate", type=float, default=20.0, help="Hz per device")
    p.add_argument("--sim-seconds", type=float, default=30.0)
    p.add_argument("--dash-devices", type=int, default=100)
    p.add_argument("--dash-records", type=int, default=1_000_000)
    p.add_argument("--dash-stores", default="sqlite,postgresql", help="sqlite and/or postgresql")
    p.add_argument("--latency-seconds", type=float, default=10.0, help="live device run (s)")
    p.set_defaults(handler=cmd_bench_fleet)


def _broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, help="mqtt://host[:port] or mqtts://host[:port]")
    p.add_argument("--username", help="broker username")
    p.add_argument("--password", help="password (default: $EDGEADAPT_MQTT_PASSWORD)")
    p.add_argument("--ca-file", help="CA certificates to verify the broker (mqtts)")
    p.add_argument("--cert-file", help="client certificate (PEM)")
    p.add_argument("--key-file", help="client certificate key (PEM)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version")


def _broker(args: argparse.Namespace) -> Any:
    from devices.telemetry.transport import parse_broker_url

    return parse_broker_url(
        args.broker, username=args.username, password=args.password, ca_file=args.ca_file,
        cert_file=args.cert_file, key_file=args.key_file, protocol=args.protocol,
    )  # fmt: skip


def cmd_collect(args: argparse.Namespace) -> int:
    """Run a collector until SIGINT/SIGTERM (or ``--duration``); print its counters."""
    import signal
    import threading
    from dataclasses import asdict

    from devices.telemetry.collector import Collector

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    collector = Collector(
        _broker(args), args.db, fleet=args.fleet, share_group=args.share,
        client_id=args.client_id, session_expiry_s=args.session_expiry,
        max_payload_bytes=args.max_payload,
    ).start()  # fmt: skip
    try:
        stop.wait(args.duration)
    except KeyboardInterrupt:
        pass
    finally:
        collector.stop()
    print(json.dumps(asdict(collector.counters)))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print per-device figures of a collector database."""
    from devices.telemetry import collector_db

    conn = _open_db(args.db)
    try:
        devices = collector_db.device_stats(conn)
        malformed = collector_db.malformed_total(conn)
    finally:
        conn.close()
    if args.device:
        devices = {k: v for k, v in devices.items() if k == args.device}
    if args.json:
        print(json.dumps({"devices": devices, "malformed": malformed}, indent=2))
        return 0
    cols = ("alg", "received", "max_seq", "gaps", "duplicates_dropped", "online", "boots")
    print(f"{'device':<24}" + "".join(f"{c:>19}" for c in cols))
    for name, d in devices.items():
        print(f"{name:<24}" + "".join(f"{d.get(c)!s:>19}" for c in cols))
    print(f"malformed messages dropped: {malformed}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a device's reward, belief and OOD score over time into a PNG."""
    from devices.telemetry.plot import plot_device

    conn = _open_db(args.db)
    try:
        n = plot_device(conn, args.device, args.out)
    finally:
        conn.close()
    print(f"wrote {args.out} ({n} telemetry records)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write one device's records (optionally a time range) into an MCAP file."""
    from devices.telemetry.mcap_export import export_mcap

    conn = _open_db(args.db)
    try:
        counts = export_mcap(conn, args.device, args.out, start=args.start, end=args.end)
    finally:
        conn.close()
    print(json.dumps({"out": args.out, "messages": counts}))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard until interrupted."""
    import os

    from devices.telemetry.dashboard.server import TOKEN_ENV, check_access, serve

    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_access(args.host, token)
    _open_db(args.db).close()
    serve(args.db, args.host, args.port, token, poll_s=args.poll)
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    """Sign and send a command; exit 0 when the device acknowledged it with ``ok``."""
    from devices.telemetry.commands_proto import COMMANDS, load_private_key
    from devices.telemetry.sender import send_command
    from devices.telemetry.topics import check_id

    cmd_args = _command_args(args, COMMANDS[args.action])
    result = send_command(
        _broker(args), check_id(args.fleet, "fleet"), check_id(args.device, "device"),
        args.action, cmd_args, load_private_key(args.key), ttl_s=args.ttl,
        timeout_s=args.timeout, wait_ack=not args.no_wait,
    )  # fmt: skip
    print(json.dumps(result))
    return 0 if result["status"] in ("ok", "sent") else 1


def _command_args(args: argparse.Namespace, spec: dict) -> dict[str, str]:
    """The signed arguments of a command, checked against its spec before sending."""
    from devices.telemetry.commands_proto import arg_allowed
    from runtime.errors import ConfigError

    if args.action == "update-bundle":
        cmd_args = {"source": args.source, "sha256": args.sha256}
    elif spec:
        cmd_args = {next(iter(spec)): args.value}
    else:
        if args.value is not None:
            raise ConfigError(f"{args.action} takes no value")
        cmd_args = {}
    for key, value in cmd_args.items():
        if not arg_allowed(spec[key], value):
            if isinstance(spec[key], tuple):
                raise ConfigError(f"{args.action} needs one of {spec[key]}, got {value!r}")
            raise ConfigError(f"{args.action}: --{key} must match {spec[key].pattern}")
    return cmd_args


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the telemetry benchmark against a private Mosquitto; print JSON."""
    from devices.telemetry.bench import BenchOptions, run_bench

    opts = BenchOptions(
        records=args.records, latency_seconds=args.latency_seconds, devices=args.devices,
        fleet_rate_hz=args.fleet_rate, fleet_seconds=args.fleet_seconds,
        processes=args.processes, fleet=not args.skip_fleet, cpu_seconds=args.cpu_seconds,
    )  # fmt: skip
    result = run_bench(opts, progress=not args.json)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def cmd_bench_fleet(args: argparse.Namespace) -> int:
    """Run the fleet backend benchmark against private servers; print JSON."""
    from devices.telemetry.fleet_bench import FleetBenchOptions, run_fleet_bench

    opts = FleetBenchOptions(
        parts=tuple(x for x in args.parts.split(",") if x), bundles=tuple(args.bundle),
        pubkey=args.pubkey, ray=args.ray, per_host=args.per_host, pg_messages=args.pg_messages,
        kill_devices=args.kill_devices, kill_rate_hz=args.kill_rate,
        kill_seconds=args.kill_seconds, sim_devices=args.sim_devices, sim_rate_hz=args.sim_rate,
        sim_seconds=args.sim_seconds, dash_devices=args.dash_devices,
        dash_records=args.dash_records,
        dash_stores=tuple(x for x in args.dash_stores.split(",") if x),
        latency_seconds=args.latency_seconds,
    )  # fmt: skip
    result = run_fleet_bench(opts, progress=not args.json)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _open_db(path: str) -> Any:
    """A read-only connection to a collector database, or a one-line error."""
    from pathlib import Path

    from devices.telemetry import database
    from runtime.errors import EdgeadaptError

    if not database.is_url(path) and not Path(path).is_file():
        raise EdgeadaptError(f"no collector database at {path}")
    conn = database.connect(path, readonly=True)
    try:
        conn.execute("SELECT COUNT(*) FROM records").fetchone()
    except conn.errors() as exc:
        conn.close()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgeadaptError(
            f"{database.describe(path)} is not a collector database ({reason})"
        ) from None
    return conn
