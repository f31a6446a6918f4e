"""``gpuattach-broker``: run the broker and look at what it holds."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

import grpc

from gpuattach_broker.broker.identity import StaticTokens
from gpuattach_broker.broker.policy import PolicyErrors, load_policy
from gpuattach_broker.broker.store import Store, StoreError, open_store
from gpuattach_broker.paths import default_db
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import key_metadata
from gpuattach_broker.simulator.cli import add_arguments as add_simulator_arguments
from gpuattach_broker.simulator.cli import run as run_simulator
from gpuattach_broker.tls import broker_channel
from gpuattach_broker.units import format_duration, format_size, parse_duration


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("GPUATTACH_BROKER", "127.0.0.1:50051"),
        help="broker address host:port, or several comma-separated (failover) (GPUATTACH_BROKER)",
    )
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("GPUATTACH_TLS_CA", ""),
        help="verify a TLS broker against this CA (GPUATTACH_TLS_CA)",
    )


def _add_database(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default="", help=f"SQLite state file (default {default_db()})")
    parser.add_argument(
        "--db-url",
        default=os.environ.get("GPUATTACH_DB_URL", ""),
        help="the broker's state database, sqlite:///path or postgresql://... "
        "(GPUATTACH_DB_URL; overrides --db)",
    )


def _open_state(args: argparse.Namespace) -> Store | None:
    """The broker's store, read through the same interface the broker writes."""
    if args.db_url:
        try:
            return open_store(args.db_url, readonly=True)
        except StoreError as exc:
            print(f"gpuattach-broker: {exc}", file=sys.stderr)
            return None
    path = args.db or str(default_db())
    if not os.path.exists(path):
        print(f"gpuattach-broker: no state file at {path}", file=sys.stderr)
        return None
    return open_store(path)  # read-write: brings an older state file up to date


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuattach-broker", description="The GPU slice broker of jupyter-gpuattach."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # `serve` is a traitlets application (config file, --generate-config):
    # see gpuattach_broker.broker.app; it is listed here for --help only.
    sub.add_parser(
        "serve", help="run the broker (gpuattach-broker serve --help-all)", add_help=False
    )

    pc = sub.add_parser("policy", help="check a policy file")
    pc.add_argument("action", choices=["check"])
    pc.add_argument("file")

    tk = sub.add_parser("token", help="create a user token (printed once, stored hashed)")
    tk.add_argument("action", choices=["add"])
    tk.add_argument("user")
    tk.add_argument("--file", required=True, help="the broker's --tokens-file")
    tk.add_argument("--admin", action="store_true")
    tk.add_argument("--group", action="append", default=[], help="repeatable")

    rv = sub.add_parser("revoke", help="end a lease now (admin)")
    rv.add_argument("lease_id")
    rv.add_argument("--reason", default="")
    _add_connection(rv)

    dr = sub.add_parser("drain", help="stop placing slices on a host (admin)")
    dr.add_argument("host")
    dr.add_argument("--undo", action="store_true", help="put the host back into service")
    _add_connection(dr)

    au = sub.add_parser("audit", help="who attached, released, revoked what, when (admin)")
    au.add_argument("--since", type=_duration, default=0.0)
    au.add_argument("--user", default="")
    au.add_argument("--lease", default="")
    _add_connection(au)

    for name, help_text in (("leases", "list leases"), ("pool", "show the device pool")):
        c = sub.add_parser(name, help=help_text)
        _add_connection(c)
        if name == "leases":
            c.add_argument("--user", default="")
            c.add_argument("--all", action="store_true", help="include ended leases")

    e = sub.add_parser("events", help="print the lease timeline from the state file")
    _add_database(e)
    e.add_argument("--since", type=_duration, default=0.0, help="only the last N seconds/minutes")

    u = sub.add_parser("usage", help="GPU time held vs busy, from the ledger")
    _add_database(u)
    u.add_argument(
        "--since", type=_duration, default=0.0, help="only leases granted since, e.g. 1h"
    )
    u.add_argument(
        "--by",
        choices=["user", "group", "kernel", "device", "lease"],
        default="user",
        help="how to group the rows; by group, a lease counts in each group its user "
        "was in when it was granted (JupyterHub, token file or policy groups)",
    )

    add_simulator_arguments(
        sub.add_parser(
            "simulate", help="replay a workload trace against the broker's placement and queue"
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from gpuattach_broker.broker.app import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "events":
        return _events(args)
    if args.command == "usage":
        return _usage(args)
    if args.command == "simulate":
        return run_simulator(args)
    if args.command == "policy":
        return _policy_check(args.file)
    if args.command == "token":
        token = StaticTokens.add(args.file, args.user, admin=args.admin, groups=tuple(args.group))
        print(f"token for {args.user} (shown once; only its hash is stored):\n{token}")
        return 0
    if args.command in ("revoke", "drain", "audit"):
        return _admin(args)
    return _query(args)


def _policy_check(path: str) -> int:
    try:
        policy = load_policy(path)
    except OSError as exc:
        print(f"gpuattach-broker: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    except PolicyErrors as exc:
        for error in exc.errors:
            print(f"{path}:{error}")
        print(f"{len(exc.errors)} mistake(s); the broker would refuse this file", file=sys.stderr)
        return 1
    print(
        f"{path}: OK — {len(policy.groups)} groups, {len(policy.users)} users, "
        f"priorities {dict(policy.priorities)}, preemption "
        f"{'on, grace ' + format_duration(policy.preemption_grace) if policy.preemption else 'off'}"
    )
    return 0


def _credentials() -> tuple[tuple[str, str], ...]:
    metadata = key_metadata(os.environ.get("GPUATTACH_BROKER_KEY", ""))
    token = os.environ.get("GPUATTACH_TOKEN", "")
    return metadata + ((("authorization", f"token {token}"),) if token else ())


def _admin(args: argparse.Namespace) -> int:
    with broker_channel(args.address, args.tls_ca) as channel:
        stub = pb_grpc.BrokerStub(channel)
        try:
            if args.command == "revoke":
                reply = stub.Revoke(
                    pb.RevokeRequest(lease_id=args.lease_id, reason=args.reason),
                    metadata=_credentials(),
                    timeout=10,
                )
                print(f"revoked {args.lease_id} after {format_duration(reply.held_seconds)}")
            elif args.command == "drain":
                drained = stub.Drain(
                    pb.DrainRequest(host=args.host, undrain=args.undo),
                    metadata=_credentials(),
                    timeout=10,
                )
                state = "back in service" if args.undo else "draining"
                print(
                    f"{args.host}: {drained.devices} devices {state}; "
                    f"{drained.active_leases} leases still running there"
                )
            else:
                since = time.time() - args.since if args.since else 0.0
                events = stub.GetEvents(
                    pb.EventsRequest(since=since, user=args.user, lease_id=args.lease),
                    metadata=_credentials(),
                    timeout=10,
                ).events
                for event in events:
                    lease = event.lease_id[:8] or "-"
                    print(
                        f"{_fmt_time(event.ts)}  {event.kind:<16} {lease:<8}  "
                        f"{event.user:<10} {event.detail}"
                    )
        except grpc.RpcError as exc:
            print(f"gpuattach-broker: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _fmt_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3] if ts else "-"


def _events(args: argparse.Namespace) -> int:
    store = _open_state(args)
    if store is None:
        return 1
    since = time.time() - args.since if args.since else 0.0
    for event in store.events(since=since):
        lease = event.lease_id[:8] if event.lease_id else "-"
        print(
            f"{_fmt_time(event.ts)}  {event.kind:<16} {lease:<8}  {event.user:<10} {event.detail}"
        )
    store.close()
    return 0


def _usage(args: argparse.Namespace) -> int:
    """Per group: leases, seconds held, seconds a cell ran (the kernel's count),
    seconds the GPU was really busy (NVML; 0 on the CPU backend), busy share."""
    store = _open_state(args)
    if store is None:
        return 1
    now = time.time()
    since = now - args.since if args.since else 0.0
    rows: dict[str, list[float]] = {}
    counted: set[str] = set()
    total = [0.0, 0.0, 0.0, 0.0]
    for lease in store.leases(include_ended=True):
        if not lease.granted_at or lease.granted_at < since:
            continue
        keys = {
            "user": [lease.user],
            "group": lease.groups or ["(no group)"],
            "kernel": [lease.kernel_id or "-"],
            "device": [",".join(lease.device_ids)],
            "lease": [lease.lease_id],
        }[args.by]
        held = lease.held_seconds(now)
        figures = (1, held, min(lease.busy_seconds, held), min(lease.gpu_busy_seconds, held))
        for key in keys:
            row = rows.setdefault(key, [0, 0.0, 0.0, 0.0])
            for i, value in enumerate(figures):
                row[i] += value
        if lease.lease_id not in counted:  # a lease in two groups counts once in the total
            counted.add(lease.lease_id)
            total = [a + b for a, b in zip(total, figures, strict=True)]
    store.close()
    header = (
        f"{args.by:<20}{'leases':>8}{'held s':>12}{'busy s':>12}{'busy %':>8}{'GPU busy s':>12}"
    )
    print(header)
    for key, row in [*sorted(rows.items()), ("total", total)]:
        count, held, busy, gpu = row
        share = f"{100 * busy / held:.1f}" if held else "-"
        print(f"{key[:19]:<20}{int(count):>8}{held:>12.1f}{busy:>12.1f}{share:>8}{gpu:>12.1f}")
    return 0


def _query(args: argparse.Namespace) -> int:
    with broker_channel(args.address, args.tls_ca) as channel:
        stub = pb_grpc.BrokerStub(channel)
        try:
            if args.command == "leases":
                reply = stub.ListLeases(
                    pb.ListLeasesRequest(user=args.user, include_ended=args.all),
                    metadata=_credentials(),
                    timeout=10,
                )
                print(f"{'lease':<17}{'user':<12}{'state':<10}{'device':<24}{'memory':>10}  held")
                for lease in reply.leases:
                    held = (lease.ended_at or time.time()) - lease.granted_at
                    print(
                        f"{lease.lease_id:<17}{lease.user:<12}{lease.state:<10}"
                        f"{lease.device_name[:23]:<24}{format_size(lease.memory_bytes):>10}  "
                        f"{format_duration(held) if lease.granted_at else '-'}"
                    )
            else:
                pool = stub.GetPoolStatus(
                    pb.PoolStatusRequest(), metadata=_credentials(), timeout=10
                )
                print(f"{'device':<32}{'kind':<6}{'allocated':>22}  leases  online")
                for d in pool.devices:
                    alloc = f"{format_size(d.allocated_bytes)}/{format_size(d.memory_bytes)}"
                    print(f"{d.device_id:<32}{d.kind:<6}{alloc:>22}  {d.leases:>6}  {d.online}")
                print(
                    f"queue: {pool.queue_length}  active leases: {pool.active_leases}  "
                    f"agents: {pool.agents_online}"
                )
        except grpc.RpcError as exc:
            print(f"gpuattach-broker: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
