"""Command line: `qntx-<name>-plugin` (as QNTX launches it) and `kernel-provider` (for people)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path

from kernel_provider.config import (
    CONFIG_FIELDS,
    DEFAULT_EXECUTE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KERNEL,
    DEFAULT_MAX_KERNELS,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_POOL_SIZE,
    DEFAULT_PORT,
    DEFAULT_WATCHER_KERNELS,
    DEFAULT_WATCHER_QUEUE,
    DEFAULT_WATCHER_SHARE,
    ISOLATION_MODES,
    KERNEL_NETWORKS,
    ConfigError,
    Settings,
    parse_gateway_url,
    parse_idle_timeout,
    parse_max_kernels,
    parse_memory_limit,
    parse_output_limit,
    parse_pool_size,
    parse_timeout,
    parse_watcher_kernels,
    parse_watcher_mode,
    parse_watcher_queue,
    parse_watcher_share,
)

log = logging.getLogger("kernel_provider")

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_PLUGIN_FILE_NAME = re.compile(r"qntx-(?P<name>.+)-plugin(\.exe)?")


def name_from_executable(path: str) -> str:
    """`qntx-bio-plugin` -> `bio`; anything else is the default plugin `python`."""
    match = _PLUGIN_FILE_NAME.fullmatch(Path(path).name)
    return match.group("name") if match else "python"


def _argument_type(parse, flag: str):
    """Reuse a config parser as an argparse type, so flags and config keys share one rule."""

    def convert(raw: str):
        try:
            return parse(flag, raw)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _host_port(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {raw!r}")
    return host.strip("[]"), int(port)


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port to listen on; the next nine are tried when it is taken (0: any free port) (default %(default)s)",
    )
    parser.add_argument(
        "--address",
        type=_host_port,
        help="HOST:PORT to listen on, used as given (exit 1 when taken); overrides --port (default host 127.0.0.1)",
    )
    parser.add_argument(
        "--name",
        help="plugin name reported in Metadata (default: from the executable's name qntx-NAME-plugin)",
    )
    parser.add_argument(
        "--log-level", choices=list(LOG_LEVELS), default="info", help="logs go to stderr (default %(default)s)"
    )
    parser.add_argument(
        "--kernel",
        action="append",
        help="kernelspec of glyph kernels (default python3); repeat it to serve several: the first is the default "
        "and a glyph whose code starts with `#| kernel: NAME` runs on NAME",
    )
    parser.add_argument(
        "--execute-timeout",
        type=_argument_type(parse_timeout, "--execute-timeout"),
        default=DEFAULT_EXECUTE_TIMEOUT,
        metavar="SECONDS",
        help=CONFIG_FIELDS["execute_timeout"].description.rstrip(".") + " (default %(default)g).",
    )
    parser.add_argument(
        "--max-output-bytes",
        type=_argument_type(parse_output_limit, "--max-output-bytes"),
        default=DEFAULT_MAX_OUTPUT_BYTES,
        metavar="BYTES",
        help=CONFIG_FIELDS["max_output_bytes"].description.rstrip(".") + " (default %(default)s).",
    )
    lifecycle = [
        ("--pool-size", parse_pool_size, DEFAULT_POOL_SIZE, "N"),
        ("--idle-timeout", parse_idle_timeout, DEFAULT_IDLE_TIMEOUT, "SECONDS"),
        ("--max-kernels", parse_max_kernels, DEFAULT_MAX_KERNELS, "N"),
        ("--kernel-memory-limit", parse_memory_limit, None, "MB"),
        ("--watcher-kernels", parse_watcher_kernels, DEFAULT_WATCHER_KERNELS, "N"),
        ("--watcher-queue", parse_watcher_queue, DEFAULT_WATCHER_QUEUE, "N"),
        ("--watcher-mode", parse_watcher_mode, "reset", "reset|fresh"),
        ("--watcher-share", parse_watcher_share, DEFAULT_WATCHER_SHARE, "SHARE"),
    ]
    for flag, parse, default, metavar in lifecycle:
        key = flag[2:].replace("-", "_")
        parser.add_argument(
            flag,
            type=_argument_type(parse, flag),
            default=default,
            metavar=metavar,
            help=CONFIG_FIELDS[key].description.rstrip(".")
            + (
                "."
                if default is None
                else " (default %(default)g)."
                if isinstance(default, float | int)
                else " (default %(default)s)."
            ),
        )
    parser.add_argument(
        "--connection-dir", type=Path, help="folder for live kernels' connection files (created mode 0700)"
    )
    parser.add_argument(
        "--isolation",
        choices=ISOLATION_MODES,
        default="auto",
        help="run glyph kernels in a sandbox: auto (where the platform allows, else unsandboxed with a warning), "
        "sandbox (refuse to start where impossible) or none (default %(default)s)",
    )
    parser.add_argument(
        "--kernel-network",
        choices=KERNEL_NETWORKS,
        default="none",
        help="network of a sandboxed kernel: none (a private loopback only) or host (the host's, loopback included) "
        "(default %(default)s)",
    )
    gateway = parser.add_argument_group("kernels on a Jupyter Kernel Gateway or Enterprise Gateway")
    gateway.add_argument(
        "--gateway-url",
        type=_argument_type(parse_gateway_url, "--gateway-url"),
        default=os.environ.get("JUPYTER_GATEWAY_URL", ""),
        metavar="URL",
        help="run every glyph kernel on this gateway (default: $JUPYTER_GATEWAY_URL; none: kernels on this machine)",
    )
    gateway.add_argument(
        "--gateway-token",
        default=os.environ.get("JUPYTER_GATEWAY_AUTH_TOKEN", ""),
        metavar="TOKEN",
        help="the gateway's auth token (default: $JUPYTER_GATEWAY_AUTH_TOKEN)",
    )
    gateway.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="folder (0700) remembering each glyph's gateway kernel, so glyphs keep their state across restarts",
    )


def settings_from_args(args: argparse.Namespace, executable: str) -> Settings:
    host, port = args.address if args.address else ("127.0.0.1", args.port)
    return Settings(
        name=args.name or name_from_executable(executable),
        host=host,
        port=port,
        retry_port=args.address is None,
        kernel=(args.kernel or [DEFAULT_KERNEL])[0],
        extra_kernels=tuple(args.kernel or ()),
        execute_timeout=args.execute_timeout,
        max_output_bytes=args.max_output_bytes,
        pool_size=args.pool_size,
        idle_timeout=args.idle_timeout,
        max_kernels=args.max_kernels,
        kernel_memory_limit=args.kernel_memory_limit,
        watcher_kernels=args.watcher_kernels,
        watcher_queue=args.watcher_queue,
        watcher_mode=args.watcher_mode,
        watcher_share=args.watcher_share,
        connection_dir=args.connection_dir.resolve() if args.connection_dir else None,
        log_level=args.log_level,
        isolation=args.isolation,
        kernel_network=args.kernel_network,
        gateway_url=args.gateway_url,
        gateway_token=args.gateway_token,
        state_dir=args.state_dir.resolve() if args.state_dir else None,
    )


def setup_logging(level: str) -> None:
    # stdout belongs to the QNTX_PLUGIN_PORT line; every log line goes to stderr.
    logging.basicConfig(
        stream=sys.stderr,
        level=LOG_LEVELS[level],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_server(settings: Settings) -> int:
    from kernel_provider.connection_dir import ConnectionDirError
    from kernel_provider.provider import check_kernelspecs
    from kernel_provider.server import BindError, serve

    setup_logging(settings.log_level)
    try:
        if not settings.gateway_url:  # a gateway's kernelspecs are the gateway's to check
            check_kernelspecs(*settings.served_kernels)
    except ConfigError as exc:
        print(f"kernel_provider: {exc}", file=sys.stderr)
        return 2
    if settings.gateway_url:  # the gateway runs the kernels, so isolating them is the gateway's (pods, images)
        settings = dataclasses.replace(settings, isolation="none")
    if settings.isolation != "none":
        from kernel_provider.kernels.sandbox import sandbox_problem

        problem = sandbox_problem()
        if problem is not None and settings.isolation == "sandbox":
            print(f"kernel_provider: --isolation sandbox is impossible here: {problem}", file=sys.stderr)
            return 2
        if problem is not None:
            print(f"kernel_provider: glyph kernels run unsandboxed: {problem}", file=sys.stderr)
        settings = dataclasses.replace(settings, isolation="none" if problem else "sandbox")
        if problem is None:
            log.info("glyph kernels run in bubblewrap sandboxes, network %s", settings.kernel_network)
    try:
        return asyncio.run(serve(settings))
    except BindError as exc:
        print(f"kernel_provider: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, ConnectionDirError) as exc:  # a state or connection folder we may not use
        print(f"kernel_provider: {exc}", file=sys.stderr)
        return 2


def plugin_main(argv: list[str] | None = None) -> int:
    """Entry point QNTX launches: `qntx-NAME-plugin --port N [args]`."""
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name, description="QNTX Python provider on Jupyter kernels")
    add_server_flags(parser)
    args = parser.parse_args(argv)
    return run_server(settings_from_args(args, sys.argv[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel-provider", description="QNTX Python provider on Jupyter kernels")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the plugin server, as QNTX would launch it")
    add_server_flags(serve_parser)

    run_parser = commands.add_parser("run", help="run code on a provider and print what it said")
    run_parser.add_argument("code", help="Python source to run ('-' reads it from standard input)")
    run_parser.add_argument("--glyph", default="", help="glyph id (its kernel and state persist on the provider)")
    run_parser.add_argument(
        "--target", type=_host_port, help="HOST:PORT of a running provider (default: start one for this call)"
    )
    run_parser.add_argument(
        "--kernel", default=DEFAULT_KERNEL, help="kernelspec for the provider started for this call"
    )
    run_parser.add_argument("--upstream", default="", help="JSON attestation passed as `upstream`")
    run_parser.add_argument("--json", action="store_true", help="print the whole ExecutionResult JSON")

    from kernel_provider import variants

    variants.add_commands(commands)
    from kernel_provider.environments import add_env_parser

    add_env_parser(commands)
    from kernel_provider.lab import add_inspect_parsers

    add_inspect_parsers(commands)
    from kernel_provider.notebook import add_notebook_parser

    add_notebook_parser(commands)

    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the usage of the command that was given, not the top-level one
        _innermost_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        return run_server(settings_from_args(args, "kernel-provider"))
    if args.command == "variant":
        return args.handler(args)
    if args.command in ("env", "kernels", "lab", "notebook"):
        return args.handler(args)
    from kernel_provider.client import run_command

    code = sys.stdin.read() if args.code == "-" else args.code
    return run_command(
        code,
        glyph_id=args.glyph,
        target=args.target,
        kernel=args.kernel,
        upstream=args.upstream.encode(),
        as_json=args.json,
    )


def _innermost_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ARGS chose, e.g. that of `env create`."""
    while True:
        chosen = [
            action.choices[getattr(args, action.dest)]
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices
        ]
        if not chosen:
            return parser
        parser = chosen[0]


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for output in result.get("outputs", []):
        kind = output["output_type"]
        if kind == "stream":
            stream = sys.stdout if output["name"] == "stdout" else sys.stderr
            stream.write(output["text"])
            stream.flush()
        elif kind in ("execute_result", "display_data"):
            data = output.get("data", {})
            text = data.get("text/plain", "")
            others = [m for m in data if m != "text/plain"]
            prefix = f"Out[{output.get('execution_count')}]: " if kind == "execute_result" else ""
            suffix = f"  [{', '.join(others)}]" if others else ""
            print(f"{prefix}{text}{suffix}")
    if result.get("error"):
        print(result["error"], file=sys.stderr)
    sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
