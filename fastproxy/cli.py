"""Command line: run the master, test a config, or signal a running master."""
from __future__ import annotations

import argparse
import os
import sys

from fastproxy import __version__

DEFAULT_CONFIG = "/etc/fastproxy/fastproxy.toml"
SIGNALS = ("reload", "quit", "stop", "reopen")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="fastproxy", description="Reverse proxy and API gateway (pre-fork master + workers).")
    parser.add_argument("-c", "--config", default=os.environ.get("FASTPROXY_CONFIG", DEFAULT_CONFIG),
                        help=f"configuration file (default: $FASTPROXY_CONFIG or {DEFAULT_CONFIG})")
    parser.add_argument("-t", "--test", action="store_true",
                        help="check the configuration file and exit (0 valid, 1 invalid)")
    parser.add_argument("-s", "--signal", choices=SIGNALS,
                        help="send a signal to the running master (found through pid_file)")
    parser.add_argument("-v", "--version", action="store_true",
                        help="print the version and the versions of the core libraries")
    return parser.parse_args(argv)


def print_version() -> None:
    from fastproxy import _core

    libs = ", ".join(f"{name} {version}" for name, version in _core.versions().items())
    print(f"fastproxy {__version__} (python {sys.version.split()[0]}; {libs})")


def test_config(path: str) -> int:
    from fastproxy.config import load_runtime
    from fastproxy.errors import ConfigError

    from fastproxy.config.tls import expiry_warnings

    try:
        runtime = load_runtime(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        print(f"configuration file {path} test failed", file=sys.stderr)
        return 1
    for warning in expiry_warnings(runtime):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    print(f"configuration file {path} test is successful")
    return 0


def send_signal(path: str, name: str) -> int:
    from fastproxy.config import load_runtime
    from fastproxy.errors import FastproxyError
    from fastproxy.master.pidfile import signal_master

    try:
        signal_master(load_runtime(path).main.pid_file, name)
    except FastproxyError as e:
        print(f"fastproxy: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        print_version()
        return 0
    if args.test:
        return test_config(args.config)
    if args.signal:
        return send_signal(args.config, args.signal)
    from fastproxy.master.arbiter import run_master

    return run_master(args.config)


if __name__ == "__main__":
    sys.exit(main())
