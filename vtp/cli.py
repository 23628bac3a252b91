"""`vtp`: one command for every process and tool of the pipeline."""

from __future__ import annotations

import argparse
import logging
import sys

from vtp.settings import SettingsError, documented_variables, load_settings


def _stack(args: argparse.Namespace) -> int:
    from deploy import broker

    settings = load_settings()
    if args.action == "fetch":
        path = broker.fetch_jars(settings)
        print(f"Kafka {settings.kafka_version} jars in {path}")
    elif args.action == "up":
        broker.fetch_jars(settings)
        state = broker.start_broker(settings)
        from vtp.topics import create_topics

        created = create_topics(settings.with_(kafka_bootstrap=state.bootstrap))
        print(f"broker pid {state.pid} at {state.bootstrap} (log {state.log_path})")
        print(f"topics created: {', '.join(created) or 'none (all existed)'}")
        print(f"export VTP_KAFKA_BOOTSTRAP={state.bootstrap}")
    elif args.action == "down":
        print("stopped" if broker.stop_broker(settings) else "no broker was running")
    else:
        print(broker.broker_status(settings))
    return 0


def _topics(args: argparse.Namespace) -> int:
    from vtp.topics import create_topics

    created = create_topics(load_settings())
    print(f"created: {', '.join(created) or 'none (all existed)'}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from stream_jobs.app import run_worker

    run_worker(load_settings(), args.loglevel)
    return 0


def _sink(args: argparse.Namespace) -> int:
    from sinks.sink import run_sink

    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    run_sink(load_settings(), args.region.lower())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from owner_api.serve import run_serve

    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    return run_serve(load_settings(), args.region.lower(), with_sink=not args.no_sink)


def _known_region(settings, name: str) -> str:
    region = name.lower()
    if region not in settings.regions:
        raise SettingsError(
            f"region {region!r} is not one of VTP_REGIONS={','.join(settings.regions)}"
        )
    return region


def _token(args: argparse.Namespace) -> int:
    from owner_api.tokens import issue, owner_claims, signing_key

    settings = load_settings()
    region = _known_region(settings, args.region)
    ttl = args.ttl or settings.owner_token_ttl_s
    print(issue(signing_key(settings), owner_claims(args.owner_id, region, ttl)))
    return 0


def _sql(args: argparse.Namespace) -> int:
    from owner_api.analyst import AnalystQueryError, query_locally_or_via_service

    settings = load_settings()
    region = _known_region(settings, args.region)
    try:
        columns, found = query_locally_or_via_service(settings, region, args.query)
    except AnalystQueryError as exc:
        print(f"vtp sql: {exc}", file=sys.stderr)
        return 1
    print("\t".join(columns))
    for row in found:
        print("\t".join("" if v is None else str(v) for v in row))
    return 0


def _owner(args: argparse.Namespace) -> int:
    from owner_api.report import (
        UnknownOwner,
        format_activity,
        format_report,
        last_days,
        owner_report,
        recent_charges,
        recent_trips,
    )
    from sinks.warehouse import open_warehouse

    settings = load_settings()
    region = args.region.lower()
    if region not in settings.regions:
        print(
            f"unknown region {region!r}; VTP_REGIONS={','.join(settings.regions)}", file=sys.stderr
        )
        return 2
    warehouse = open_warehouse(settings, region)
    try:
        print(format_report(args.owner_id, region, owner_report(warehouse, args.owner_id)))
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
        load_settings(),
        seed=args.seed,
        owners=args.owners,
        vehicles=args.vehicles,
        duration_s=args.minutes * 60,
        register=not args.no_register,
    )
    print(summary)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vtp.demo import run_demo

    return run_demo(load_settings(), seed=args.seed, minutes=args.minutes)


def _config(args: argparse.Namespace) -> int:
    settings = load_settings()
    for name, default in documented_variables():
        value = getattr(settings, name[4:].lower())
        shown = ",".join(value) if isinstance(value, tuple) else value
        print(f"{name}={shown}  (default {default})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="the local Kafka broker: fetch jars, up, down, status")
    p.add_argument("action", choices=["fetch", "up", "down", "status"])
    p.set_defaults(func=_stack)

    p = sub.add_parser("topics", help="create vtp's topics on the broker (idempotent)")
    p.set_defaults(func=_topics)

    p = sub.add_parser("worker", help="run the Faust validate/route job")
    p.add_argument("--loglevel", default="info")
    p.set_defaults(func=_worker)

    p = sub.add_parser("sink", help="write a region's validated uploads into its warehouse")
    p.add_argument("--region", required=True)
    p.set_defaults(func=_sink)

    p = sub.add_parser("serve", help="the owner API of a region (with its sink, in embedded mode)")
    p.add_argument("--region", required=True)
    p.add_argument("--no-sink", action="store_true", help="API only (ClickHouse server mode)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("token", help="issue an owner token for local use (signed, expiring)")
    p.add_argument("owner_id")
    p.add_argument("--region", required=True)
    p.add_argument("--ttl", type=int, default=0, help="seconds; default VTP_OWNER_TOKEN_TTL_S")
    p.set_defaults(func=_token)

    p = sub.add_parser("sql", help="an analyst query on a region's pseudonymised views")
    p.add_argument("query")
    p.add_argument("--region", required=True)
    p.set_defaults(func=_sql)

    p = sub.add_parser("owner", help="owner-facing reads")
    owner_sub = p.add_subparsers(dest="owner_command", required=True)
    r = owner_sub.add_parser("report", help="an owner's vehicles: samples, span, distance, battery")
    r.add_argument("owner_id")
    r.add_argument("--region", required=True)
    r.set_defaults(func=_owner)

    p = sub.add_parser("simulate", help="register a simulated fleet and publish its uploads")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--owners", type=int, default=30)
    p.add_argument("--vehicles", type=int, default=50)
    p.add_argument("--minutes", type=float, default=15.0, help="simulated minutes")
    p.add_argument("--no-register", action="store_true", help="publish uploads only")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("demo", help="everything end to end on a fresh local stack")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--minutes", type=float, default=60.0, help="simulated minutes")
    p.set_defaults(func=_demo)

    p = sub.add_parser("config", help="print every VTP_* variable with its value and default")
    p.set_defaults(func=_config)
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
        from owner_api.serve import ServeError
        from sinks.sink import SinkError
        from sinks.warehouse import WarehouseError

        if isinstance(exc, BrokerError | WarehouseError | SinkError | ServeError):
            print(f"vtp: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
