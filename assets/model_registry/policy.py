"""Promotion policy: when a challenger takes the `champion` alias, and the audit trail it leaves.

Why apart from `resources/mlflow_tracking.py`: the resource is registry plumbing (store, runs,
aliases, tags, a lock); this module is the decision. `decide` is pure, so its rules are readable
and testable without MLflow; `promote_if_better` applies it to the registry under the store lock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from resources.mlflow_tracking import (
    CHAMPION,
    PREVIOUS,
    TAG_DECIDED_AT,
    TAG_DECISION,
    TAG_DELTA,
    TAG_PREFIX,
    TAG_REASON,
    MLflowTracking,
    utc_now_iso,
)


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of `promote_if_better`, also written as `promotion.*` tags on the challenger."""

    promoted: bool
    champion_version: str | None  # the champion after the decision
    previous_version: str | None  # the `previous` alias after the decision
    delta: float | None  # challenger_score - champion_score (None without a champion score)
    reason: str
    challenger_version: str = ""
    decided_at: str = ""

    def as_metadata(self) -> dict[str, Any]:
        """Plain values for Dagster asset metadata."""
        return {key: ("" if value is None else value) for key, value in asdict(self).items()}


def decide(champion: str | None, delta: float | None, margin: float, checks_passed: bool) -> tuple[bool, str]:
    """(promote?, reason). Rules, in order: every asset check must have passed; with no champion
    yet the challenger is promoted; with a champion but no score of it on the same examples
    (`delta` None) nothing is compared, so nothing is promoted; otherwise promote iff
    delta > margin. Higher scores are better (AUROC, AUC, NDCG)."""
    if not checks_passed:
        return False, "an asset check failed"
    if champion is None:
        return True, f"no {CHAMPION} yet"
    if delta is None:
        return False, f"no {CHAMPION} score on the same held-out examples"
    if delta > margin:
        return True, f"beats {CHAMPION} v{champion} by {delta:.6g} > margin {margin:g}"
    return False, f"delta {delta:.6g} vs {CHAMPION} v{champion} <= margin {margin:g}"


def promote_if_better(
    tracking: MLflowTracking,
    model_name: str,
    challenger_version: str | int,
    challenger_score: float,
    champion_score: float | None,
    margin: float,
    checks_passed: bool,
    reason_context: Mapping[str, Any] | None = None,
) -> PromotionDecision:
    """Give `champion` to the challenger only if it wins (`decide`); record the decision either way.

    Both scores must come from the same held-out examples. On promotion the old champion becomes
    `previous`. `reason_context` (metric, split, number of examples, ...) is stored as JSON in
    `promotion.context`. Tags are written before the aliases move, so an interrupted promotion
    stays visible as decision "promoting".
    """
    challenger = str(challenger_version)
    context = dict(reason_context or {})
    with tracking.store_lock():  # read-then-move-aliases must not interleave with another one
        aliases = tracking.aliases(model_name)
        champion = aliases.get(CHAMPION)
        previous = aliases.get(PREVIOUS)
        delta = None if champion_score is None else float(challenger_score) - float(champion_score)
        decided_at = utc_now_iso()
        if champion == challenger:  # nothing to decide; its own promotion tags stay as they are
            return PromotionDecision(
                False, champion, previous, delta, f"version {challenger} is already {CHAMPION}", challenger, decided_at
            )
        promote, reason = decide(champion, delta, margin, checks_passed)
        tags = {
            TAG_DECISION: "promoting" if promote else "rejected",
            TAG_REASON: reason,
            TAG_DELTA: "" if delta is None else f"{delta:.6g}",
            TAG_DECIDED_AT: decided_at,
            TAG_PREFIX + "challenger_score": f"{float(challenger_score):.6g}",
            TAG_PREFIX + "champion_score": "" if champion_score is None else f"{float(champion_score):.6g}",
            TAG_PREFIX + "margin": f"{margin:g}",
            TAG_PREFIX + "checks_passed": str(bool(checks_passed)).lower(),
            TAG_PREFIX + "champion_at_decision": champion or "",
            TAG_PREFIX + "context": json.dumps(context, sort_keys=True, default=str),
        }
        tracking.set_version_tags(model_name, challenger, tags)
        if promote:
            tracking.move_champion(model_name, challenger, champion)
            tracking.set_version_tags(model_name, challenger, {TAG_DECISION: "promoted"})
            previous = champion if champion is not None else previous
            champion = challenger
    return PromotionDecision(
        promoted=promote,
        champion_version=champion,
        previous_version=previous,
        delta=delta,
        reason=reason,
        challenger_version=challenger,
        decided_at=decided_at,
    )
