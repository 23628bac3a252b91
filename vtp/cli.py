"""`vtp`: one command for every process and tool of the pipeline.

Every process serves one region: ``--region R`` or ``VTP_REGION``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from importlib.metadata import version

from deploy.broker import with_local_broker
from vtp.core.regions import REGIONS
from vtp.core.settings import (
    Settings,
    SettingsError,
    documented_settings,
    load_settings,
    settings_table,
)


def _settings(args: argparse.Namespace, region_needed: bool = True) -> Settings:
    settings = load_settings()
    if getattr(args, "region", None):
        settings = settings.for_region(args.region)
    if region_needed:
        settings.need_region()
    return with_local_broker(settings)


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )


def _stack(args: argparse.Namespace) -> int:
    from deploy import broker

    settings = _settings(args, region_needed=args.action != "fetch")
    if args.action == "fetch":
        path = broker.fetch_jars(settings)
        print(f"Kafka {settings.kafka_version} jars in {path}")
    elif args.action == "up":
        broker.fetch_jars(settings)
        state = broker.start_broker(settings)
        from vtp.core.topics import create_topics

        created = create_topics(settings.with_(kafka_bootstrap=state.bootstrap))
        print(
            f"{settings.region} broker pid {state.pid} at {state.bootstrap} (log {state.log_path})"
        )
        print(f"topics created: {', '.join(created) or 'none (all existed)'}")
        print(f"export VTP_REGION={settings.region} VTP_KAFKA_BOOTSTRAP={state.bootstrap}")
    elif args.action == "down":
        print("stopped" if broker.stop_broker(settings) else "no broker was running")
    else:
        print(broker.broker_status(settings))
    return 0


def _topics(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from vtp.core.topics import create_topics, topic_plan

    if args.plan:
        print(json.dumps([asdict(t) for t in topic_plan(_settings(args))], indent=2))
        return 0
    created = create_topics(_settings(args))
    print(f"created: {', '.join(created) or 'none (all existed)'}")
    return 0


def _migrations(args: argparse.Namespace) -> int:
    from sinks.migrations import MigrationOptions, migrate, plan
    from vtp.core.cluster_ddl import check_cluster_name
    from vtp.core.warehouse_targets import server_database

    if args.plan:
        settings = _settings(args, region_needed=False)
        cluster = check_cluster_name(args.cluster) if args.cluster else settings.warehouse_cluster
        database = ""
        if cluster:  # its tables name the region's database: the region must be known
            database = server_database(settings.warehouse, _settings(args).need_region())
        where = f"cluster {cluster}, database {database}" if cluster else "a single server"
        print(f"-- vtp's migrations for {where}, in order; each version runs once")
        for version, name, rendered in plan(cluster, database=database):
            print(f"\n-- {version:04d}_{name}")
            for statement in rendered:
                print(f"{statement};")
        return 0
    from vtp.core.warehouse import open_warehouse

    settings = _settings(args)
    warehouse = open_warehouse(settings)
    try:
        applied = migrate(warehouse, options=MigrationOptions.from_settings(settings))
    finally:
        warehouse.close()
    print(f"applied: {', '.join(map(str, applied)) or 'none (up to date)'}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from stream_jobs.app import run_worker

    run_worker(_settings(args), args.loglevel)
    return 0


def _sink(args: argparse.Namespace) -> int:
    from sinks.sink import run_sink

    settings = _settings(args)
    _logging()
    run_sink(settings)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from vtp.serve import run_serve

    settings = _settings(args)
    _logging()
    return run_serve(settings, with_sink=not args.no_sink)


def _gateway(args: argparse.Namespace) -> int:
    from producers.gateway import run_gateway

    _logging()
    return run_gateway(_settings(args))


def _token(args: argparse.Namespace) -> int:
    from owner_api.tokens import issue, owner_claims
    from vtp.core.keys import load_keyring

    settings = _settings(args)
    ttl = args.ttl or settings.owner_token_ttl_s
    print(issue(load_keyring(settings), owner_claims(args.owner_id, settings.region, ttl)))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from vtp.core.keys import add_key, load_keyring, pseudonym_key, retire_key

    settings = _settings(args)
    if args.action == "rotate":
        print(f"new {args.kind} key {add_key(settings, args.kind)} signs from now on")
    elif args.action == "retire":
        gone = retire_key(settings, args.kid)
        print(f"retired {args.kid}" if gone else f"no key {args.kid}")
        return 0 if gone else 1
    for kind, kids in load_keyring(settings).kids().items():
        print(f"{kind}: {', '.join(kids)} (signing: {kids[-1]})")
    pseudonym_key(settings)  # made here too, so one process makes every key of a region
    print("pseudonym key: present")
    return 0


def _sql(args: argparse.Namespace) -> int:
    from owner_api.analyst import AnalystQueryError
    from vtp.sql import query_locally_or_via_service

    try:
        columns, found = query_locally_or_via_service(_settings(args), args.query)
    except AnalystQueryError as exc:
        print(f"vtp sql: {exc}", file=sys.stderr)
        return 1
    print("\t".join(columns))
    for row in found:
        print("\t".join("" if v is None else str(v) for v in row))
    return 0


def _owner(args: argparse.Namespace) -> int:
    from vtp.core.warehouse import open_warehouse
    from vtp.report import (
        UnknownOwner,
        format_activity,
        format_report,
        last_days,
        owner_report,
        recent_charges,
        recent_trips,
    )

    settings = _settings(args)
    warehouse = open_warehouse(settings)
    try:
        print(format_report(args.owner_id, settings.region, owner_report(warehouse, args.owner_id)))
        print(
            format_activity(
                recent_trips(warehouse, args.owner_id),
                recent_charges(warehouse, args.owner_id),
                last_days(warehouse, args.owner_id),
            )
        )
    except UnknownOwner as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        warehouse.close()
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from producers.publish import publish_simulation

    summary = publish_simulation(
        _settings(args),
        seed=args.seed,
        owners=args.owners,
        vehicles=args.vehicles,
        duration_s=args.minutes * 60,
        register=not args.no_register,
    )
    print(summary)
    return 0


def _pki(args: argparse.Namespace) -> int:
    from producers import pki

    settings = _settings(args)
    path = settings.pki_path
    if args.pki_action == "init":
        region = pki.init_region(path, settings.region, args.host)
        print(f"{path}: made {', '.join(region.created) or 'nothing (all existed)'}")
    elif args.pki_action == "issue":
        for vin in args.vins:
            pki.check_vin(vin)  # every VIN checked before any is issued
        for vin in args.vins:
            vehicle = pki.issue_vehicle(path, vin, renew=args.renew)
            print(f"{vin}: {vehicle.cert_path}, serial {vehicle.serial_hex}")
            if vehicle.replaced_serial_hex:
                print(f"  serial {vehicle.replaced_serial_hex} stays valid until revoked")
    elif args.pki_action == "revoke":
        serial, added = pki.revoke(path, args.target, args.reason)
        print(f"serial {serial} {'revoked' if added else 'was already revoked'}")
    else:
        for line in pki.describe(path):
            print(line)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vtp.demo import run_demo

    return run_demo(load_settings(), seed=args.seed, minutes=args.minutes)


def _config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_table(), end="")
        return 0
    settings = _settings(args, region_needed=False)
    for doc in documented_settings():
        value = settings.shown(doc.variable[4:].lower())
        print(
            f"{doc.variable}={value}  ({doc.type}, default {doc.default or '(empty)'}; {doc.doc})"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vtp {version('vtp')}")
    sub = parser.add_subparsers(dest="command", required=True)
    regional = argparse.ArgumentParser(add_help=False)
    regional.add_argument(
        "--region", help=f"the region ({', '.join(REGIONS)}); default $VTP_REGION"
    )

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[regional])
        p.set_defaults(func=func)
        return p

    p = command("stack", _stack, "the region's local Kafka broker: fetch jars, up, down, status")
    p.add_argument("action", choices=["fetch", "up", "down", "status"])
    p = command("topics", _topics, "create the region's topics (idempotent; checks existing ones)")
    p.add_argument(
        "--plan", action="store_true", help="print every topic the region uses, as JSON; no broker"
    )
    p = command(
        "migrations", _migrations, "bring the region's warehouse schema up to date (one at a time)"
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the SQL for VTP_WAREHOUSE_CLUSTER (or one server); no warehouse",
    )
    p.add_argument("--cluster", default="", help="with --plan: render for this cluster instead")
    p = command("worker", _worker, "run the region's Faust worker (validate, route, aggregate)")
    p.add_argument("--loglevel", default="info")
    command("sink", _sink, "write the region's validated uploads into its warehouse")
    p = command("serve", _serve, "the region's owner API (with its sink, in embedded mode)")
    p.add_argument("--no-sink", action="store_true", help="API only (ClickHouse server mode)")
    command("gateway", _gateway, "the region's vehicle edge: mutual TLS, uploads to Kafka")
    p = command("token", _token, "issue an owner token for local use (signed, expiring)")
    p.add_argument("owner_id")
    p.add_argument("--ttl", type=int, default=0, help="seconds; default VTP_OWNER_TOKEN_TTL_S")
    p = command("keys", _keys, "the region's token signing keys: list, rotate, retire")
    p.add_argument("action", choices=["list", "rotate", "retire"])
    p.add_argument("--kind", choices=["owner", "grant", "analyst"], default="owner")
    p.add_argument("--kid", default="", help="with retire: the key id")
    p = command("sql", _sql, "an analyst query on the region's pseudonymised views")
    p.add_argument("query")
    p = sub.add_parser("owner", help="owner-facing reads")
    owner_sub = p.add_subparsers(dest="owner_command", required=True)
    r = owner_sub.add_parser("report", parents=[regional], help="an owner's vehicles in a region")
    r.add_argument("owner_id")
    r.set_defaults(func=_owner)
    p = command("simulate", _simulate, "register the region's simulated vehicles, publish uploads")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--owners", type=int, default=30)
    p.add_argument("--vehicles", type=int, default=50)
    p.add_argument("--minutes", type=float, default=15.0, help="simulated minutes")
    p.add_argument("--no-register", action="store_true", help="publish uploads only")
    p = sub.add_parser("pki", help="the region's development PKI for the vehicle edge")
    pki_sub = p.add_subparsers(dest="pki_action", required=True)
    for action, text in (
        ("init", "make the region's CAs, gateway certificate and deny-list (keeps existing CAs)"),
        ("issue", "issue vehicle certificates (an existing one is kept unless --renew)"),
        ("revoke", "add a certificate's serial to the region's deny-list (revoked.txt)"),
        ("show", "each file: subject, serial, expiry (never a key's contents)"),
    ):
        pki_sub.add_parser(action, parents=[regional], help=text).set_defaults(func=_pki)
    pki_sub.choices["init"].add_argument(
        "--host", action="append", default=[], help="another name or IP of the gateway"
    )
    pki_sub.choices["issue"].add_argument("vins", nargs="+", metavar="VIN")
    pki_sub.choices["issue"].add_argument("--renew", action="store_true", help="new key and serial")
    pki_sub.choices["revoke"].add_argument("target", metavar="SERIAL_OR_CERT")
    pki_sub.choices["revoke"].add_argument("--reason", default="", help="kept as a comment")
    p = sub.add_parser("demo", help="two region stacks end to end, each on its own broker")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--minutes", type=float, default=60.0, help="simulated minutes")
    p.set_defaults(func=_demo)
    config = command(
        "config",
        _config,
        "print every VTP_* variable with its value (secrets masked), default and meaning",
    )
    config.add_argument(
        "--markdown", action="store_true", help="print the README's configuration table instead"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"vtp: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from deploy.broker import BrokerError
        from producers.gateway import GatewayError
        from producers.pki import PKIError
        from sinks.sink import SinkError
        from vtp.core.cluster_ddl import ClusterDDLError
        from vtp.core.kafka import KafkaRefused
        from vtp.core.keys import KeyFileError
        from vtp.core.registry_copy import RegistryUnavailable
        from vtp.core.topics import TopicError
        from vtp.core.warehouse import WarehouseError
        from vtp.serve import ServeError

        if isinstance(exc, ClusterDDLError):
            print(f"vtp: {exc}", file=sys.stderr)
            return 2
        known = (
            BrokerError,
            WarehouseError,
            SinkError,
            ServeError,
            GatewayError,
            TopicError,
            KafkaRefused,
            KeyFileError,
            RegistryUnavailable,
            PKIError,
        )
        if isinstance(exc, known):
            print(f"vtp: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
