"""The deployable unit of the MTLDS family: funnel spec + network, saved and served as one.

The twin of `embedding_service.UserModel` for conversion models. `ConversionModel.save` writes
one file of primitives and tensors (funnel spec, `MTLDSConfig`, model name, weights), so it loads
with `torch.load(weights_only=True)`; `predict_frame` scores a frame of funnel samples (the
columns `funnel_samples.build_funnel_samples` produces) and `score_candidates` scores candidate
items for users from their raw events: what the MLflow pyfunc serves. A client knows a user's
recent events and the items it wants ranked, not the popularity of an item across all users, so
the item-level counts (`item_prior_*`) are bundled with the model as of training (`item_stats`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from model_lib.artifact import save_atomically
from model_lib.funnel_samples import FunnelSpec, samples_to_tensors, stable_bucket
from model_lib.mtlds import FunnelModel, MTLDSConfig, predict
from model_lib.mtlds_baselines import build_model
from model_lib.sessionize import InvalidEventsError, parse_event_times

CONVERSION_ARTIFACT_FORMAT = 1
_TUPLE_FIELDS = {f.name for f in fields(MTLDSConfig) if str(f.type).startswith("tuple")}


def _spec_to_dict(spec: FunnelSpec) -> dict:
    d = asdict(spec)
    d["funnel"], d["extra_labels"] = list(spec.funnel), list(spec.extra_labels)
    d["horizon"] = None if spec.horizon is None else float(pd.Timedelta(spec.horizon).total_seconds())
    return d


def _spec_from_dict(d: dict) -> FunnelSpec:
    horizon = None if d["horizon"] is None else pd.Timedelta(seconds=d["horizon"])
    return FunnelSpec(
        **{**d, "funnel": tuple(d["funnel"]), "extra_labels": tuple(d["extra_labels"]), "horizon": horizon}
    )


#: Input column that marks the rows of a request to score (the others are the user's history).
CANDIDATE_COLUMN = "is_candidate"


def item_statistics(events: pd.DataFrame, spec: FunnelSpec) -> pd.DataFrame:
    """Per item: `item_prior_views` (entry-stage events) and `item_prior_<last stage>`, counted
    over every event given: the item popularity a served model bundles (index: item_id)."""
    last = spec.funnel[-1]
    ev = events[events["item_id"].notna()]
    names = ev["event_name"].astype(str)
    frame = pd.DataFrame(
        {
            "item_id": ev["item_id"].astype(str).to_numpy(),
            "item_prior_views": (names == spec.funnel[0]).to_numpy(np.int64),
            f"item_prior_{last}": (names == last).to_numpy(np.int64),
        }
    )
    return frame.groupby("item_id", sort=True).sum()


def _truthy(values: pd.Series) -> np.ndarray:
    text = values.astype("string").str.strip().str.lower()
    return text.isin(["true", "1", "1.0", "yes"]).fillna(False).to_numpy(bool)


@dataclass
class ConversionModel:
    name: str  # public model name: mtlds_linear, ..., single_task, shared_bottom, esmm, mmoe
    model: FunnelModel
    spec: FunnelSpec
    # item_id -> (item_prior_views, item_prior_<last stage>) as of training (see item_statistics)
    item_stats: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def cfg(self) -> MTLDSConfig:
        return self.model.cfg

    def predict_frame(self, samples: pd.DataFrame) -> pd.DataFrame:
        """`p_<task>` per task and the ranking `score`, one row per sample (index kept)."""
        probs, scores = predict(self.model, samples_to_tensors(samples, self.spec))
        out = pd.DataFrame(probs, columns=[f"p_{t}" for t in self.cfg.tasks], index=samples.index)
        out["score"] = scores
        return out

    @property
    def output_columns(self) -> list[str]:
        return [f"p_{t}" for t in self.cfg.tasks] + ["score"]

    def candidate_samples(self, history: pd.DataFrame, candidates: pd.DataFrame) -> pd.DataFrame:
        """Funnel-sample features of candidate (user_id, item_id, category, anchor_time) rows, from
        the users' raw `history` strictly before each anchor, as `build_funnel_samples` computes
        them for training, and the bundled item counts. Label columns are zeros (never read)."""
        spec = self.spec
        stages = list(spec.funnel) + list(spec.extra_labels)
        entry = spec.funnel[0]
        cand = candidates.reset_index(drop=True).copy()
        cand["_row"] = np.arange(len(cand))
        hist = history[history["item_id"].notna()]
        hist = pd.DataFrame(
            {
                "user_id": hist["user_id"].astype(str).to_numpy(),
                "h_item": hist["item_id"].astype(str).to_numpy(),
                "h_category": hist["category"].astype("string").to_numpy() if "category" in hist else pd.NA,
                "h_name": hist["event_name"].astype(str).to_numpy(),
                "h_time": hist["event_time"].to_numpy(),
            }
        )
        pairs = cand[["_row", "user_id", "item_id", "category", "anchor_time"]].merge(hist, on="user_id")
        pairs = pairs[pairs["h_time"] < pairs["anchor_time"]]  # strictly before the anchor
        counts = {f"user_prior_{s}": pairs["h_name"] == s for s in stages}
        counts["user_prior_events"] = pd.Series(True, index=pairs.index)
        same_category = pairs["category"].notna() & (pairs["h_category"] == pairs["category"]).fillna(False)
        counts["user_prior_category_views"] = (pairs["h_name"] == entry) & same_category
        same_item = pairs["h_item"] == pairs["item_id"]
        for s in stages[1:]:
            counts[f"user_item_prior_{s}"] = (pairs["h_name"] == s) & same_item
        per_row = pd.DataFrame({k: v.to_numpy(np.int64) for k, v in counts.items()}).assign(
            _row=pairs["_row"].to_numpy()
        )
        summed = per_row.groupby("_row").sum()
        last_time = pairs.groupby("_row")["h_time"].max()
        for column in counts:
            cand[column] = summed[column].reindex(cand["_row"]).fillna(0).to_numpy(np.int64)
        gap = cand["anchor_time"].to_numpy() - last_time.reindex(cand["_row"]).to_numpy()
        cand["seconds_since_prev_event"] = pd.to_timedelta(gap).total_seconds()  # NaN: no earlier event
        last = spec.funnel[-1]
        for column in ("item_prior_views", f"item_prior_{last}"):
            known = self.item_stats[column] if column in self.item_stats else pd.Series(dtype=np.int64)
            cand[column] = known.reindex(cand["item_id"]).fillna(0).to_numpy(np.int64)
        cand["user_bucket"] = stable_bucket(cand["user_id"], spec.user_buckets, "user:")
        cand["item_bucket"] = stable_bucket(cand["item_id"], spec.item_buckets, "item:")
        cand["category_bucket"] = stable_bucket(cand["category"], spec.category_buckets, "category:")
        cand["hour"] = cand["anchor_time"].dt.hour.astype(np.int64)
        cand["weekday"] = cand["anchor_time"].dt.weekday.astype(np.int64)
        for column in spec.label_columns:
            cand[column] = 0
        return cand.drop(columns="_row")

    def score_candidates(self, request: pd.DataFrame, as_of=None) -> pd.DataFrame:
        """Rank candidate items for users from their raw events: the served entry point.

        `request` rows are canonical raw events (`user_id`, `event_time`, `event_name`, `item_id`,
        `category`); rows with `is_candidate` true are the items to score, each at its own
        `event_time`, else at `as_of`, else just after the user's last event. A frame without
        `event_name` is all candidates: (user_id, item_id, time) rows with no history.
        Returns, per candidate in request order: `user_id`, `item_id`, `anchor_time`, `p_<task>`
        per behaviour and the aggregated ranking `score`.
        """
        if self.cfg.user_embedding_dim:
            raise ValueError(f"{self.name} needs a user embedding per sample: it cannot score raw events alone")
        missing = [c for c in ("user_id", "item_id") if c not in request.columns]
        if missing:
            raise InvalidEventsError(f"requests lack the column(s) {missing}")
        if CANDIDATE_COLUMN in request.columns:
            is_candidate = _truthy(request[CANDIDATE_COLUMN])
        elif "event_name" not in request.columns:
            is_candidate = np.ones(len(request), bool)
        else:
            raise InvalidEventsError(
                f"no candidates: mark the items to score with a true `{CANDIDATE_COLUMN}` column "
                "(the other rows are the user's events), or send (user_id, item_id, event_time) rows only"
            )
        frame = request.reset_index(drop=True)
        if frame["user_id"].isna().any() or frame.loc[is_candidate, "item_id"].isna().any():
            raise InvalidEventsError("user_id, and item_id on candidate rows, must not be missing")
        times = (
            parse_event_times(frame["event_time"].where(frame["event_time"].notna(), None).dropna())
            if "event_time" in frame.columns
            else pd.Series(dtype="datetime64[us]")
        )
        event_time = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[us]")
        event_time[times.index] = times.to_numpy()
        history_rows = ~is_candidate
        if history_rows.any():
            if "event_name" not in frame.columns or frame.loc[history_rows, "event_name"].isna().any():
                raise InvalidEventsError("history rows need an event_name")
            if event_time[history_rows].isna().any():
                raise InvalidEventsError("history rows need an event_time")
        history = pd.DataFrame(
            {
                "user_id": frame.loc[history_rows, "user_id"].astype(str),
                "item_id": frame.loc[history_rows, "item_id"] if history_rows.any() else pd.Series(dtype=object),
                "category": frame.loc[history_rows, "category"] if "category" in frame else pd.NA,
                "event_name": frame.loc[history_rows, "event_name"] if "event_name" in frame else pd.NA,
                "event_time": event_time[history_rows],
            }
        )
        anchor = event_time[is_candidate]
        if as_of is not None and str(as_of).strip():
            anchor = anchor.fillna(parse_event_times(pd.Series([as_of])).iloc[0])
        users = frame.loc[is_candidate, "user_id"].astype(str)
        after_last = users.map(history.groupby("user_id")["event_time"].max() + pd.Timedelta(seconds=1))
        anchor = anchor.fillna(after_last)
        if anchor.isna().any():
            raise InvalidEventsError("candidate rows need an event_time (or as_of, or events of the user)")
        candidates = pd.DataFrame(
            {
                "user_id": users.to_numpy(),
                "item_id": frame.loc[is_candidate, "item_id"].astype(str).to_numpy(),
                "category": (
                    frame.loc[is_candidate, "category"].astype("string").to_numpy()
                    if "category" in frame
                    else pd.array([pd.NA] * int(is_candidate.sum()), dtype="string")
                ),
                "anchor_time": pd.to_datetime(anchor.to_numpy()),
            }
        )
        samples = self.candidate_samples(history, candidates)
        scored = self.predict_frame(samples)
        return pd.concat([candidates[["user_id", "item_id", "anchor_time"]], scored], axis=1)

    def save(self, path: str | Path) -> Path:
        state = {
            "format": CONVERSION_ARTIFACT_FORMAT,
            "name": self.name,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.cfg).items()},
            "spec": _spec_to_dict(self.spec),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "item_stats": {
                "item_id": [str(i) for i in self.item_stats.index],
                "columns": list(self.item_stats.columns),
                # (items, columns); explicit shape: an empty table (no item statistics) has no -1 to infer
                "counts": torch.as_tensor(
                    self.item_stats.to_numpy(np.int64).reshape(len(self.item_stats), len(self.item_stats.columns))
                ),
            },
        }
        return save_atomically(state, path)

    @classmethod
    def load(cls, path: str | Path) -> ConversionModel:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if state.get("format") != CONVERSION_ARTIFACT_FORMAT:
            raise ValueError(
                f"{path}: conversion artifact format {state.get('format')!r}, this code reads {CONVERSION_ARTIFACT_FORMAT}"
            )
        cfg = MTLDSConfig(**{k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in state["config"].items()})
        model = build_model(state["name"], cfg)
        model.load_state_dict(state["state_dict"])
        model.eval()
        stats = state.get("item_stats") or {"item_id": [], "columns": [], "counts": torch.zeros(0, 0)}
        item_stats = pd.DataFrame(
            stats["counts"].numpy().reshape(len(stats["item_id"]), len(stats["columns"])),
            index=pd.Index(stats["item_id"], name="item_id", dtype=object),
            columns=stats["columns"],
        )
        return cls(state["name"], model, _spec_from_dict(state["spec"]), item_stats)


__all__ = ["CANDIDATE_COLUMN", "CONVERSION_ARTIFACT_FORMAT", "ConversionModel", "item_statistics"]
