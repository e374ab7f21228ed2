"""What the drift monitors can and cannot detect: false-alarm rate and detection power, measured.

For each dataset (the simulator, and the Taobao slices of ../shared/data):
1. sessionize the events in DuckDB (the asset's SQL), build the asset's training examples at the
   last cutoff and train a small TRACE model on them (the champion stand-in);
2. **false alarms**: split the users of the same period into two halves by an md5 hash with a
   new salt per repetition (no change at all) and run the asset's three tests on the halves:
   input drift (`input_drift` on `session_features`, gated), embedding drift (the method of
   `embedding_drift`, warn) and prediction drift (`prediction_drift`, warn);
3. **detection power**: plant a shift in a share of the second half's users (10%, 30%, 100%) of
   growing size: `funnel_mix` (a share of the top event name turned into the second),
   `time_of_day` (+hours), `new_event_name` (a share of events renamed to an unseen name),
   `new_device` (a share of sessions on an unseen device; simulator only: Taobao has no
   attributes). "Shift size" = share of users x size of the change.

Features, embeddings and probabilities are computed once per (shift, size) for every user and
mixed per repetition (they are per session / per user, so this is exact). Sample sizes are the
asset's defaults (`DriftConfig`). It prints the false-alarm rate at each candidate threshold,
the thresholds it recommends (lowest with <= 5% false alarms on every dataset) and, per signal
and shift, the smallest shift size reaching 90% detection.

    python bench/drift_calibration.py [--quick] [--reps N] [--datasets simulator,taobao]
    python -m bench.drift_calibration --quick
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python bench/drift_calibration.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import numpy as np
import pandas as pd

from assets.monitoring.assets import DEFAULT_DRIFT_SHARE_THRESHOLD, DEFAULT_PREDICTION_DRIFT_SHARE, DriftConfig
from assets.monitoring.features import attribute_columns, session_features, top_event_names
from assets.monitoring.reports import column_verdicts, embedding_drift_verdict, input_drift, prediction_drift
from assets.training_data.examples_sql import cutoff_times, training_examples_sql, user_splits_sql
from assets.training_data.tasks import default_task_set
from model_lib.sessionize import DEFAULT_SESSION_GAP_SECONDS
from model_lib.sessionize import sessionize as sessionize_frame

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TAOBAO_FILES = [
    SHARED_DATA / "taobao_userbehavior" / f for f in ("userbehavior_head.csv.gz", "userbehavior_tail.csv.gz")
]
MAX_FALSE_ALARM = 0.05
TARGET_POWER = 0.9
USER_SHARES = (0.1, 0.3, 1.0)
NEW_NAME, NEW_DEVICE = "bench_new_event", "bench_new_device"


@dataclass(frozen=True)
class Shift:
    kind: str
    magnitude: float
    unit: str


def shifts_for(dataset: str, quick: bool) -> list[Shift]:
    grid = {
        "funnel_mix": ((0.05, 0.1, 0.3), "share of top event"),
        "time_of_day": ((2.0, 4.0, 8.0), "hours"),
        "new_event_name": ((0.02, 0.05, 0.1), "share of events"),
        "new_device": ((0.1, 0.3, 0.6), "share of sessions"),
    }
    out = []
    for kind, (sizes, unit) in grid.items():
        if kind == "new_device" and dataset != "simulator":
            continue
        for size in sizes[1:] if quick else sizes:
            out.append(Shift(kind, size, unit))
    return out


# ------------------------------------------------------------------------------------- data


def load_simulator(n_users: int, days: int) -> pd.DataFrame:
    from resources.event_sources.simulator import SimulatorConfig, simulate_events

    events = simulate_events(SimulatorConfig(n_users=n_users, days=days))
    for column in events.columns:
        if isinstance(events[column].dtype, pd.CategoricalDtype):
            events[column] = events[column].astype(str)
    events["event_time"] = pd.to_datetime(events["event_time"], utc=True).dt.tz_localize(None)
    return events


def load_taobao() -> pd.DataFrame:
    frames = []
    for path in TAOBAO_FILES:
        if not path.exists():
            raise FileNotFoundError(f"Taobao slice not found: {path}")
        frames.append(
            pd.read_csv(path, header=None, names=["user_id", "item_id", "category", "event_name", "ts"], dtype=str)
        )
    raw = pd.concat(frames).dropna()  # the head's truncated last row
    events = pd.DataFrame(
        {
            "user_id": raw["user_id"].to_numpy(),
            "event_time": pd.to_datetime(raw["ts"].astype("int64"), unit="s").to_numpy(),
            "event_name": raw["event_name"].to_numpy(),
            "item_id": raw["item_id"].to_numpy(),
            "category": raw["category"].to_numpy(),
        }
    )
    # The dataset's nine days (its documentation calls the few earlier timestamps noise).
    return events[events["event_time"] >= pd.Timestamp("2017-11-24 16:00")].reset_index(drop=True)


def sessionize(con: duckdb.DuckDBPyConnection, events: pd.DataFrame, name: str) -> None:
    """`name` := the events sessionized by the warehouse's rule (`model_lib.sessionize`, which
    `sessionized_events` streams its sorted rows through)."""
    frame = sessionize_frame(events.assign(source_file="bench", source_row=np.arange(1, len(events) + 1)))
    con.register("bench_sessionized", frame)
    con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM bench_sessionized")
    con.unregister("bench_sessionized")


def apply_shift(events: pd.DataFrame, shift: Shift, top: list[str], seed: int) -> pd.DataFrame:
    """The shift applied to every user (mixed per user later)."""
    rng = np.random.default_rng(seed)
    out = events.copy()
    if shift.kind == "funnel_mix":
        rows = np.flatnonzero(out["event_name"].to_numpy() == top[0])
        chosen = rng.choice(rows, size=int(shift.magnitude * len(rows)), replace=False)
        out.loc[out.index[chosen], "event_name"] = top[1]
    elif shift.kind == "time_of_day":
        out["event_time"] = out["event_time"] + pd.Timedelta(hours=shift.magnitude)
    elif shift.kind == "new_event_name":
        chosen = rng.random(len(out)) < shift.magnitude
        out.loc[chosen, "event_name"] = NEW_NAME
    elif shift.kind == "new_device":
        sessions = out["user_id"].astype(str) + ":" + out["session_key"].astype(str)
        picked = {s for s in sessions.unique() if rng.random() < shift.magnitude}
        out.loc[sessions.isin(picked).to_numpy(), "device"] = NEW_DEVICE
    else:
        raise ValueError(shift.kind)
    return out


def session_keys(events: pd.DataFrame) -> pd.Series:
    """Session number of each event (2-hour gap), for the device shift to act on whole sessions."""
    order = events.sort_values(["user_id", "event_time"], kind="stable")
    gap = order.groupby("user_id")["event_time"].diff().dt.total_seconds()
    key = (gap.isna() | (gap > DEFAULT_SESSION_GAP_SECONDS)).astype(int).groupby(order["user_id"]).cumsum()
    return key.reindex(events.index)


def user_bucket(users: pd.Series, salt: str) -> np.ndarray:
    """Uniform in [0, 1) per user, stable (md5), a new draw per salt."""
    return np.array([int(hashlib.md5(f"{u}:{salt}".encode()).hexdigest()[:8], 16) / 2**32 for u in users])


# ------------------------------------------------------------------------------------- model


def train_champion(con: duckdb.DuckDBPyConnection, dataset: str, epochs: int):
    """A small TRACE model on the asset's own examples: the stand-in for the registered champion."""
    from model_lib.embedding_service import UserModel
    from model_lib.training import TrainConfig

    task_set = default_task_set("simulator" if dataset == "simulator" else "taobao")
    con.execute("CREATE OR REPLACE VIEW sessionized_events AS SELECT * FROM base_events")
    con.execute(f"CREATE OR REPLACE TABLE user_splits AS {user_splits_sql(0, 0.15, 0.15)}")
    cutoffs = cutoff_times(con, task_set)
    examples = con.sql(training_examples_sql(task_set, cutoffs)).df()
    seen = [t.column for t in task_set.tasks if t.kind == "seen"]
    events = con.sql("SELECT * EXCLUDE (source_file, source_row) FROM base_events ORDER BY user_id, event_index").df()
    model, _ = UserModel.train(
        "trace",
        events,
        examples[examples["split"] == "train"],
        examples[examples["split"] == "valid"],
        seen,
        train_config=TrainConfig(epochs=epochs, num_threads=1),
    )
    return model, max(cutoffs), task_set


def user_outputs(model, con, relation: str, cutoff, observation) -> tuple[pd.Index, np.ndarray, pd.DataFrame]:
    """Embeddings and `p_<task>` of the users active in the observation window before `cutoff`."""
    users = con.sql(
        f"SELECT user_id, TIMESTAMP '{cutoff}' AS cutoff FROM {relation} WHERE event_time < TIMESTAMP '{cutoff}' "
        f"GROUP BY user_id HAVING max(event_time) >= TIMESTAMP '{cutoff}' - to_seconds({int(observation)}) "
        "ORDER BY user_id"
    ).df()
    events = con.sql(
        f"SELECT * EXCLUDE (source_file, source_row) FROM {relation} WHERE event_time < TIMESTAMP '{cutoff}' "
        "ORDER BY user_id, event_index"
    ).df()
    emb = model.embed(events, users)
    proba = model.proba_from_embeddings(emb)
    proba.columns = ["p_" + c.removeprefix("label_") for c in proba.columns]
    return pd.Index(users["user_id"]), emb, proba


# ------------------------------------------------------------------------------------- runs


def run_dataset(dataset: str, args) -> dict:
    started = time.perf_counter()
    config = DriftConfig()
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    events = load_simulator(args.users, args.days) if dataset == "simulator" else load_taobao()
    if "device" in events.columns:
        events["session_key"] = session_keys(events)
    sessionize(con, events.drop(columns=["session_key"], errors="ignore"), "base_events")
    top = top_event_names(con, "base_events")
    attributes = attribute_columns(con, "base_events")
    span = events["event_time"].max() - events["event_time"].min()
    timing = {"hour_of_day": True, "day_of_week": span >= pd.Timedelta(days=14)}  # as the asset's windows

    def features_of(relation: str) -> pd.DataFrame:
        """Every session's features (the sample size is the session count: a reservoir is allocated)."""
        [(n,)] = con.execute(f"SELECT count(*) FROM {relation} WHERE event_index_in_session = 0").fetchall()
        return session_features(con, relation, event_names=top, attributes=attributes, max_sessions=n, seed=0, **timing)

    print(f"\n== {dataset}: {len(events)} events, {events['user_id'].nunique()} users, top events {top[:3]}")
    print(f"   features: {list(features_of('base_events').columns)}")

    model, cutoff, task_set = train_champion(con, dataset, args.epochs)
    observation = task_set.observation.total_seconds()
    print(
        f"   TRACE stand-in trained ({args.epochs} epochs) in {time.perf_counter() - started:.0f}s; outputs as of {cutoff}"
    )

    variants = {None: (features_of("base_events"), *user_outputs(model, con, "base_events", cutoff, observation))}
    for shift in shifts_for(dataset, args.quick):
        shifted = apply_shift(events, shift, top, seed=1).drop(columns=["session_key"], errors="ignore")
        sessionize(con, shifted, "shifted_events")
        variants[shift] = (
            features_of("shifted_events"),
            *user_outputs(model, con, "shifted_events", cutoff, observation),
        )
    base_features = variants[None][0]
    session_user_codes, unique_users = pd.factorize(base_features.index.str.rsplit(":", n=1).str[0])
    users, emb, proba = variants[None][1:]
    user_position = unique_users.get_indexer(users)
    rows, verified = [], []
    verify_reps = {0, 1000}  # the first stationary split and the first planted repetition
    n_sessions, n_users = config.max_sessions, config.max_users

    def evaluate(rep: int, shift: Shift | None, share: float) -> None:
        in_reference = user_bucket(pd.Series(unique_users), f"split{rep}") < 0.5  # per unique user
        affected = user_bucket(pd.Series(unique_users), f"affected{rep}") < share
        # --- input drift on sessions (rows are per session: mixing variants per user is exact)
        ref_sessions = in_reference[session_user_codes]
        hit = ~ref_sessions & affected[session_user_codes]
        reference = base_features[ref_sessions]
        current = base_features[~ref_sessions & ~hit]
        if shift is not None:
            current = pd.concat([current, variants[shift][0].reindex(base_features.index)[hit]])
        reference = reference.sample(n=min(n_sessions, len(reference)), random_state=rep)
        current = current.sample(n=min(n_sessions, len(current)), random_state=rep)
        inputs = column_verdicts(reference, current)
        # --- embeddings and predictions (rows are per user)
        a = in_reference[user_position]
        cur_emb, cur_proba = emb[~a].copy(), proba[~a].reset_index(drop=True)
        if shift is not None:
            s_users, s_emb, s_proba = variants[shift][1:]
            b_users = users[~a]
            s_pos = s_users.get_indexer(b_users)
            swap = affected[user_position][~a] & (s_pos >= 0)
            cur_emb[swap] = s_emb[s_pos[swap]]
            cur_proba.iloc[np.flatnonzero(swap)] = s_proba.iloc[s_pos[swap]].to_numpy()
        rng = np.random.default_rng(rep)
        n = min(n_users, int(a.sum()), int((~a).sum()))
        ref_rows, cur_rows = rng.choice(int(a.sum()), n, replace=False), rng.choice(int((~a).sum()), n, replace=False)
        score, emb_drift = embedding_drift_verdict(emb[a][ref_rows], cur_emb[cur_rows])
        predictions = column_verdicts(proba[a].iloc[ref_rows], cur_proba.iloc[cur_rows], categorical_columns=[])
        if rep in verify_reps:  # the fast verdicts must be the report's (see column_verdicts)
            slow_inputs = input_drift(reference, current, DEFAULT_DRIFT_SHARE_THRESHOLD)
            slow_predictions = prediction_drift(
                proba[a].iloc[ref_rows], cur_proba.iloc[cur_rows], DEFAULT_PREDICTION_DRIFT_SHARE
            )
            for fast, slow in ((inputs, slow_inputs), (predictions, slow_predictions)):
                agree = fast.set_index("column")["drifted"].equals(slow.per_column.set_index("column")["drifted"])
                verified.append(agree)
        rows.append(
            {
                "dataset": dataset,
                "shift": shift.kind if shift else "none",
                "magnitude": shift.magnitude if shift else 0.0,
                "unit": shift.unit if shift else "",
                "user_share": share,
                "rep": rep,
                "input_share": float(inputs["drifted"].mean()),
                "embedding_auc": score,
                "embedding_drift": emb_drift,
                "prediction_share": float(predictions["drifted"].mean()),
            }
        )

    for rep in range(args.false_alarm_reps):
        evaluate(rep, None, 0.0)
    for shift in shifts_for(dataset, args.quick):
        for share in USER_SHARES[1:] if args.quick else USER_SHARES:
            for rep in range(args.reps):
                evaluate(1000 + rep, shift, share)
    print(
        f"   {len(rows)} evaluations in {time.perf_counter() - started:.0f}s; fast verdicts agree with "
        f"Evidently's reports in {sum(verified)} of {len(verified)} checked reports"
    )
    con.close()
    return {"rows": pd.DataFrame(rows), "n_features": base_features.shape[1], "n_tasks": variants[None][3].shape[1]}


def candidate_thresholds(n_columns: int) -> list[float]:
    """k drifted columns of n, exactly (a rounded 1/18 = 0.0556 would exceed the share 0.05555...
    that one drifted column gives, and hide every one-column alarm)."""
    return [k / n_columns for k in range(1, n_columns + 1)]


def false_alarm_table(results: dict[str, dict]) -> tuple[pd.DataFrame, float, float]:
    lines = []
    recommended_input, recommended_pred = 0.0, 0.0
    for signal, key, n_key in (("input", "input_share", "n_features"), ("prediction", "prediction_share", "n_tasks")):
        best = None
        shares = sorted({t for r in results.values() for t in candidate_thresholds(r[n_key])} | {0.25, 0.4})
        for threshold in shares:
            rates = {}
            for dataset, r in results.items():
                stationary = r["rows"][r["rows"]["shift"] == "none"]
                rates[dataset] = float((stationary[key] >= threshold - 1e-9).mean())
            lines.append(
                {"signal": signal, "threshold": threshold, **{f"false_alarms_{d}": v for d, v in rates.items()}}
            )
            if best is None and all(v <= MAX_FALSE_ALARM for v in rates.values()):
                best = threshold
        if signal == "input":
            recommended_input = best
        else:
            recommended_pred = best
    return pd.DataFrame(lines), recommended_input, recommended_pred


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, sizes and user shares")
    parser.add_argument("--datasets", default="simulator,taobao")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per planted shift (default 8; quick 4)")
    parser.add_argument("--false-alarm-reps", type=int, default=None, help="stationary splits (default 40; quick 20)")
    parser.add_argument("--users", type=int, default=2000, help="simulated users")
    parser.add_argument("--days", type=int, default=28, help="simulated days")
    parser.add_argument("--epochs", type=int, default=None, help="TRACE stand-in epochs (default 2; quick 1)")
    args = parser.parse_args(argv)
    args.reps = args.reps or (4 if args.quick else 8)
    args.false_alarm_reps = args.false_alarm_reps or (20 if args.quick else 40)
    args.epochs = args.epochs or (1 if args.quick else 2)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    results = {d: run_dataset(d, args) for d in args.datasets.split(",")}
    everything = pd.concat([r["rows"] for r in results.values()])

    print("\n== False alarms on stationary splits (same period, users split by md5 hash; no change)")
    table, input_threshold, pred_threshold = false_alarm_table(results)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    stationary = everything[everything["shift"] == "none"]
    emb_fa = stationary.groupby("dataset")["embedding_drift"].mean()
    auc95 = stationary.groupby("dataset")["embedding_auc"].quantile(0.95)
    for dataset in results:
        print(
            f"embedding false alarms {dataset}: {emb_fa[dataset]:.3f} at the method's own threshold "
            f"(stationary AUC 95th percentile {auc95[dataset]:.3f})"
        )

    input_threshold = input_threshold or DEFAULT_DRIFT_SHARE_THRESHOLD
    pred_threshold = pred_threshold or DEFAULT_PREDICTION_DRIFT_SHARE
    everything["input_alarm"] = everything["input_share"] >= input_threshold - 1e-9
    everything["prediction_alarm"] = everything["prediction_share"] >= pred_threshold - 1e-9
    everything["embedding_alarm"] = everything["embedding_drift"]
    print(
        f"\n== Detection rate of planted shifts (input threshold {input_threshold}, prediction threshold "
        f"{pred_threshold}, embedding: method's own); shift size = user share x magnitude"
    )
    planted = everything[everything["shift"] != "none"]
    power = (
        planted.groupby(["dataset", "shift", "unit", "magnitude", "user_share"])[
            ["input_alarm", "embedding_alarm", "prediction_alarm"]
        ]
        .mean()
        .reset_index()
    )
    power["size"] = power["magnitude"] * power["user_share"]
    print(power.to_string(index=False, float_format=lambda v: f"{v:.3g}"))

    print(f"\n== Smallest shift size reaching {TARGET_POWER:.0%} detection (user share x magnitude)")
    for (dataset, shift, unit), group in power.groupby(["dataset", "shift", "unit"]):
        parts = []
        for signal in ("input", "embedding", "prediction"):
            hit = group[group[f"{signal}_alarm"] >= TARGET_POWER].sort_values("size")
            parts.append(f"{signal}={hit['size'].iloc[0]:.3g}" if len(hit) else f"{signal}=not reached")
        print(f"detection90 {dataset} {shift} ({unit}): " + " ".join(parts))

    print("\n== Recommended thresholds (lowest with false alarms <= 5% on every dataset)")
    print(
        f"recommend drift_share_threshold={input_threshold} (gated input drift; default {DEFAULT_DRIFT_SHARE_THRESHOLD})"
    )
    print(f"recommend prediction_drift_share={pred_threshold} (warn; default {DEFAULT_PREDICTION_DRIFT_SHARE})")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
