"""The reproduction machinery: user-level resampling, bounded reads of a dataset's events, and the
report asset on a tiny configuration."""

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from helpers import QueryLog

from assets.reproduction.statistics import paired_uplift, verdict
from model_lib.metrics import auroc


def test_paired_uplift_sees_a_real_difference_and_no_fake_one():
    rng = np.random.default_rng(0)
    n_users, rows_per_user = 300, 3
    users = np.repeat(np.arange(n_users), rows_per_user)
    y = (rng.random(users.size) < 0.3).astype(float)
    good = np.stack([y + rng.normal(0, 0.8, y.size) for _ in range(3)])  # 3 seeds
    bad = np.stack([y + rng.normal(0, 2.0, y.size) for _ in range(3)])
    r = paired_uplift([y], [good], [bad], users, auroc, n_boot=200)
    assert verdict(r["ci_low"], r["ci_high"]) == "reproduced"
    same = paired_uplift([y], [good], [good[::-1]], users, auroc, n_boot=200)
    assert verdict(same["ci_low"], same["ci_high"]) == "not resolvable at this data size"


@pytest.mark.slow
def test_report_materializes_on_a_tiny_configuration(home):
    from assets.reproduction.assets import REPRODUCTION_ASSETS
    from resources.paths import TraceDagsterPaths

    tiny = {"size": "tiny", "datasets": ["known_answer"], "models": ["trace", "myopic"]}
    run_config = {
        "ops": {
            "reproduction_runs": {
                "config": {**tiny, "funnel_models": ["mtlds_linear", "esmm"], "learning_curve": False}
            },
            "ablation_runs": {
                "config": {
                    **tiny,
                    "funnel_datasets": ["known_answer"],
                    "trace_variants": ["trace", "no_positions"],
                    "funnel_variants": ["mtlds_linear", "mtlds_lambda0", "mtlds_tau0.3"],
                }
            },
        }
    }
    result = dg.materialize(
        REPRODUCTION_ASSETS, resources={"paths": TraceDagsterPaths(home=str(home))}, run_config=run_config
    )
    assert result.success
    report = (home / "reports" / "reproduction_latest.md").read_text()
    assert "## Dataset: known_answer" in report
    assert "TRACE beats myopic, seen tasks, AUROC" in report
    assert "no_positions" in report and "mtlds_lambda0" in report
    assert "tau chosen on validation NDCG" in report
    assert (home / "reports" / "reproduction_latest.html").read_text().startswith("<!doctype html>")
    assert (home / "reports" / "reproduction_ablations.png").stat().st_size > 1000
    metadata = result.asset_materializations_for_node("reproduction_report")[0].metadata
    assert metadata["claims"].value > 0


def test_learning_curve_table_and_plot(tmp_path):
    import pandas as pd

    from assets.reproduction.report import learning_curve, plot_learning_curve

    rng = np.random.default_rng(0)
    rows = []
    users = np.repeat(np.arange(200), 2)
    y = (rng.random(users.size) < 0.4).astype(float)  # the same test rows at every size
    for n in (100, 400):
        for variant, noise in (("trace", 0.5 if n == 400 else 2.0), ("st_agg", 1.0)):
            for seed in range(3):
                score = y + rng.normal(0, noise, y.size)
                rows.append(
                    pd.DataFrame(
                        {
                            "row_id": np.arange(users.size).astype(str),
                            "user_id": users.astype(str),
                            "task": "t",
                            "task_kind": "seen",
                            "split": "test",
                            "y": y,
                            "score": score,
                            "dataset": "simulator",
                            "experiment": "learning_curve",
                            "variant": variant,
                            "family": "trace",
                            "seed": seed,
                            "n_train_users": n,
                        }
                    )
                )
    curve = learning_curve(pd.concat(rows, ignore_index=True))
    trace = curve[curve["variant"] == "trace"].set_index("n_train_users")
    assert trace.loc[100, "vs_st_agg_high"] < 0 < trace.loc[400, "vs_st_agg_low"]  # the crossing is resolved
    assert plot_learning_curve(curve, tmp_path / "curve.png").stat().st_size > 1000


EVENTS_PER_BUCKET = 3000


def sequence_run_reads(n_users, tmp_path, monkeypatch):
    """(events of the example users, buckets, events of the largest bucket read, statements that
    read sessionized_events without a bucket predicate) of one `run_sequence` on a simulated
    dataset of ``n_users``."""
    import assets.trace_models.sequence_data as sequence_data
    from assets.reproduction.datasets import build_dataset
    from assets.reproduction.experiments import Variant, run_sequence
    from model_lib.training import TrainConfig

    ds = build_dataset("simulator", tmp_path / str(n_users), n_users=n_users, events_per_bucket=EVENTS_PER_BUCKET)
    assert not hasattr(ds, "events") and not any(isinstance(v, pd.DataFrame) for v in vars(ds).values())
    reads, read_bucket = [], sequence_data.read_bucket

    def recording_read_bucket(con, bucket, buckets, *args, **kwargs):
        events, examples = read_bucket(con, bucket, buckets, *args, **kwargs)
        reads.append((buckets, len(events)))
        return events, examples

    monkeypatch.setattr(sequence_data, "read_bucket", recording_read_bucket)
    log = QueryLog(lambda: ds.warehouse.connect(read_only=True))
    monkeypatch.setattr(ds, "connect", log)
    config = TrainConfig(epochs=1, batch_size=64, sample_budget=256, num_threads=1)
    rows, _ = run_sequence(ds, Variant("trace", "trace"), 0, config, max_len=16)
    assert set(rows["user_id"]) == set(ds.examples("test")["user_id"])
    with ds.warehouse.connect(read_only=True) as con:
        (n_events,) = con.execute(
            "SELECT count(*) FROM sessionized_events WHERE user_id IN (SELECT user_id FROM training_examples) "
            "AND event_time < (SELECT max(cutoff) FROM training_examples)"
        ).fetchall()[0]
    (buckets,) = {b for b, _ in reads}
    bucketed = sequence_data.user_bucket_sql("user_id", buckets)
    unbucketed = [
        q
        for q in log.queries
        if "sessionized_events" in q and bucketed not in q and "count(*)" not in q and "LIMIT 0" not in q
    ]  # the one read of the table stages it by bucket (`stage_buckets`); LIMIT 0: a look-up of its columns
    assert sum(n for _, n in reads[-buckets:]) == n_events  # the encoding pass reads every event, once
    return n_events, buckets, max(n for _, n in reads), unbucketed


@pytest.mark.timeout(900)  # a hang guard: the machine may be shared
def test_sequence_runs_read_events_in_buckets_bounded_by_events_per_bucket(tmp_path, monkeypatch):
    """`build_dataset` holds no frame, and a TRACE-family run reads the events only in user-hash
    buckets: 10x the users gives ~10x the buckets, each still about `events_per_bucket` events
    (counts, not wall time); no statement reads sessionized_events but by bucket (its one scan
    writes it partitioned by bucket)."""
    events_small, buckets_small, largest_small, unbucketed_small = sequence_run_reads(80, tmp_path, monkeypatch)
    events_large, buckets_large, largest_large, unbucketed_large = sequence_run_reads(800, tmp_path, monkeypatch)
    assert events_large > 8 * events_small
    assert buckets_large >= 5 * buckets_small
    assert largest_small < 2 * EVENTS_PER_BUCKET and largest_large < 2 * EVENTS_PER_BUCKET
    assert unbucketed_small == unbucketed_large == []


def test_a_learning_curve_point_is_a_sql_sample_of_whole_training_users(tmp_path):
    """`restrict_train_users`: exactly n training users (all their examples), the same on every
    call, nested across points, another set for another seed; valid and test untouched; and
    the shards a run trains on hold those training examples only."""
    from assets.reproduction.datasets import build_dataset
    from assets.trace_models.sequence_data import write_sequence_shards
    from model_lib.encoding import EncoderConfig

    ds = build_dataset("simulator", tmp_path, n_users=120)
    point, smaller = ds.restrict_train_users(30), ds.restrict_train_users(10)

    def train_users(d):
        return set(d.examples("train")["user_id"])

    assert point.n_train_users == len(train_users(point)) == 30 and train_users(smaller) < train_users(point)
    assert train_users(ds.restrict_train_users(30)) == train_users(point) != train_users(ds.restrict_train_users(30, 1))
    everything = ds.examples("train")
    kept = everything[everything["user_id"].isin(train_users(point))]
    assert sorted(point.examples("train")["example_id"]) == sorted(kept["example_id"])  # whole users
    for split in ("valid", "test"):
        pd.testing.assert_frame_equal(point.examples(split), ds.examples(split))
    assert ds.restrict_train_users(10**6) is ds
    # the ablations' check that another build holds the same examples, made in SQL
    assert ds.example_ids_fingerprint() == build_dataset("simulator", tmp_path, n_users=120).example_ids_fingerprint()
    assert point.example_ids_fingerprint() != ds.example_ids_fingerprint()
    assert point.example_ids_fingerprint()[0] == len(point.examples())
    labels = [f"label_{t}" for t in point.seen]
    shards = write_sequence_shards(
        point.connect, "trace", labels, tmp_path / "s", EncoderConfig(max_len=8), train_sample=point.train_sample
    )
    assert sorted(shards.ids("train").column("example_id").tolist()) == sorted(kept["example_id"])
