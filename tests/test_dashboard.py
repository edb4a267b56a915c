"""Dashboard server and run view: JSON API, live reading, read-only, refusals (no browser)."""

from __future__ import annotations

import http.client
import json
import math
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fixtures.runs.synthetic import SyntheticRun

from eep.cli import main as eep_main
from eep.dashboard import dashboard_hint, start_dashboard
from eep.dashboard.rundata import RunView, unique_names
from eep.dashboard.server import RunSet


def _strict(text: str):
    """json.loads that refuses NaN/Infinity, as a browser's JSON.parse does."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def request(url: str, path: str, method: str = "GET", headers: dict | None = None):
    """A raw request (the path is sent exactly as given, no normalisation)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest(method, path, skip_host=True)
    for key, value in ({"Host": parts.netloc} | (headers or {})).items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, dict(response.getheaders())


def get_json(url: str, path: str):
    status, body, headers = request(url, path)
    assert status == 200, (path, status, body[:200])
    assert headers["Content-Type"] == "application/json"
    return _strict(body.decode())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> SyntheticRun:
    run = SyntheticRun(tmp_path_factory.mktemp("runs") / "finished", total_iter=59, candidates="all")
    run.append(60)
    run.finish()
    return run


@pytest.fixture
def live_run(tmp_path) -> SyntheticRun:
    run = SyntheticRun(tmp_path / "live", total_iter=99, start=time.time() - 100)
    run.append(30)
    return run


@pytest.fixture
def serve():
    servers = []

    def _serve(*run_dirs, **kwargs):
        server, url = start_dashboard(list(run_dirs), port=0, **kwargs)
        servers.append(server)
        return url

    yield _serve
    for server in servers:
        server.shutdown()
        server.server_close()


def snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------- API
def test_runs_lists_name_path_status_counts_best(serve, finished_run, live_run):
    url = serve(finished_run.path, live_run.path)
    runs = get_json(url, "/api/runs")
    assert [r["name"] for r in runs] == ["finished", "live"]
    done, live = runs
    assert done["path"] == str(finished_run.path)
    assert done["status"] == "finished" and live["status"] == "running"
    assert done["counts"]["search"] == 60 and done["counts"]["splits"] == {"search": 60, "dev": 1, "test": 5}
    assert done["budget"] == 60
    assert done["best"]["id"] == finished_run.best_id
    assert done["best"]["score"] == pytest.approx(finished_run.best)
    assert live["counts"]["search"] == 30 and live["budget"] == 100


def test_evaluations_since_offset_and_nan_as_null(serve, finished_run):
    url = serve(finished_run.path)
    everything = get_json(url, "/api/runs/finished/evaluations")
    assert everything["since"] == 0 and everything["next"] == everything["total"] == 66
    records = everything["records"]
    assert records[0]["id"] == "eep-00000" and records[-1]["split"] == "test"
    failed = [r for r in records if r["error"]]
    assert failed and all(r["score"] is None for r in failed)  # NaN in the file, null on the wire
    tail = get_json(url, "/api/runs/finished/evaluations?since=50")
    assert tail["since"] == 50 and len(tail["records"]) == 16 and tail["records"] == records[50:]
    page = get_json(url, "/api/runs/finished/evaluations?since=10&limit=5")
    assert [r["id"] for r in page["records"]] == [r["id"] for r in records[10:15]] and page["next"] == 15
    cols = get_json(url, "/api/runs/finished/evaluations?since=60&format=columns")
    assert cols["columns"]["split"] == ["dev"] + ["test"] * 5
    assert len(cols["columns"]["score"]) == 6
    status, _, _ = request(url, "/api/runs/finished/evaluations?since=x")
    assert status == 400


def test_best_has_matrices_of_the_best_search_candidate(serve, finished_run):
    url = serve(finished_run.path)
    best = get_json(url, "/api/runs/finished/best")
    assert best["id"] == finished_run.best_id and best["score"] == pytest.approx(finished_run.best)
    assert best["num_experts"] == 8 and best["keep"] == [2, 2, 2, 2]
    assert len(best["layers"]) == 4
    for layer in best["layers"]:
        for key in ("router_map", "expert_merge"):
            assert len(layer[key]) == 2 and all(len(row) == 8 for row in layer[key])
    assert len(best["kept"]) == 4


def test_summary_progress_phase_boundary_workers_final(serve, finished_run):
    url = serve(finished_run.path)
    s = get_json(url, "/api/runs/finished/summary")
    assert s["progress"]["done"] == 60 and s["progress"]["budget"] == 60 and s["progress"]["fraction"] == 1
    assert s["phase_boundary"] == finished_run.discrete  # first record with phase "merge"
    assert s["config"]["strategy"] == "eep" and s["config"]["keep"] == 2
    assert [w["worker"] for w in s["workers"]] == ["worker-0", "worker-1", "worker-2"]
    assert sum(w["evaluations"] for w in s["workers"]) == 66
    assert all(0 < w["utilisation"] <= 1 and w["per_min"] > 0 for w in s["workers"])
    assert s["final"]["methods"]["eep"]["id"] == finished_run.best_id
    assert s["held_out"]["dev"][0]["at"] == int(finished_run.best_id.split("-")[1])
    scores = [step[2] for step in s["best_steps"]]
    assert scores == sorted(scores) and scores[-1] == pytest.approx(finished_run.best)


def test_live_run_updates_and_eta(serve, live_run):
    url = serve(live_run.path)
    first = get_json(url, "/api/runs/live/evaluations?format=columns")
    assert first["next"] == 30
    live_run.append(5, wall=True)
    later = get_json(url, f"/api/runs/live/evaluations?since={first['next']}&format=columns")
    assert later["since"] == 30 and later["next"] == 35 and len(later["columns"]["id"]) == 5
    s = get_json(url, "/api/runs/live/summary")
    assert s["status"] == "running"
    assert s["progress"]["rate_per_min"] > 0 and s["progress"]["eta_seconds"] > 0


def test_torn_last_line_waits_and_is_never_repaired(tmp_path, live_run):
    path = live_run.path / "evaluations.jsonl"
    view = RunView(live_run.path)
    view.refresh()
    whole = path.read_bytes()
    line = json.dumps({"id": "eep-00030", "split": "search", "phase": "prune", "score": 0.9,
                       "worker": "worker-0", "seconds": 1.0, "time": time.time()}) + "\n"
    with open(path, "ab") as f:
        f.write(line[:25].encode())  # the campaign is mid-write
    assert view.records_since(0)["total"] == 30
    assert path.read_bytes() == whole + line[:25].encode()  # not truncated
    with open(path, "ab") as f:
        f.write(line[25:].encode())
    assert view.records_since(30)["records"][0]["id"] == "eep-00030"
    assert view.overview()["best"]["score"] == 0.9


def test_a_new_campaign_in_the_same_directory_is_read_from_the_start(live_run):
    view = RunView(live_run.path)
    assert view.records_since(0)["total"] == 30
    (live_run.path / "evaluations.jsonl").write_text(json.dumps({"id": "x", "split": "search", "score": 0.1}) + "\n")
    assert view.records_since(0)["total"] == 1


def test_serving_never_writes_to_the_run(serve, finished_run, live_run):
    with open(live_run.path / "evaluations.jsonl", "a") as f:
        f.write('{"id": "eep-00030", "split": "sea')  # torn: RunLog.open would truncate it
    before = snapshot(finished_run.path) | snapshot(live_run.path)
    url = serve(finished_run.path, live_run.path)
    for name in ("finished", "live"):
        for what in ("evaluations", "evaluations?format=columns", "best", "summary"):
            request(url, f"/api/runs/{name}/{what}")
    request(url, "/api/runs")
    assert snapshot(finished_run.path) | snapshot(live_run.path) == before


# --------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("path", [
    "/static/../server.py",
    "/static/..%2fserver.py",
    "/static/%2e%2e/%2e%2e/pyproject.toml",
    "/static/",
    "/static/sub/app.js",
    "/../../../../etc/passwd",
    "/..%2f..%2f..%2fetc%2fpasswd",
    "//etc/passwd",
    "/api/runs/..%2f..%2fetc/evaluations",
    "/api/runs/../summary",
    "/api/runs/finished/../../config.yaml",
    "/api/runs/finished/candidates",
    "/api/runs/nope/summary",
    "/api/runs/finished/config.yaml",
    "/finished/config.yaml",
])
def test_path_traversal_and_unknown_paths_are_refused(serve, finished_run, path):
    url = serve(finished_run.path)
    status, body, _ = request(url, path)
    assert status == 404
    assert b"root:" not in body and b"model:" not in body and b"import" not in body


def test_static_files_and_security_headers(serve, finished_run):
    url = serve(finished_run.path)
    status, body, headers = request(url, "/")
    assert status == 200 and b"eep dashboard" in body and b"http" not in body.replace(b"http-equiv", b"")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, body, headers = request(url, "/static/app.js")
    assert status == 200 and "javascript" in headers["Content-Type"]


def test_page_needs_no_internet():
    static = Path(__file__).parents[1] / "eep" / "dashboard" / "static"
    for path in static.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text, f"{path.name} loads something remote"


def test_writes_and_foreign_hosts_are_refused(serve, finished_run):
    url = serve(finished_run.path)
    assert request(url, "/api/runs", method="POST")[0] == 405
    assert request(url, "/api/runs", method="DELETE")[0] == 405
    assert request(url, "/api/runs", headers={"Host": "evil.example:8266"})[0] == 403  # DNS rebinding
    assert request(url, "/api/runs", headers={"Host": f"localhost:{urlsplit(url).port}"})[0] == 200


def test_binds_loopback_by_default(serve, finished_run):
    url = serve(finished_run.path)
    assert urlsplit(url).hostname == "127.0.0.1"


def test_candidate_ids_cannot_name_other_files(finished_run):
    view = RunView(finished_run.path)
    for bad in ("../config", "../../etc/passwd", "/etc/passwd", ".hidden", "a/b", ""):
        assert view.candidate(bad) is None
    assert view.candidate(finished_run.best_id)["num_experts"] == 8


# --------------------------------------------------------------------------------- names, roots, CLI
def test_unique_names_for_runs_with_the_same_folder_name(tmp_path):
    paths = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c" / "my run!"]
    assert unique_names(paths) == ["run", "run-2", "my_run_"]


def test_runs_created_later_under_a_root_appear(tmp_path):
    runs = RunSet([], roots=[tmp_path])
    assert runs.views() == []
    SyntheticRun(tmp_path / "later", total_iter=9).append(3)
    assert [v.name for v in runs.views()] == ["later"]
    assert runs.get("later").overview()["counts"]["search"] == 3


def test_hint_names_the_command_and_url():
    assert dashboard_hint("runs/tiny") == "watch it live: eep dashboard runs/tiny  ->  http://127.0.0.1:8266"


def test_cli_refuses_what_is_not_a_run_directory(tmp_path, capsys):
    assert eep_main(["dashboard", str(tmp_path / "missing")]) == 2
    assert eep_main(["dashboard", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_waiting_run_without_files(tmp_path):
    view = RunView(tmp_path / "not-yet")
    assert view.overview()["status"] == "waiting"
    assert view.best() is None
    summary = view.summary()
    assert summary["progress"]["done"] == 0 and not math.isnan(summary["progress"]["elapsed"])


def test_a_taken_port_is_reported_clearly(serve, finished_run):
    url = serve(finished_run.path)
    with pytest.raises(OSError, match="another eep dashboard"):
        start_dashboard([finished_run.path], port=urlsplit(url).port)


# --------------------------------------------------------------------------------- robustness
def test_one_pathological_line_breaks_neither_its_run_nor_the_others(serve, tmp_path, finished_run):
    broken = SyntheticRun(tmp_path / "broken", total_iter=99, start=time.time() - 100)
    broken.append(5)
    with open(broken.path / "evaluations.jsonl", "a") as f:
        f.write("[" * 100_000 + "\n")  # json.loads raises RecursionError, not a decode error
        f.write('{"id": "deep", "split": "search", "phase": ' + "[" * 900 + "]" * 900 + "}\n")
        f.write("[1, 2]\n")
    broken.append(3)
    url = serve(finished_run.path, broken.path)
    runs = get_json(url, "/api/runs")
    assert [r["counts"]["search"] for r in runs] == [60, 9]  # the deep one is a record
    for what in ("evaluations", "evaluations?format=columns", "summary", "best"):
        get_json(url, f"/api/runs/broken/{what}")
    assert get_json(url, "/api/runs/broken/summary")["skipped_lines"] == 2


def test_negative_limit_is_refused_and_answers_are_paged(serve, tmp_path):
    from eep.dashboard.rundata import MAX_RECORDS

    big = SyntheticRun(tmp_path / "big", total_iter=MAX_RECORDS + 99)
    big.append(MAX_RECORDS + 10)
    url = serve(big.path)
    for query in ("since=10&limit=-5", "since=-1"):
        status, body, _ = request(url, f"/api/runs/big/evaluations?{query}")
        assert status == 400 and b">= 0" in body
    first = get_json(url, "/api/runs/big/evaluations?since=0")
    assert len(first["records"]) == MAX_RECORDS and first["next"] == MAX_RECORDS  # then poll from next
    rest = get_json(url, f"/api/runs/big/evaluations?since={first['next']}&limit={10 * MAX_RECORDS}")
    assert rest["next"] == rest["total"] == MAX_RECORDS + 10 and len(rest["records"]) == 10


# --------------------------------------------------------------------------------- a real campaign
# The same API over a run directory written by `eep.campaign` (the `real_run` fixture), so a field
# the campaign renames or stops writing fails here, not only in a user's browser.
def _file_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]


def test_real_campaign_runs_and_evaluations(serve, real_run):
    url = serve(real_run.run_dir)
    records = _file_records(real_run.run_dir)
    search = [r for r in records if r["split"] == "search"]
    (run,) = get_json(url, "/api/runs")
    assert run["name"] == "real-tiny" and run["status"] == "finished"
    assert run["counts"]["search"] == len(search) == real_run.summary["search_evaluations"] == 20
    splits: dict[str, int] = {}
    for r in records:
        splits[r["split"]] = splits.get(r["split"], 0) + 1
    assert run["counts"]["splits"] == splits and set(splits) == {"search", "dev", "test"}
    assert run["counts"]["failed"] == 0 and run["budget"] == 20
    top = max(r["score"] for r in search)
    first_top = next(i for i, r in enumerate(search) if r["score"] == top)
    assert run["best"] == {"id": search[first_top]["id"], "score": top, "index": first_top}

    served = get_json(url, "/api/runs/real-tiny/evaluations")
    assert served["total"] == len(records)
    assert [(r["id"], r["split"], r["score"]) for r in served["records"]] == [
        (r["id"], r["split"], r["score"]) for r in records
    ]
    cols = get_json(url, "/api/runs/real-tiny/evaluations?format=columns")["columns"]
    assert cols["phase"][: len(search)] == [r["phase"] for r in search]
    assert cols["worker"] == ["local"] * len(records)
    assert all(e is not None and e >= 0 for e in cols["elapsed"][: len(search)])


def test_real_campaign_best_matches_its_candidate_file(serve, real_run):
    from eep.candidate import Candidate

    url = serve(real_run.run_dir)
    best = get_json(url, "/api/runs/real-tiny/best")
    assert not best.get("missing"), "the best search candidate's file is not in the run"
    saved = Candidate.load(real_run.run_dir / "candidates" / f"{best['id']}.safetensors")
    assert best["num_experts"] == 8 and best["keep"] == [4, 4] == saved.keep_per_layer
    assert best["kept"] == saved.kept_experts()
    assert best["layers"] == [
        {"router_map": r.tolist(), "expert_merge": m.tolist()}
        for r, m in zip(saved.router_map, saved.expert_merge, strict=True)
    ]


def test_real_campaign_summary_progress_workers_and_final(serve, real_run):
    url = serve(real_run.run_dir)
    records = _file_records(real_run.run_dir)
    search = [r for r in records if r["split"] == "search"]
    s = get_json(url, "/api/runs/real-tiny/summary")
    assert s["progress"]["done"] == 20 and s["progress"]["fraction"] == 1
    assert s["progress"]["elapsed"] == pytest.approx(max(r["elapsed"] for r in search))
    assert s["phase_boundary"] == [r["phase"] for r in search].index("merge") == 11
    assert s["config"] | {"model": None} == {
        "name": "real-tiny", "model": None, "task": "compare", "keep": 4, "top_k": None,
        "router_mapping": "probs", "strategy": "eep", "workers": 0, "seed": 0,
    }
    (worker,) = s["workers"]
    assert worker["worker"] == "local" and worker["evaluations"] == len(records)
    assert worker["mean_seconds"] == pytest.approx(sum(r["seconds"] for r in records) / len(records))
    assert 0 < worker["utilisation"] <= 1
    for split in ("dev", "test"):
        rows = [r for r in records if r["split"] == split]
        assert [(h["id"], h["score"]) for h in s["held_out"][split]] == [(r["id"], r["score"]) for r in rows]
    at = {r["id"]: i for i, r in reversed(list(enumerate(search)))}
    assert [h["at"] for h in s["held_out"]["dev"]] == [at[r["id"]] for r in records if r["split"] == "dev"]
    final = s["final"]
    written = json.loads((real_run.run_dir / "summary.json").read_text())
    assert {k: v for k, v in final.items() if k != "rows"} == written == json.loads(json.dumps(real_run.summary))
    assert [row["label"] for row in final["rows"]] == [m["label"] for m in written["methods"].values()]


def test_a_rejected_evaluation_is_never_the_best_and_counts_in_the_spent_budget(live_run):
    view = RunView(live_run.path)
    before = view.summary()
    best = view.best()
    assert before["progress"]["examples"] == 30 * 200 and before["progress"]["rejected"] == 0
    record = {
        "id": "eep-99999", "hash": "0" * 20, "parents": [], "phase": "merge", "split": "search",
        "score": 1.0, "metric": "exact_match", "metrics": {"exact_match": 1.0}, "count": 16,
        "total": 200, "rejected": True, "reject_below": 0.9, "bound": 0.5, "seconds": 0.1,
        "tokens": 100, "worker": "w0", "error": None, "asked": 31, "elapsed": 101.0, "time": time.time(),
    }
    with open(live_run.path / "evaluations.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    after = view.summary()
    assert after["progress"]["done"] == 31
    assert after["progress"]["examples"] == 30 * 200 + 16 and after["progress"]["rejected"] == 1
    assert view.best()["id"] == best["id"] != "eep-99999"
