"""How `full_pipeline` grows with the data: wall time and peak RSS of every step, per size.

    .venv/bin/python -m bench.pipeline_scale                      # 1e5, 1e6, 1e7 simulated events
    .venv/bin/python -m bench.pipeline_scale --sizes 1e5,1e6      # a shorter run
    .venv/bin/python -m bench.pipeline_scale --max-events 1e8     # add 1e8 where time allows

Each size runs the real job (`full_pipeline`, every asset and check) on the simulator, in a fresh
`TRACE_DAGSTER_HOME`, in a child process of its own (the multiprocess executor's forkserver keeps
the environment it started with). Steps run one at a time (`--max-concurrent 1`), so the time and
memory of a step are its own. Training steps run on a fixed sample budget (`--sample-budget`),
so the figure measures the pipeline, not the epochs.

- time of a step: from its STEP_START to its STEP_SUCCESS/STEP_FAILURE event (Dagster's event log);
- peak RSS of a step: the high-water mark (`VmHWM` in /proc/<pid>/status) of the process that ran
  it (the event's pid), polled every 0.2 s while the run goes; the pipeline's peak is the largest
  step's (steps run one at a time) and the driver's;
- growth exponents: least-squares slope of log(time) and log(peak RSS) against log(events), per
  step, over every size that ran (1 means linear).

The simulated events are generated before the run and not counted in any step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/x.py`: the repository root, as `python -m bench.x` has it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIMULATOR_DAYS = 35  # the EventSource default: three weekly cutoffs with 14 days of labels each


def parse_size(text: str) -> int:
    return int(float(text))


def default_sizes(max_events: int) -> list[int]:
    sizes, n = [], 100_000
    while n <= max_events:
        sizes.append(n)
        n *= 10
    return sizes


# ----------------------------------------------------------------------------- child: one size
def _descendants(root: int) -> list[int]:
    """Every live descendant pid of ``root`` (from /proc, no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def _peak_rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakRssSampler:
    """Polls the high-water RSS of this process and its descendants; keeps the max per pid."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peaks = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for pid in [me, *_descendants(me)]:
                rss = _peak_rss_bytes(pid)
                if rss is not None and rss > self.peaks.get(pid, 0):
                    self.peaks[pid] = rss
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_one_size(events: int, home: Path, sample_budget: int, max_concurrent: int, out: Path) -> None:
    """Simulate ~``events`` events, run full_pipeline on them, write per-step figures to ``out``."""
    os.environ["TRACE_DAGSTER_HOME"] = str(home)
    os.environ.pop("TRACE_DAGSTER_EVENTS", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import dagster as dg

    from resources.event_sources import EventSource
    from resources.event_sources.simulator import SimulatorConfig, expected_events_per_user
    from resources.paths import TraceDagsterPaths
    from resources.warehouse import WAREHOUSE_POOL
    from trace_dagster.cli import prepare_instance
    from trace_dagster.jobs import execution_config

    per_user = expected_events_per_user(SimulatorConfig(days=SIMULATOR_DAYS))
    n_users = max(100, round(events / per_user))
    started = time.perf_counter()
    source = EventSource(paths=TraceDagsterPaths(home=str(home)), simulator_n_users=n_users)
    simulated = source.simulated_file()
    import pyarrow.parquet as pq

    n_events = pq.ParquetFile(simulated).metadata.num_rows
    simulate_seconds = time.perf_counter() - started
    print(f"  simulated {n_events:,} events of {n_users:,} users in {simulate_seconds:.1f} s", flush=True)

    dagster_home = prepare_instance(home)
    from resources.mlflow_tracking import MLflowTracking

    MLflowTracking().ensure_store()
    run_config = execution_config(max_concurrent)
    run_config["resources"] = {"event_source": {"config": {"simulator_n_users": n_users}}}
    ops: dict[str, dict] = {}
    from assets.conversion_models.assets import CONVERSION_MODELS
    from assets.trace_models.assets import SEQUENCE_MODELS

    for name in [f"{k}_model" for k in SEQUENCE_MODELS] + [f"{m}_model" for m in CONVERSION_MODELS]:
        ops[name] = {"config": {"sample_budget": sample_budget}}
    run_config["ops"] = ops

    from trace_dagster.cli import full_pipeline_job

    with dg.DagsterInstance.get() as instance, PeakRssSampler() as sampler:
        storage = instance.event_log_storage
        if storage.supports_global_concurrency_limits:
            storage.set_concurrency_slots(WAREHOUSE_POOL, 1)
        run_started = time.perf_counter()
        with dg.execute_job(
            dg.reconstructable(full_pipeline_job), instance=instance, run_config=run_config, raise_on_error=False
        ) as result:
            run_seconds = time.perf_counter() - run_started
            success = result.success
            steps: dict[str, dict] = {}
            for event in result.all_events:
                if not event.step_key:
                    continue
                step = steps.setdefault(event.step_key, {"pid": None, "start": None, "end": None, "status": "?"})
                if event.event_type_value == "STEP_START":
                    step["pid"] = event.pid
                elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
                    step["status"] = "ok" if event.event_type_value == "STEP_SUCCESS" else "FAILED"
            # timestamps live on the event log records, not on the DagsterEvents
            for record in instance.all_logs(result.run_id):
                ev = record.dagster_event
                if ev is None or not ev.step_key or ev.step_key not in steps:
                    continue
                if ev.event_type_value == "STEP_START":
                    steps[ev.step_key]["start"] = record.timestamp
                elif ev.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
                    steps[ev.step_key]["end"] = record.timestamp
                    if ev.event_type_value == "STEP_FAILURE":
                        steps[ev.step_key]["error"] = ev.event_specific_data.error.message.strip()[:300]
    figures = {
        "events": n_events,
        "users": n_users,
        "run_seconds": run_seconds,
        "simulate_seconds": simulate_seconds,
        "success": success,
        "driver_peak_rss": sampler.peaks.get(os.getpid(), 0),
        "max_process_peak_rss": max(sampler.peaks.values(), default=0),
        "steps": {
            key: {
                "seconds": (s["end"] - s["start"]) if s["start"] and s["end"] else float("nan"),
                "peak_rss": sampler.peaks.get(s["pid"], 0) if s["pid"] else 0,
                "status": s["status"],
                **({"error": s["error"]} if "error" in s else {}),
            }
            for key, s in steps.items()
        },
    }
    print(f"  dagster home {dagster_home}", flush=True)
    out.write_text(json.dumps(figures, indent=1))


# ----------------------------------------------------------------------------- parent: every size
def growth_exponent(sizes: list[float], values: list[float]) -> float:
    """Slope of log(value) on log(size) (least squares); NaN with fewer than two usable points."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if v and v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else float("nan")


def print_table(results: list[dict]) -> None:
    gib = 1024**3
    steps = sorted(
        {k for r in results for k in r["steps"]},
        key=lambda k: -max(r["steps"].get(k, {}).get("seconds", 0) or 0 for r in results),
    )
    header = f"{'step':<44}" + "".join(
        f"{format(r['events'], '.0e') + ' s':>12}{format(r['events'], '.0e') + ' GiB':>12}" for r in results
    )
    print(header)
    for key in steps:
        cells = []
        for r in results:
            s = r["steps"].get(key)
            if s is None:
                cells.append(f"{'-':>12}{'-':>12}")
            else:
                flag = "" if s["status"] == "ok" else "!"
                cells.append(f"{s['seconds']:>11.1f}{flag or ' '}{s['peak_rss'] / gib:>12.2f}")
        print(f"{key:<44}" + "".join(cells))
    print(
        f"{'TOTAL run (wall) / max process peak':<44}"
        + "".join(f"{r['run_seconds']:>12.1f}{r['max_process_peak_rss'] / gib:>12.2f}" for r in results)
    )
    for r in results:
        print(
            f"size events={r['events']:,} users={r['users']:,} success={r['success']} "
            f"run_seconds={r['run_seconds']:.1f} run_minutes={r['run_seconds'] / 60:.1f} "
            f"peak_rss_gib={r['max_process_peak_rss'] / gib:.2f} (simulation, not counted: {r['simulate_seconds']:.1f} s)"
        )
        for key, s in r["steps"].items():
            if s["status"] != "ok":
                print(f"  FAILED {key}: {s.get('error', '')}")
    for key in steps:
        rows = [
            (r["events"], r["steps"][key]) for r in results if key in r["steps"] and r["steps"][key]["status"] == "ok"
        ]
        sizes = [e for e, _ in rows]
        t = growth_exponent(sizes, [s["seconds"] for _, s in rows])
        m = growth_exponent(sizes, [s["peak_rss"] for _, s in rows])
        print(f"growth {key} time_exponent={t:.2f} memory_exponent={m:.2f}")
    sizes = [r["events"] for r in results]
    t = growth_exponent(sizes, [r["run_seconds"] for r in results])
    m = growth_exponent(sizes, [r["max_process_peak_rss"] for r in results])
    print(f"growth full_pipeline time_exponent={t:.2f} memory_exponent={m:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="", help="comma-separated event counts, e.g. 1e5,1e6")
    parser.add_argument("--max-events", type=parse_size, default=10_000_000, help="largest power of ten to run")
    parser.add_argument("--sample-budget", type=int, default=50_000, help="training rows per model step")
    parser.add_argument("--max-concurrent", type=int, default=1, help="steps at once (1: figures per step)")
    parser.add_argument("--root", default="", help="folder for the per-size homes (default: a tmp dir)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read the figures of sizes that already succeeded under --root instead of running them again",
    )
    parser.add_argument("--child-events", type=parse_size, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-home", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_events:
        run_one_size(
            args.child_events, Path(args.child_home), args.sample_budget, args.max_concurrent, Path(args.child_out)
        )
        return

    sizes = [parse_size(s) for s in args.sizes.split(",") if s] or default_sizes(args.max_events)
    root = Path(args.root or tempfile.mkdtemp(prefix="pipeline_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"full_pipeline on the simulator at {', '.join(f'{s:.0e}' for s in sizes)} events; "
        f"sample budget {args.sample_budget:,} training rows per model; {args.max_concurrent} step(s) at once; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; homes under {root}",
        flush=True,
    )
    results, tabled = [], 0
    for size in sizes:
        home, out = root / f"events_{size:.0e}", root / f"events_{size:.0e}.json"
        if args.reuse and out.exists():
            figures = json.loads(out.read_text())
            if figures.get("success"):
                print(f"size {size:.0e}: figures of an earlier run reused ({out})", flush=True)
                results.append(figures)
                continue
        print(f"size {size:.0e}: running ...", flush=True)
        command = [
            sys.executable,
            "-m",
            "bench.pipeline_scale",
            "--child-events",
            str(size),
            "--child-home",
            str(home),
            "--child-out",
            str(out),
            "--sample-budget",
            str(args.sample_budget),
            "--max-concurrent",
            str(args.max_concurrent),
        ]
        log = root / f"events_{size:.0e}.log"  # Dagster's event log of the run (step by step, as it goes)
        with log.open("w") as log_file:
            code = subprocess.call(
                command, cwd=Path(__file__).resolve().parents[1], stdout=log_file, stderr=subprocess.STDOUT
            )
        print(f"size {size:.0e}: child exited with {code}; its log: {log}", flush=True)
        if not out.exists():
            print(f"size {size:.0e}: the child exited with {code} before writing figures", flush=True)
            continue
        results.append(json.loads(out.read_text()))
        print_table(results)  # so far, in case a larger size does not finish
        tabled = len(results)
        print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if not results:
        sys.exit(1)
    if tabled != len(results):  # the last sizes were reused: their table is still due
        print_table(results)


if __name__ == "__main__":
    main()
