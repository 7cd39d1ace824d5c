"""Ingest: requests/s and p50/p99 of signed, validated, durably produced (acks=all) webhooks.

wrk POSTs one fixed signed body over keep-alive connections. Four servers are measured in the
same run, interleaved per configuration so that drift on a shared machine hits all of them:

- `bare`: a FastAPI endpoint on the same stack (uvicorn, uvloop, httptools) that only reads the
  body and answers 200 (bench/bare_app.py): the ceiling of the server stack;
- `ours`: `cortexx ingest` as shipped (log level info: one JSON line per accepted POST);
- `ours-quiet`: the same at log level warning, to price the per-request log line;
- `old-design`: the old system's design, a Node.js `node:http` route (bench/old_design/server.js)
  that parses the JSON body, checks the signature and adds the body as one job to a BullMQ queue
  on Redis (`queue.add`), answering 200 once the add resolved. It needs `node`, `npm`,
  `redis-server` and `redis-cli` (`apt-get install nodejs npm redis-server`); without them it is
  skipped, with a line saying what to install. Its packages are installed once (`npm ci` into
  bench/old_design/node_modules); Redis runs in the run's temp dir on a free port, emptied
  before each of its measurements, and the jobs it holds after each are counted (`queued_jobs`).

A `cortexx worker` runs beside them for the whole run, consuming what ingest produces, as in
production (the old design's queue has no consumer: that favours the baseline).

Every configuration: 1-change and 100-change bodies, 8, 32 and 128 connections.
Targets at 32 connections (1-change): `ours` >= 75% of `bare` req/s with p99 < 25 ms, and
`ours` >= 1.5x the req/s of `old-design`.

    python -m bench.ingest [--duration 10] [--profile]
    python -m bench.ingest --duration 2 --changes 1 --connections 32   # quick check, saves nothing
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    RESULTS_DIR,
    BenchError,
    BenchServices,
    Child,
    Profile,
    add_tenant,
    argument_parser,
    console,
    keep_profile,
    print_profile,
    print_table,
    py_spy_available,
    running,
    save_result,
    services,
    summarize_profile,
    tree_cpu_s,
)
from harness.embedded import free_port
from harness.meta_samples import sign, wa_change, wa_envelope, wa_message
from infra.postgres.tenants import Tenant

CONNECTIONS = (8, 32, 128)
CHANGES = (1, 100)
TARGET_RATIO = 0.75
TARGET_P99_MS = 25.0
TARGET_OLD_RATIO = 1.5  # ours / old-design req/s, 1-change at 32 connections
SLUG = "bench-ingest"
OLD_DESIGN = "old-design"
OLD_DESIGN_DIR = Path(__file__).resolve().parent / "old_design"
OLD_QUEUE_WAIT = "bull:meta-webhooks:wait"  # BullMQ's list of waiting jobs (no worker drains it)

LUA = """
local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Hub-Signature-256"] = "{signature}"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def bench_wamid(seed: int, change: int) -> str:
    """The id of the message in change `change` of `make_body(_, seed)`."""
    return f"wamid.bench{seed}x{change}"


def make_body(changes: int, seed: int = 7) -> bytes:
    """A WhatsApp envelope of `changes` changes, each one inbound text message from its own contact."""
    rng = random.Random(seed)
    items = []
    for i in range(changes):
        wa_id = f"1555{rng.randrange(10**7):07d}"
        message = wa_message("text", wamid=bench_wamid(seed, i), from_=wa_id, timestamp=1_700_000_000 + i)
        items.append(
            wa_change(
                phone_number_id="106540352242922",
                display_phone_number="15550783881",
                messages=[message],
                contacts=[(wa_id, f"Bench User {i}")],
            )
        )
    return orjson.dumps(wa_envelope(items, waba_id="102290129340398"))


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_bin() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise BenchError("wrk is not installed: `apt-get install -y wrk` (Debian package)")
    return found


def run_wrk(url: str, script: Path, *, connections: int, duration_s: float, threads: int = 2) -> WrkResult:
    argv = [
        wrk_bin(),
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=duration_s + 60)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            doc = json.loads(line.removeprefix("BENCH_JSON "))
            return WrkResult(
                requests=int(doc["requests"]),
                seconds=doc["duration_us"] / 1e6,
                errors=sum(int(doc[k]) for k in ("connect", "read", "write", "status", "timeout")),
                p50_ms=doc["p50_us"] / 1000,
                p90_ms=doc["p90_us"] / 1000,
                p99_ms=doc["p99_us"] / 1000,
                max_ms=doc["max_us"] / 1000,
            )
    raise BenchError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")


@dataclass
class OldDesign:
    """The old system's design: `node bench/old_design/server.js` on its own `redis-server`."""

    redis: Child
    node: Child
    redis_port: int

    def redis_cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.redis_port), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return out.stdout.strip()

    def flush(self) -> None:
        """Empty Redis between measurements (outside wrk's window), so that no measurement runs
        on the jobs of the previous ones and memory stays bounded (38 KB a 100-change job)."""
        self.redis_cli("FLUSHALL")

    def queued_jobs(self) -> int:
        return int(self.redis_cli("LLEN", OLD_QUEUE_WAIT) or 0)


def _old_design_missing() -> str | None:
    """What to install before the old-design baseline can run, or None."""
    tools = {
        "node": "Node.js >= 20 (`apt-get install nodejs npm`)",
        "npm": "npm (`apt-get install npm`)",
        "redis-server": "Redis (`apt-get install redis-server`)",
        "redis-cli": "redis-cli (`apt-get install redis-tools`)",
    }
    for tool, what in tools.items():
        if shutil.which(tool) is None:
            return f"{tool} not found: install {what}"
    return None


def _npm_install() -> str | None:
    """Install bench/old_design's packages once (`npm ci` from the lock); the error, or None."""
    if (OLD_DESIGN_DIR / "node_modules").is_dir():
        return None
    npm = "ci" if (OLD_DESIGN_DIR / "package-lock.json").exists() else "install"
    console.print(f"installing the old-design packages: npm {npm} in {OLD_DESIGN_DIR}")
    try:
        out = subprocess.run(
            ["npm", npm, "--no-audit", "--no-fund"],
            cwd=OLD_DESIGN_DIR,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"npm {npm} failed: {e}"
    if out.returncode != 0:
        tail = " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
        return f"npm {npm} failed (exit {out.returncode}): {tail}"
    return None


def _old_design(data_dir: Path, log_dir: Path, app_secret: str) -> OldDesign | None:
    """The old-design server and its Redis, or None (with a line saying why) when it cannot run."""
    problem = _old_design_missing() or _npm_install()
    if problem is not None:
        console.print(f"[yellow]{OLD_DESIGN} skipped: {problem}[/]")
        return None
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    redis_port, node_port = free_port(), free_port()
    # BullMQ on the old system ran on a Redis with its defaults (RDB snapshots); no persistence
    # here (no RDB, no AOF) favours the baseline.
    redis_argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port)]
    redis_argv += ["--save", "", "--appendonly", "no", "--dir", str(redis_dir)]
    redis = Child(
        "redis", redis_argv, dict(os.environ), log_dir / "redis.log", ready_line="Ready to accept connections"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEXX_")}
    env.update(
        PORT=str(node_port),
        REDIS_URL=f"redis://127.0.0.1:{redis_port}",
        APP_SECRET=app_secret,
        NODE_ENV="production",
    )
    node = Child(
        OLD_DESIGN,
        ["node", str(OLD_DESIGN_DIR / "server.js")],
        env,
        log_dir / f"{OLD_DESIGN}.log",
        port=node_port,
    )
    return OldDesign(redis, node, redis_port)


def _servers(svc: BenchServices, log_dir: Path) -> list[Child]:
    bare_port, ours_port, quiet_port = free_port(), free_port(), free_port()
    return [
        Child.module(
            "bare", "bench.bare_app", ["--port", str(bare_port)], svc.env(), log_dir, port=bare_port
        ),
        Child.cortexx("ours", ["ingest", "--port", str(ours_port)], svc.env(), log_dir, port=ours_port),
        Child.cortexx(
            "ours-quiet",
            ["ingest", "--port", str(quiet_port)],
            svc.env(log_level="warning"),
            log_dir,
            port=quiet_port,
        ),
    ]


def run(
    duration_s: float = 10.0,
    *,
    profile: bool = False,
    profile_only: bool = False,
    warmup_s: float = 2.0,
    changes_set: tuple[int, ...] = CHANGES,
    connections_set: tuple[int, ...] = CONNECTIONS,
) -> dict[str, Any]:
    """Measure (unless `profile_only`), then profile ingest at 32 connections when asked.

    A subset of bodies or connection counts (for a quick check while working) prints its rows
    and saves no result."""
    profile = profile or profile_only
    full = changes_set == CHANGES and connections_set == CONNECTIONS
    wrk_bin()
    with services("ingest") as svc:
        tenant: Tenant = asyncio.run(add_tenant(svc.database_url, SLUG, agents=0))
        scripts: dict[int, Path] = {}
        for changes in CHANGES:
            body = make_body(changes)
            body_path = svc.data_dir / f"body-{changes}.json"
            body_path.write_bytes(body)
            script = svc.data_dir / f"post-{changes}.lua"
            script.write_text(LUA.format(body=body_path, signature=sign(body, tenant.app_secret)))
            scripts[changes] = script
            console.print(f"{changes}-change body: {len(body):,} bytes")
        servers = _servers(svc, svc.data_dir)
        old = None if profile_only else _old_design(svc.data_dir, svc.data_dir, tenant.app_secret)
        helpers = [old.redis] if old is not None else []
        # As in production, a worker consumes what ingest produces, on the same cores and broker.
        helpers.append(
            Child.cortexx(
                "worker", ["worker"], svc.env(), svc.data_dir, ready_line='"worker.partitions_assigned"'
            )
        )
        if old is not None:
            servers.append(old.node)
        rows: list[dict[str, Any]] = []
        with running(*helpers, *servers):
            for changes in () if profile_only else changes_set:
                for connections in connections_set:
                    for server in servers:
                        this_old = old if old is not None and server is old.node else None
                        url = f"{server.url}/webhooks/meta/{SLUG}"
                        run_wrk(url, scripts[changes], connections=connections, duration_s=warmup_s)
                        if this_old is not None:
                            this_old.flush()
                        cpu_before = tree_cpu_s(server.pid)
                        redis_before = tree_cpu_s(this_old.redis.pid) if this_old is not None else 0.0
                        result = run_wrk(
                            url, scripts[changes], connections=connections, duration_s=duration_s
                        )
                        cpu_pct = 100 * (tree_cpu_s(server.pid) - cpu_before) / result.seconds
                        extra: dict[str, Any] = {}
                        if this_old is not None:
                            redis_cpu = tree_cpu_s(this_old.redis.pid) - redis_before
                            extra = {
                                "queued_jobs": this_old.queued_jobs(),
                                "redis_cpu_pct": round(100 * redis_cpu / result.seconds, 1),
                            }
                            this_old.flush()
                        jobs = ""
                        if extra:
                            jobs = f"; redis cpu {extra['redis_cpu_pct']:.0f}%"
                            jobs += f", jobs in redis {extra['queued_jobs']:,}"
                        console.print(
                            f"{server.name:>10} {changes:>3}-change c={connections:<3} "
                            f"{result.rps:8.0f} req/s p50 {result.p50_ms:6.2f} ms p99 {result.p99_ms:6.2f} ms"
                            f" errors {result.errors} cpu {cpu_pct:.0f}%"
                            f" ({_cpu_ms(cpu_pct, result.rps):.3f} ms/req){jobs}"
                        )
                        rows.append(
                            {
                                "server": server.name,
                                "changes": changes,
                                "connections": connections,
                                "rps": round(result.rps, 1),
                                "records_per_s": round(result.rps * changes, 1),
                                "p50_ms": result.p50_ms,
                                "p90_ms": result.p90_ms,
                                "p99_ms": result.p99_ms,
                                "max_ms": result.max_ms,
                                "errors": result.errors,
                                "requests": result.requests,
                                "server_cpu_pct": round(cpu_pct, 1),
                                # CPU per request: steadier than req/s when the machine is shared.
                                "cpu_ms_per_req": round(_cpu_ms(cpu_pct, result.rps), 4),
                                **extra,
                            }
                        )
            profiles: dict[str, Any] = {}
            if profile:
                for changes in changes_set:
                    summary = _profile(servers[1], scripts[changes], duration_s, changes)
                    if summary is not None:
                        profiles[f"{changes}-change c=32"] = summary
    if profile_only:
        for name, summary in profiles.items():
            print_profile(f"cortexx ingest, {name}", summary)
        save_result("ingest-profile", {"duration_s": duration_s, "profiles": profiles})
        return {"profiles": profiles}
    if not full:
        _print_ratios(rows)
        for name, summary in profiles.items():
            print_profile(f"cortexx ingest, {name}", summary)
        return {"rows": rows, "profiles": profiles}
    report = _report(rows)
    for name, summary in profiles.items():
        print_profile(f"cortexx ingest, {name}", summary)
    out: dict[str, Any] = {"duration_s": duration_s, "rows": rows, "summary": report, "profiles": profiles}
    out["chart"] = str(chart(rows))
    path = save_result("ingest", out)
    console.print(f"results appended to {path}; chart {out['chart']}")
    return out


def _profile(server: Child, script: Path, duration_s: float, changes: int) -> dict[str, Any] | None:
    if not py_spy_available():
        console.print("[yellow]py-spy not installed: no profile[/]")
        return None
    out = server.log_path.with_suffix(f".{changes}.pyspy.txt")
    spy = Profile(server.pid, out).start()
    time.sleep(1.0)
    try:
        run_wrk(f"{server.url}/webhooks/meta/{SLUG}", script, connections=32, duration_s=duration_s)
    finally:
        spy.stop()
    keep_profile(out, f"ingest-{changes}-change-c32")
    return summarize_profile(out)


def _cpu_ms(cpu_pct: float, rps: float) -> float:
    return 10 * cpu_pct / rps if rps else 0.0


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _print_ratios(rows: list[dict[str, Any]]) -> None:
    """A quick check's ratios, per measured configuration: ours / bare and ours / old-design."""
    by = {(r["server"], r["changes"], r["connections"]): r for r in rows}
    for (server, changes, connections), ours in by.items():
        if server != "ours":
            continue
        parts = []
        for base in ("bare", OLD_DESIGN):
            other = by.get((base, changes, connections))
            if other is not None:
                parts.append(f"ours / {base} {_ratio(ours['rps'], other['rps']):.2f}")
        console.print(f"{changes}-change c={connections}: " + ", ".join(parts or ["no baseline"]))


def _report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["server"], r["changes"], r["connections"]): r for r in rows}
    table = []
    old_table = []
    for changes in CHANGES:
        for connections in CONNECTIONS:
            bare = by[("bare", changes, connections)]
            old = by.get((OLD_DESIGN, changes, connections))
            for name in ("ours", "ours-quiet"):
                ours = by[(name, changes, connections)]
                table.append(
                    (
                        f"{name} {changes}-change c={connections}",
                        ours["rps"],
                        bare["rps"],
                        _ratio(ours["rps"], bare["rps"]),
                        old["rps"] if old else None,
                        _ratio(ours["rps"], old["rps"]) if old else None,
                        ours["p50_ms"],
                        ours["p99_ms"],
                        bare["p99_ms"],
                        ours["errors"],
                        ours["server_cpu_pct"],
                        ours["cpu_ms_per_req"],
                        bare["cpu_ms_per_req"],
                    )
                )
            if old is not None:
                ours = by[("ours", changes, connections)]
                old_table.append(
                    (
                        f"{changes}-change c={connections}",
                        old["rps"],
                        ours["rps"],
                        _ratio(ours["rps"], old["rps"]),
                        old["p50_ms"],
                        old["p99_ms"],
                        old["errors"],
                        old["server_cpu_pct"],
                        old["cpu_ms_per_req"],
                        old.get("redis_cpu_pct"),
                        old.get("queued_jobs"),
                    )
                )
    print_table(
        f"ingest vs bare FastAPI endpoint and {OLD_DESIGN} (same run)",
        [
            "config",
            "req/s",
            "bare req/s",
            "ratio",
            "old req/s",
            "ours / old",
            "p50 ms",
            "p99 ms",
            "bare p99 ms",
            "errors",
            "cpu %",
            "cpu ms/req",
            "bare cpu ms/req",
        ],
        table,
    )
    if old_table:
        print_table(
            f"{OLD_DESIGN}: Node + BullMQ queue.add on Redis (same run)",
            [
                "config",
                "old req/s",
                "ours req/s",
                "ours / old",
                "old p50 ms",
                "old p99 ms",
                "old errors",
                "node cpu %",
                "node cpu ms/req",
                "redis cpu %",
                "jobs queued",
            ],
            old_table,
        )
    key = by[("ours", 1, 32)]
    bare_key = by[("bare", 1, 32)]
    ratio = _ratio(key["rps"], bare_key["rps"])
    met = ratio >= TARGET_RATIO and key["p99_ms"] < TARGET_P99_MS and key["errors"] == 0
    verdict = "MET" if met else "MISSED"
    console.print(
        f"target (1-change, 32 connections): ratio {ratio:.2f} (>= {TARGET_RATIO}), "
        f"p99 {key['p99_ms']:.1f} ms (< {TARGET_P99_MS}): [bold]{verdict}[/]"
    )
    out: dict[str, Any] = {"ratio_32": round(ratio, 3), "p99_32_ms": key["p99_ms"], "target_met": met}
    old_key = by.get((OLD_DESIGN, 1, 32))
    if old_key is None:
        console.print(f"target vs {OLD_DESIGN}: not measured ({OLD_DESIGN} skipped)")
        out.update(old_ratio_32=None, old_p99_32_ms=None, old_target_met=None)
        return out
    old_ratio = _ratio(key["rps"], old_key["rps"])
    old_met = old_ratio >= TARGET_OLD_RATIO and key["errors"] == 0 and old_key["errors"] == 0
    console.print(
        f"target vs {OLD_DESIGN} (1-change, 32 connections): ours / {OLD_DESIGN} {old_ratio:.2f} "
        f"(>= {TARGET_OLD_RATIO}), {OLD_DESIGN} p99 {old_key['p99_ms']:.1f} ms: "
        f"[bold]{'MET' if old_met else 'MISSED'}[/]"
    )
    out.update(old_ratio_32=round(old_ratio, 3), old_p99_32_ms=old_key["p99_ms"], old_target_met=old_met)
    return out


def chart(rows: list[dict[str, Any]], path: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = path or RESULTS_DIR / "ingest.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    styles = {
        "bare": ("tab:gray", "--"),
        "ours": ("tab:blue", "-"),
        "ours-quiet": ("tab:green", ":"),
        OLD_DESIGN: ("tab:orange", "-."),
    }
    for col, changes in enumerate(CHANGES):
        for server, (color, style) in styles.items():
            points = sorted(
                (r["connections"], r["rps"], r["p99_ms"])
                for r in rows
                if r["server"] == server and r["changes"] == changes
            )
            if not points:  # old-design skipped
                continue
            xs = [p[0] for p in points]
            axes[0][col].plot(xs, [p[1] for p in points], style, color=color, marker="o", label=server)
            axes[1][col].plot(xs, [p[2] for p in points], style, color=color, marker="o", label=server)
        axes[0][col].set_title(f"{changes}-change POSTs: requests/s")
        axes[1][col].set_title(f"{changes}-change POSTs: p99 latency (ms)")
        for row in (0, 1):
            axes[row][col].set_yscale("log")
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xticks(list(CONNECTIONS), [str(c) for c in CONNECTIONS])
            axes[row][col].set_xlabel("connections")
            axes[row][col].grid(True, alpha=0.3)
            axes[row][col].legend()
        axes[1][col].axhline(TARGET_P99_MS, color="tab:red", linewidth=0.8, label="p99 target")
    fig.suptitle(f"cortexx ingest vs bare FastAPI endpoint and {OLD_DESIGN} (same run, wrk)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--profile", action="store_true", help="py-spy profile of ingest at 32 connections")
    parser.add_argument("--profile-only", action="store_true", help="only the profiles, no measurement")
    parser.add_argument(
        "--changes", type=int, action="append", choices=CHANGES, help="only this body (repeatable)"
    )
    parser.add_argument("--connections", type=int, action="append", help="only this many (repeatable)")
    args = parser.parse_args(argv)
    run(
        args.duration,
        profile=args.profile,
        profile_only=args.profile_only,
        changes_set=tuple(args.changes or CHANGES),
        connections_set=tuple(args.connections or CONNECTIONS),
    )


if __name__ == "__main__":
    main()
