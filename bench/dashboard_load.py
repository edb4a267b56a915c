"""Dashboard under load: N parallel full reads of a big run while /api/runs is polled.

    python bench/dashboard_load.py --evaluations 100000 --parallel 20

Writes a synthetic run directory (tests/fixtures/runs/synthetic.py) of the given size, starts
the dashboard server in this process on a free port, then fires `--parallel` requests for
`/api/runs/<run>/evaluations?since=0` at once and, meanwhile, times `/api/runs` every 0.25 s.
`--format columns` asks as the page does. Prints each request's latency (a serialised server answers them one after another).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "runs"))


def fetch(url: str) -> tuple[float, int]:
    """Seconds and bytes of one GET."""
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as answer:
        body = answer.read()
    return time.perf_counter() - start, len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=100_000)
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--format", choices=("records", "columns"), default="records",
                        help="columns: what the page asks for")
    args = parser.parse_args()
    from synthetic import SyntheticRun

    from eep.dashboard.server import make_server

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "big"
        start = time.perf_counter()
        SyntheticRun(run_dir, total_iter=args.evaluations - 1).append(args.evaluations)
        print(f"wrote {args.evaluations} records in {time.perf_counter() - start:.1f}s")
        server = make_server([run_dir], host="127.0.0.1", port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        runs = json.loads(urllib.request.urlopen(f"{base}/api/runs").read())
        name = (runs["runs"] if isinstance(runs, dict) else runs)[0]["name"]
        fetch(f"{base}/api/runs/{name}/evaluations?since=0")  # the server's first read
        polls: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                polls.append(fetch(f"{base}/api/runs")[0])
                time.sleep(0.25)

        poller = threading.Thread(target=poll)
        poller.start()
        url = f"{base}/api/runs/{name}/evaluations?since=0"
        if args.format == "columns":
            url += "&format=columns"
        start = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(fetch, [url] * args.parallel))
        wall = time.perf_counter() - start
        done.set()
        poller.join()
        server.shutdown()
    latencies = sorted(s for s, _ in results)
    print(f"{args.parallel} parallel evaluations?since=0 ({args.format}): wall {wall:.2f}s, latency min "
          f"{latencies[0]:.2f}s median {latencies[len(latencies) // 2]:.2f}s max {latencies[-1]:.2f}s, "
          f"{results[0][1] / 1e6:.1f} MB each")
    print(f"/api/runs meanwhile: {len(polls)} polls, max {max(polls):.3f}s, "
          f"median {sorted(polls)[len(polls) // 2]:.3f}s")


if __name__ == "__main__":
    main()
