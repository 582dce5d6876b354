"""The ``ingestd`` command line: run, migrate, check-config, spool, anomaly, tasks, simulate,
demo."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson

from daemon import __version__
from daemon.config import Config, ConfigError, load_config, mask_url, masked
from daemon.logs import setup_logging
from daemon.loop import run_async

log = logging.getLogger("ingestd")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    code: int = args.handler(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingestd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ingestd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    for name, handler, text in (
        ("run", _run, "run the daemon in the foreground (systemd Type=notify)"),
        ("migrate", _migrate, "apply all database migrations"),
        ("check-config", _check_config, "validate the configuration and print it, secrets masked"),
    ):
        sub = command(name, handler, text)
        sub.add_argument(
            "-c",
            "--config",
            type=Path,
            help="TOML file (default /etc/ingestd/ingestd.toml if present)",
        )

    spool = command("spool", _spool_stats, "the store-and-forward spool")
    spool_commands = spool.add_subparsers(dest="spool_command", metavar="COMMAND", required=True)
    stats = spool_commands.add_parser("stats", help="print what waits in the spool (JSON)")
    stats.add_argument("-c", "--config", type=Path, help="TOML file")

    anomaly = command("anomaly", _anomaly_replay, "the streaming anomaly detector, offline")
    anomaly_commands = anomaly.add_subparsers(
        dest="anomaly_command", metavar="COMMAND", required=True
    )
    _add_replay(anomaly_commands)

    from daemon import tasks_cli  # noqa: PLC0415 - `ingestd run` needs none of it

    tasks_cli.add_arguments(command)
    from edge import simulator  # noqa: PLC0415 - keeps `ingestd run` from importing the simulator

    simulator.add_arguments(
        command("simulate", simulator.run, "publish simulated plant-floor readings")
    )
    from daemon import demo  # noqa: PLC0415

    demo.add_arguments(
        command("demo", demo.run, "broker + simulator + daemon on the embedded defaults")
    )
    return parser


REPLAY_HELP = """\
Run the streaming anomaly detector, with a fresh state, over a CSV of one series' readings,
as the daemon would judge them live (time is each row's timestamp, never the clock).

Input columns (a header row names them, in any order; other columns are ignored):
  timestamp   ISO-8601 (2026-11-27T07:30:00Z, +01:00 offsets) or YYYY-MM-DD HH:MM:SS;
              without an offset it is UTC
  value       a finite number

Output columns (stdout, or --out FILE), one row per input row:
  timestamp      the input's text
  value          the input's text
  anomaly_score  0..1, six decimals; reported only where it beats the previous 200 rows'
  alert          1 on the row where the daemon would open an `anomaly` alert with the
                 default [anomaly] settings: score >= alert_threshold after the warm-up
                 (warmup readings and a day of reading time), no alert in the previous
                 cooldown rows, and none open (an episode closes after clear_seconds of
                 normal reading time; another opens no sooner than cooldown_seconds), else 0

Bad input (missing file, no header, a bad timestamp or value, NaN or infinity) stops the
replay with one line naming the file and line, and exit status 1. docs/anomaly.md has the
settings --set can change."""


def _add_replay(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay",
        help="the detector over a timestamp,value CSV",
        description=REPLAY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("file", type=Path, metavar="FILE.csv", help="timestamp,value CSV")
    replay.add_argument("--out", type=Path, metavar="FILE", help="write here, not to stdout")
    replay.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change a detector setting, e.g. --set cooldown=600 (repeatable)",
    )


def _anomaly_replay(args: argparse.Namespace) -> int:
    from agents.anomaly.replay import ReplayError, parse_settings, replay, replay_to_path  # noqa: PLC0415

    try:
        settings = parse_settings(args.set)
        if args.out is None:
            replay(args.file, sys.stdout, settings)
        else:
            replay_to_path(args.file, args.out, settings)
    except ReplayError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `ingestd anomaly replay x.csv | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _load(args: argparse.Namespace) -> Config | None:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 1
    if config.ingest.registry_file is not None:
        from agents.registry import DeviceRegistry, RegistryError, load_registry_file  # noqa: PLC0415

        try:
            DeviceRegistry(load_registry_file(config.ingest.registry_file))
        except RegistryError as exc:
            print(f"ingestd: {exc}", file=sys.stderr)
            return 1
    sys.stdout.write(orjson.dumps(masked(config), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _spool_stats(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 1
    from db.spool import read_stats  # noqa: PLC0415

    path = config.spool_path
    try:
        stats = read_stats(path)
    except sqlite3.Error as exc:
        print(f"ingestd: cannot read the spool {path}: {exc}", file=sys.stderr)
        return 1
    report = {
        "path": str(path),
        "readings": stats.readings,
        "rejections": stats.rejections,
        "batches": stats.batches,
        "bytes": stats.bytes,
        "max_bytes": config.spool.max_bytes,
        "oldest_age_seconds": round(stats.oldest_age(), 3),
    }
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 1
    setup_logging(config.log.level, config.log.format)
    from db.schema import head_revision, upgrade  # noqa: PLC0415

    url = config.database_url
    try:
        upgrade(url)
    except Exception as exc:  # noqa: BLE001 - the CLI edge: any failure becomes one clear line
        print(f"ingestd: migration of {mask_url(url)} failed: {exc}", file=sys.stderr)
        return 1
    print(f"ingestd: {mask_url(url)} is at revision {head_revision()}")
    return 0


def _run(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 1
    setup_logging(config.log.level, config.log.format)
    from daemon.wiring import prepare_schema  # noqa: PLC0415

    # Nothing is received yet while the schema is checked: a stop request simply exits.
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before start-up finished: no-op
    problem = prepare_schema(config)
    if problem:
        print(f"ingestd: {problem}", file=sys.stderr)
        return 1
    return run_daemon(config, args.config)


def _exit_now(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def run_daemon(config: Config, config_file: Path | None = None) -> int:
    from daemon.supervisor import FatalError, Supervisor  # noqa: PLC0415

    async def daemon() -> None:
        await Supervisor(config, config_file=config_file).run()

    try:
        run_async(daemon)
    except (FatalError, ExceptionGroup) as exc:
        fatal = exc.subgroup(FatalError) if isinstance(exc, ExceptionGroup) else exc
        if fatal is None:
            raise
        log.critical("fatal: %s", fatal)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
