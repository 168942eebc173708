"""`agentgate connect`: run the agent-side forwarder (see forwarder.py and docs/CONNECT.md)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from addons.connect.forwarder import (
    ConnectConfig,
    Connector,
    parse_gateway,
    parse_listen,
)
from addons.connect.pgforward import PgForwarder, PgRoute, parse_route
from addons.connect.tokens import CommandToken, EnvToken, FileToken, TokenSource
from addons.frame.hosts import is_loopback_host


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "connect", help="agent-side forwarder: a loopback proxy that adds a fresh token",
        description="Listen on loopback as an HTTP proxy (point the agent's HTTPS_PROXY at it) "
                    "and forward every connection to the gateway with a fresh token as "
                    "Proxy-Authorization. Tunnels only: no TLS interception on the agent side.")
    p.add_argument("--gateway", required=True, help="the gateway, http://host:port")
    p.add_argument("--listen", default="127.0.0.1:8888",
                   help="host:port to listen on (default 127.0.0.1:8888; loopback only unless "
                        "--allow-remote-clients)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--token-file", metavar="PATH",
                     help="read the token from this file, re-read when it changes (Kubernetes "
                          "projected service-account token)")
    src.add_argument("--token-command", metavar="CMD",
                     help="run CMD (no shell) and use what it prints; cached until shortly "
                          "before the token's exp")
    src.add_argument("--token-env", metavar="VAR", help="the token is in environment variable VAR")
    p.add_argument("--token-command-timeout", type=float, default=20.0, metavar="S",
                   help="seconds the token command may take (default 20)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="concurrent client connections at most (default 256; beyond: 503)")
    p.add_argument("--max-header-bytes", type=int, default=32 * 1024,
                   help="largest request head a client may send (default 32768; beyond: 431)")
    p.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                   help="close a connection after S seconds without a byte either way "
                        "(default 300)")
    p.add_argument("--postgres", action="append", default=[], metavar="LISTEN=GW_HOST:PORT",
                   help="also listen for Postgres clients on LISTEN ([host:]port, loopback) "
                        "and log in to the gateway's database listener GW_HOST:PORT with a "
                        "fresh token as the password (the client's own password is never "
                        "read); repeatable, e.g. 127.0.0.1:5432=gateway:15432")
    p.add_argument("--postgres-ca", metavar="PEM",
                   help="CA bundle that signed the gateway's database listener certificate "
                        "(default: the system store / SSL_CERT_FILE)")
    p.add_argument("--allow-remote-clients", action="store_true",
                   help="allow a non-loopback --listen address: anyone who reaches it uses "
                        "the agent's identity")
    p.set_defaults(func=run)


def pg_routes(args: argparse.Namespace) -> list[PgRoute]:
    routes = [parse_route(r) for r in args.postgres or ()]
    for r in routes:
        if not is_loopback_host(r.listen_host) and not args.allow_remote_clients:
            raise ValueError(f"--postgres listen address {r.listen_host} is not loopback: "
                             "every client that reaches it would act as this agent (add "
                             "--allow-remote-clients if that is really meant)")
    return routes


def build(args: argparse.Namespace) -> tuple[ConnectConfig, TokenSource]:
    """The configuration and token source the arguments name; ValueError with a clear
    message for anything invalid."""
    gw_host, gw_port = parse_gateway(args.gateway)
    host, port = parse_listen(args.listen)
    if not is_loopback_host(host) and not args.allow_remote_clients:
        raise ValueError(f"--listen {args.listen} is not a loopback address: every client that "
                         "reaches it would act as this agent (add --allow-remote-clients if "
                         "that is really meant)")
    for name, value, low in (("--max-connections", args.max_connections, 1),
                             ("--max-header-bytes", args.max_header_bytes, 1024),
                             ("--idle-timeout", args.idle_timeout, 1),
                             ("--token-command-timeout", args.token_command_timeout, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}")
    source: TokenSource
    if args.token_file:
        source = FileToken(args.token_file)
    elif args.token_command is not None:
        source = CommandToken(args.token_command, timeout=args.token_command_timeout)
    else:
        source = EnvToken(args.token_env)
    cfg = ConnectConfig(gateway_host=gw_host, gateway_port=gw_port, listen_host=host,
                        listen_port=port, max_connections=args.max_connections,
                        max_header_bytes=args.max_header_bytes, idle_timeout=args.idle_timeout,
                        token_timeout=args.token_command_timeout + 5)
    return cfg, source


def run(args: argparse.Namespace) -> int:
    try:
        cfg, source = build(args)
        routes = pg_routes(args)
    except ValueError as e:
        print(f"agentgate connect: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        conn = Connector(cfg, source)
        try:
            await conn.start()
        except OSError as e:
            raise SystemExit(f"agentgate connect: cannot listen on {cfg.listen_host}:"
                             f"{cfg.listen_port}: {e.strerror or e}") from None
        # one line a launcher can wait for; names the source, never the token
        pgs = [PgForwarder(r, source, ca_file=args.postgres_ca, idle_timeout=cfg.idle_timeout,
                           token_timeout=cfg.token_timeout,
                           max_connections=cfg.max_connections) for r in routes]
        for pg in pgs:
            try:
                await pg.start()
            except OSError as e:
                raise SystemExit(f"agentgate connect: cannot listen on {pg.route.listen_host}:"
                                 f"{pg.route.listen_port}: {e.strerror or e}") from None
            print(f"agentgate connect: postgres on {pg.route.listen_host}:{pg.port}, "
                  f"forwarding to {pg.route.gateway_host}:{pg.route.gateway_port} with the "
                  f"token as the password", file=sys.stderr, flush=True)
        print(f"agentgate connect: listening on http://{cfg.listen_host}:{conn.port}, "
              f"forwarding to http://{cfg.gateway_host}:{cfg.gateway_port} with the token "
              f"from {source.describe}", file=sys.stderr, flush=True)
        # SIGTERM (a pod stopping) ends the connector cleanly, like Ctrl-C
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for pg in pgs:
            await pg.close()
        await conn.close()

    asyncio.run(main())
    return 0
