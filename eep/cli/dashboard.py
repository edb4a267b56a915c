"""`eep dashboard`: serve the live dashboard over run directories (read-only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from eep.dashboard.rundata import is_run_dir
from eep.dashboard.server import DEFAULT_HOST, DEFAULT_PORT, make_server

NAME = "dashboard"
HELP = "watch campaigns in the browser: fitness curves, expert map, workers (read-only)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep dashboard`."""
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                        help="run directories, live or finished (default: every run under ./runs, "
                             "including ones started later)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the runs to the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8266; 0: any free)")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: a port is 0..65535 (0: any free one)")
    run_dirs = [Path(p) for p in args.run_dirs]
    roots: list[Path] = []
    for path in run_dirs:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run directory")
        if not is_run_dir(path):
            raise ValueError(f"{path}: not a run directory (no config.yaml or evaluations.jsonl)")
    if not run_dirs:
        roots = [Path("runs")]
        if not roots[0].is_dir():
            raise FileNotFoundError("no RUN_DIR given and no ./runs folder: name the run directories")
    try:
        server = make_server(run_dirs, args.host, args.port, roots=roots)
    except OSError as exc:
        raise ValueError(str(exc)) from exc  # a message for the user, not a traceback
    names = ", ".join(v.name for v in server.runs.views()) or "(none yet)"
    print(f"eep dashboard: {server.url}  (runs: {names}; Ctrl-C stops)")
    if not server.loopback_only:
        print("warning: bound to a non-loopback address; anyone who can reach it can read these runs")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
