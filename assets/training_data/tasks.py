"""Engagement targets, declared as data: the one place that says what TRACE learns and is judged on.

A task is a boolean label per (user, cutoff): a DuckDB aggregate over the user's events in a
label window after the cutoff. `seen` tasks train TRACE (and its baselines); `unseen` tasks are
never shown to a model and are evaluated by probes on the frozen embeddings, which is how the
paper tests whether a representation generalises.

Columns a `label_sql` may use: every `sessionized_events` column of the window's events, plus
`category_seen_before` and `item_seen_before` (the user had an event on that category / item
before the cutoff). A window with no events gives `false`.

The defaults follow the paper's five training targets where the data has them (purchase within
two weeks, a bounce, a search page / product page / existing order in the next session; the
last three come from a secondary summary of the paper, see ../shared/design/papers.md) and are
adapted to what each real format records. Override them with a JSON file (`load_task_set`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

TaskKind = Literal["seen", "unseen"]
Window = Literal["horizon", "next_session"]
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class EngagementTask:
    name: str
    kind: TaskKind
    label_sql: str  # DuckDB aggregate over the window's events, e.g. "bool_or(event_name = 'buy')"
    window: Window = "horizon"  # all events up to cutoff + horizon, or only the next session's
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"task name {self.name!r} must be lower_snake_case (it becomes a column name)")
        if self.kind not in ("seen", "unseen"):
            raise ValueError(f"task {self.name}: kind must be 'seen' or 'unseen', not {self.kind!r}")
        if self.window not in ("horizon", "next_session"):
            raise ValueError(f"task {self.name}: window must be 'horizon' or 'next_session', not {self.window!r}")
        if ";" in self.label_sql:
            raise ValueError(f"task {self.name}: label_sql must be a single expression")

    @property
    def column(self) -> str:
        return f"label_{self.name}"


@dataclass(frozen=True)
class TaskSet:
    """Tasks plus the rolling-cutoff design that turns a event log into labelled examples."""

    name: str
    tasks: tuple[EngagementTask, ...]
    horizon: timedelta  # label window after each cutoff
    observation: timedelta  # a user is an example at a cutoff if active in this window before it
    n_cutoffs: int = 3
    cutoff_step: timedelta = timedelta(days=7)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task set {self.name}: duplicate task names in {names}")
        if not self.seen or not self.unseen:
            raise ValueError(f"task set {self.name}: needs at least one seen and one unseen task")
        if self.n_cutoffs < 1:
            raise ValueError(f"task set {self.name}: n_cutoffs must be >= 1")

    @property
    def seen(self) -> tuple[EngagementTask, ...]:
        return tuple(t for t in self.tasks if t.kind == "seen")

    @property
    def unseen(self) -> tuple[EngagementTask, ...]:
        return tuple(t for t in self.tasks if t.kind == "unseen")

    def to_json(self) -> str:
        d = asdict(self)
        for key in ("horizon", "observation", "cutoff_step"):
            d[key] = d[key].total_seconds()
        return json.dumps(d, indent=2)


def _any(pred: str) -> str:
    return f"bool_or({pred})"


def _hours(h: float) -> timedelta:
    return timedelta(hours=h)


SIMULATOR_TASKS = TaskSet(
    name="simulator",
    description="Travel site (the embedded simulator): the paper's five targets, three unseen ones.",
    horizon=timedelta(days=14),
    observation=timedelta(days=14),
    n_cutoffs=3,
    cutoff_step=timedelta(days=7),
    tasks=(
        EngagementTask(
            "booking_14d",
            "seen",
            _any("event_name = 'booking_confirmation'"),
            description="a booking within two weeks (purchase)",
        ),
        EngagementTask(
            "bounce_next_session", "seen", "count(*) = 1", "next_session", "the next session is a single page view"
        ),
        EngagementTask(
            "search_next_session",
            "seen",
            _any("event_name = 'search_results'"),
            "next_session",
            "a search-results page in the next session",
        ),
        EngagementTask(
            "property_next_session",
            "seen",
            _any("event_name = 'property_page'"),
            "next_session",
            "a product-detail (property) page in the next session",
        ),
        EngagementTask(
            "view_order_next_session",
            "seen",
            _any("event_name = 'view_order'"),
            "next_session",
            "viewing an existing order in the next session",
        ),
        EngagementTask(
            "flight_next_session",
            "unseen",
            _any("event_name = 'flight_page'"),
            "next_session",
            "a flight page in the next session",
        ),
        EngagementTask("help_14d", "unseen", _any("event_name = 'help'"), description="a help page within two weeks"),
        EngagementTask(
            "checkout_known_destination_14d",
            "unseen",
            _any("event_name = 'checkout' AND category_seen_before"),
            description="a checkout of a property type viewed before the cutoff",
        ),
    ),
)

TAOBAO_TASKS = TaskSet(
    name="taobao",
    description="Taobao UserBehavior, nine days: two-day label windows at three daily cutoffs.",
    horizon=timedelta(days=2),
    observation=timedelta(days=4),
    n_cutoffs=3,
    cutoff_step=timedelta(days=1),
    tasks=(
        EngagementTask("return_2d", "seen", "count(*) > 0", description="any visit within two days"),
        EngagementTask("cart_2d", "seen", _any("event_name = 'cart'"), description="an add-to-cart"),
        EngagementTask("buy_2d", "seen", _any("event_name = 'buy'"), description="a purchase"),
        EngagementTask("fav_2d", "seen", _any("event_name = 'fav'"), description="a favourite"),
        EngagementTask(
            "heavy_browsing_2d",
            "seen",
            "count(*) FILTER (event_name = 'pv') >= 20",
            description="20 or more page views",
        ),
        EngagementTask(
            "buy_viewed_category_2d",
            "unseen",
            _any("event_name = 'buy' AND category_seen_before"),
            description="a purchase in a category viewed before the cutoff",
        ),
        EngagementTask(
            "new_category_2d",
            "unseen",
            _any("event_name = 'pv' AND NOT category_seen_before"),
            description="exploration: a view in a category never viewed before",
        ),
        EngagementTask(
            "several_sessions_2d", "unseen", "count(DISTINCT session_id) >= 2", description="two or more sessions"
        ),
    ),
)

REES46_TASKS = TaskSet(
    name="rees46",
    description="REES46, under three hours of a store: a schema demo (no user has two sessions).",
    horizon=_hours(0.5),
    observation=_hours(1),
    n_cutoffs=2,
    cutoff_step=_hours(0.5),
    tasks=(
        EngagementTask("return_30m", "seen", "count(*) > 0", description="any event within 30 minutes"),
        EngagementTask("cart_30m", "seen", _any("event_name = 'cart'")),
        EngagementTask("purchase_30m", "seen", _any("event_name = 'purchase'")),
        EngagementTask("heavy_browsing_30m", "seen", "count(*) FILTER (event_name = 'view') >= 5"),
        EngagementTask("remove_from_cart_30m", "seen", _any("event_name = 'remove_from_cart'")),
        EngagementTask("view_seen_item_30m", "unseen", _any("event_name = 'view' AND item_seen_before")),
        EngagementTask("new_category_30m", "unseen", _any("event_name = 'view' AND NOT category_seen_before")),
        EngagementTask("purchase_seen_item_30m", "unseen", _any("event_name = 'purchase' AND item_seen_before")),
    ),
)

RETAILROCKET_TASKS = TaskSet(
    name="retailrocket",
    description="Retailrocket, May to September 2015: two-week windows at three cutoffs.",
    horizon=timedelta(days=14),
    observation=timedelta(days=28),
    n_cutoffs=3,
    cutoff_step=timedelta(days=14),
    tasks=(
        EngagementTask("return_14d", "seen", "count(*) > 0", description="any visit within two weeks"),
        EngagementTask("addtocart_14d", "seen", _any("event_name = 'addtocart'")),
        EngagementTask("transaction_14d", "seen", _any("event_name = 'transaction'")),
        EngagementTask("heavy_browsing_14d", "seen", "count(*) FILTER (event_name = 'view') >= 5"),
        EngagementTask("view_next_session", "seen", _any("event_name = 'view'"), "next_session"),
        EngagementTask("view_seen_item_14d", "unseen", _any("event_name = 'view' AND item_seen_before")),
        EngagementTask("addtocart_seen_item_14d", "unseen", _any("event_name = 'addtocart' AND item_seen_before")),
        EngagementTask("several_sessions_14d", "unseen", "count(DISTINCT session_id) >= 2"),
    ),
)

DEFAULT_TASK_SETS: dict[str, TaskSet] = {
    "canonical": SIMULATOR_TASKS,  # the simulator speaks the canonical format
    "simulator": SIMULATOR_TASKS,
    "taobao": TAOBAO_TASKS,
    "rees46": REES46_TASKS,
    "retailrocket": RETAILROCKET_TASKS,
}


def default_task_set(event_format: str) -> TaskSet:
    try:
        return DEFAULT_TASK_SETS[event_format]
    except KeyError:
        raise ValueError(f"no default tasks for format {event_format!r}; known: {sorted(DEFAULT_TASK_SETS)}") from None


def load_task_set(path: str | Path) -> TaskSet:
    """A task set from JSON: the fields of TaskSet, durations in seconds, tasks as objects."""
    d = json.loads(Path(path).read_text())
    tasks = tuple(EngagementTask(**t) for t in d.pop("tasks"))
    for key in ("horizon", "observation", "cutoff_step"):
        if d.get(key) is not None:
            d[key] = timedelta(seconds=float(d[key]))
    return TaskSet(tasks=tasks, **d)
