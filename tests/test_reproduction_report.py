"""The reproduction machinery: user-level resampling, and the report asset on a tiny configuration."""

import dagster as dg
import numpy as np
import pytest

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
