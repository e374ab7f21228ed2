"""TRACE's baselines and the registry of the four model kinds.

Every kind shares the training loop, the tasks, the user-embedding layer, the heads and the loss
(``SequenceUserModel`` in trace.py); they differ only in what they see and how they pool:

- ``trace``: TRACE on the multi-session encoding.
- ``myopic``: the *same* TRACE network fed only the user's most recent session before the
  cutoff (``EncoderConfig.last_session_only``): the single-session view of prior methods, so the
  uplift of ``trace`` over it measures the value of the cross-session history alone.
- ``vanilla_transformer``: page names only, fixed sinusoidal positions (of the events counted
  back from the cutoff), no session positions, no attributes, no time features.
- ``lstm``: an LSTM over the same per-event inputs as TRACE (attributes, time features, event
  and session positions) in chronological order; its last hidden state is the pooled vector.
- ``mini_gpt``: a small causal GPT over page names (mini_gpt.py), the paper's "Mini-GPT".
- ``myopic_last_page``: the TRACE network fed only the most recent page before the cutoff
  (the summary's reading of "myopic"; ``myopic`` is the current-session reading).

The aggregate-feature baselines (``st_agg``, ``st_cohort``) are not sequence models: they live
in aggregate_baselines.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

from torch import Tensor, nn

from model_lib.encoding import EncoderConfig, SequenceEncoder
from model_lib.mini_gpt import MiniGPT, MiniGPTConfig
from model_lib.packing import ATTENTION_GROUP_LENGTH_RATIO, Packing
from model_lib.trace import (
    TRACE,
    Block,
    EventEmbedding,
    SequenceUserModel,
    TRACEConfig,
    attention_mask,
    sinusoidal_table,
)


@dataclass
class VanillaTransformerConfig:
    vocab_sizes: tuple[int, ...] = (16,)  # only the first (event_name) is used
    n_time_features: int = 7  # accepted for a common signature, unused
    n_tasks: int = 5
    max_len: int = 128
    max_sessions: int = 32  # unused
    d_model: int = 32
    n_heads: int = 8
    d_ff: int = 128
    n_layers: int = 1
    dropout: float = 0.1
    embedding_dim: int = 32
    class_weighting: str = "balanced"
    task_names: tuple[str, ...] = field(default_factory=tuple)


class VanillaTransformer(SequenceUserModel):
    """Page-name tokens + sinusoidal positions through the same blocks and pooling as TRACE."""

    def __init__(self, config: VanillaTransformerConfig):
        super().__init__()
        self.config = c = config
        self.tokens = nn.Embedding(c.vocab_sizes[0], c.d_model, padding_idx=0)
        self.register_buffer("positions", sinusoidal_table(c.max_len, c.d_model), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.pooled_dim = c.d_model
        self._init_heads(c.embedding_dim, c.n_tasks, c.class_weighting)

    def pool(self, batch: dict[str, Tensor]) -> Tensor:
        packing = Packing.of(
            attention_mask(batch["mask"]), packed=self.packed_events, group_ratio=ATTENTION_GROUP_LENGTH_RATIO
        )
        pages = packing.pack(batch["cat_ids"][..., 0])  # [N]: the real events
        x = self.tokens(pages) + self.positions[packing.pack(batch["event_pos"]).long()]  # [N, D]
        x = packing.dropout(self.drop, x)
        for block in self.blocks:
            x = block(x, packing)
        return packing.max_pool(self.ln_f(x))  # [B, D]


@dataclass
class LSTMConfig:
    vocab_sizes: tuple[int, ...] = (16,)
    n_time_features: int = 7
    n_tasks: int = 5
    max_len: int = 128
    max_sessions: int = 32
    d_model: int = 32  # per-event input width
    hidden_size: int = 64
    n_layers: int = 1
    dropout: float = 0.1
    embedding_dim: int = 32
    class_weighting: str = "balanced"
    task_names: tuple[str, ...] = field(default_factory=tuple)


class LSTMUserModel(SequenceUserModel):
    """TRACE's per-event inputs through an LSTM; the state after the most recent event pools.

    The LSTM runs on the length groups of ``Packing`` (sequences of similar length padded to the
    longest of their group): a plain padded batch is what PyTorch's fused CPU LSTM (oneDNN) takes,
    and padding after a sequence's last event never changes the state at that event. The
    ``PackedSequence`` route (``packed_events = False``, the reference) runs one autograd slice per
    time step, whose backward zero-fills the whole input each time: ~4x slower on the pipeline's data.
    (With ``n_layers > 1`` the dropout between layers draws other masks on the two routes.)
    """

    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = c = config
        self.embedding = EventEmbedding(c.vocab_sizes, c.n_time_features, c.d_model, c.max_len, c.max_sessions)
        self.drop = nn.Dropout(c.dropout)
        self.lstm = nn.LSTM(
            c.d_model,
            c.hidden_size,
            num_layers=c.n_layers,
            batch_first=True,
            dropout=c.dropout if c.n_layers > 1 else 0.0,
        )
        self.pooled_dim = c.hidden_size
        self._init_heads(c.embedding_dim, c.n_tasks, c.class_weighting)

    def pool(self, batch: dict[str, Tensor]) -> Tensor:
        mask = attention_mask(batch["mask"])  # [B, L], events left-aligned in time order
        packing = Packing.of(mask, packed=self.packed_events)
        x = packing.dropout(self.drop, self.embedding(batch, packing))  # [N, D]
        if not self.packed_events:
            lengths = mask.sum(1).cpu()  # >= 1 thanks to attention_mask
            x = nn.utils.rnn.pack_padded_sequence(
                x.view(*mask.shape, -1), lengths, batch_first=True, enforce_sorted=False
            )
            _, (h, _) = self.lstm(x)  # h [n_layers, B, H]
            return h[-1]  # [B, H]
        states = [self.lstm(group)[0] for group in packing.to_groups(x)]  # [rows, length, H] per group
        return packing.from_groups(states)[packing.last()]  # [B, H]: after the most recent event


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ModelKind:
    name: str
    model_class: Callable[..., SequenceUserModel]
    config_class: type
    last_session_only: bool = False  # the encoder view this kind is trained and served on
    max_events: int | None = None  # at most this many most recent events (1: the last page)


MODEL_KINDS: dict[str, ModelKind] = {
    "trace": ModelKind("trace", TRACE, TRACEConfig),
    "myopic": ModelKind("myopic", TRACE, TRACEConfig, last_session_only=True),
    "vanilla_transformer": ModelKind("vanilla_transformer", VanillaTransformer, VanillaTransformerConfig),
    "lstm": ModelKind("lstm", LSTMUserModel, LSTMConfig),
    "mini_gpt": ModelKind("mini_gpt", MiniGPT, MiniGPTConfig),
    "myopic_last_page": ModelKind("myopic_last_page", TRACE, TRACEConfig, last_session_only=True, max_events=1),
}


def get_kind(name: str) -> ModelKind:
    try:
        return MODEL_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown model kind {name!r}; known: {sorted(MODEL_KINDS)}") from None


def encoder_config_for(kind: str, base: EncoderConfig | None = None) -> EncoderConfig:
    """The encoder view of a kind: ``base`` with ``last_session_only`` and ``max_events`` set by the kind."""
    base = base or EncoderConfig()
    k = get_kind(kind)
    return EncoderConfig(**{**base.__dict__, "last_session_only": k.last_session_only, "max_events": k.max_events})


def make_config(kind: str, encoder: SequenceEncoder, task_names, **overrides):
    """The kind's config dataclass sized from a fitted encoder; ``overrides`` set any field."""
    k = get_kind(kind)
    names = {f.name for f in fields(k.config_class)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"{kind}: unknown config fields {sorted(unknown)}; fields are {sorted(names)}")
    base = dict(
        vocab_sizes=tuple(encoder.vocab_sizes),
        n_time_features=encoder.n_time_features,
        n_tasks=len(task_names),
        max_len=encoder.config.max_len,
        max_sessions=encoder.config.max_sessions,
        task_names=tuple(task_names),
    )
    return k.config_class(**{**base, **overrides})


def build_model(kind: str, config) -> SequenceUserModel:
    k = get_kind(kind)
    if not isinstance(config, k.config_class):
        raise TypeError(f"{kind} needs a {k.config_class.__name__}, got {type(config).__name__}")
    return k.model_class(config)


__all__ = [
    "MODEL_KINDS",
    "LSTMConfig",
    "LSTMUserModel",
    "ModelKind",
    "VanillaTransformer",
    "VanillaTransformerConfig",
    "build_model",
    "encoder_config_for",
    "get_kind",
    "make_config",
]
