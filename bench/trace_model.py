"""TRACE on this CPU: training throughput against the machine's matmul rate, serving latency.

    .venv/bin/python -m bench.trace_model            # full run
    .venv/bin/python -m bench.trace_model --quick    # < 30 s, same figures

Measured side by side in one run, on simulated users (resources.event_sources.simulator, sessionized by the
pandas reference in bench/pandas_reference.py):

- dense float32 matmul rate (GFLOP/s) on the training thread count: the ceiling for this model;
- TRACE training throughput (sequences/s of forward + backward + clipping + AdamW on full-length
  sequences), and the same as a fraction of the matmul rate, using an analytic count of the
  model's FLOPs per sequence (``trace_flops_per_sequence``; training = 3 x forward); on one
  thread, the attention kernel (model_lib/attention_kernel.py) and PyTorch's attention alternated;
- the training loop the pipeline runs: ``training.fit`` over memory-mapped shards, on one thread
  (each step of the default run has one), on examples cut like the default run's (every user
  active in the 14 days before each of three weekly cutoffs, so most histories are far shorter
  than max_len); its rate of useful FLOPs (real events only) against the one-thread matmul rate,
  side by side with the same loop on the padded computation (``packed_events = False``) and on
  PyTorch's attention instead of the kernel;
- single-user embedding latency on one thread, end to end (the user's events as a DataFrame ->
  encoder -> network -> embedding), p50 and p99 over many requests; target p99 < 5 ms;
- batched embedding throughput (users/s, encoding included) on one thread and on all threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch

if __package__ in (None, ""):  # `python bench/x.py`: the repository root, as `python -m bench.x` has it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pandas_reference import sessionize_pandas
from model_lib import attention_kernel, slot_dropout
from model_lib.embedding_service import UserModel
from model_lib.encoding import EncoderConfig, SequenceEncoder, prepare_events
from model_lib.sequence_shards import ShardedExamples, ShardWriter
from model_lib.trace import TRACEConfig, count_parameters
from model_lib.trace_baselines import build_model, make_config
from model_lib.training import TrainConfig, fit, set_seed

TASKS = ("task_0", "task_1", "task_2", "task_3", "task_4")


def trace_flops_per_sequence(c: TRACEConfig, length: int | None = None) -> float:
    """Forward FLOPs (2 per multiply-add) of one sequence of ``length`` real events (default: a
    full one, max_len); embedding lookups, norms and activations are ignored (they are
    memory-bound, not FLOPs)."""
    L, D = (c.max_len if length is None else length), c.d_model
    per_token_block = 2 * D * 3 * D + 2 * D * D + 2 * 2 * D * c.d_ff + 2 * 2 * L * D  # qkv, proj, ff, QK^T and AV
    per_token = 2 * c.n_time_features * D + c.n_layers * per_token_block
    return L * per_token + 2 * D * c.embedding_dim + 2 * c.embedding_dim * c.n_tasks


def matmul_gflops(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best / 1e9


def simulated_events(n_users: int, seed: int) -> pd.DataFrame:
    from resources.event_sources.simulator import SimulatorConfig, simulate_events

    raw = simulate_events(SimulatorConfig(n_users=n_users, days=35, seed=seed))
    raw = raw.assign(source_file="simulator", source_row=np.arange(1, len(raw) + 1))
    return sessionize_pandas(raw).drop(columns=["source_file", "source_row"])


def training_throughput(model, batch: dict, steps: int, threads: int) -> float:
    """Sequences/s of the steps ``training.fit`` takes, on one batch held in memory."""
    torch.set_num_threads(threads)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(batch["mask"]) / (time.perf_counter() - t)


def pipeline_examples(events: pd.DataFrame, cutoff_days=(7, 14, 21), observation_days: int = 14) -> pd.DataFrame:
    """(user_id, cutoff) like the default run's examples: every user with an event in the
    observation window before each weekly cutoff (assets/training_data, simulator task set)."""
    start = events["event_time"].min().normalize()
    frames = []
    for day in cutoff_days:
        cutoff = start + pd.Timedelta(days=day)
        window = events[events["event_time"].between(cutoff - pd.Timedelta(days=observation_days), cutoff, "left")]
        users = window["user_id"].astype(str).unique()
        frames.append(pd.DataFrame({"user_id": users, "cutoff": cutoff}))
    return pd.concat(frames, ignore_index=True)


def fit_throughput(
    config,
    encoded: dict,
    root: Path,
    batch_size: int,
    packed: bool,
    seed: int,
    sample_budget: int | None = None,
    kernel: bool = True,
) -> float:
    """Sequences/s of one epoch of ``training.fit`` over shards of ``encoded`` (at most
    ``sample_budget`` rows), one thread: the training pass of a pipeline step (shard reads,
    forward, backward, clipping, AdamW)."""
    n = len(encoded["mask"])
    arrays = {k: v.numpy() for k, v in encoded.items()}
    for split, rows in (("train", slice(0, n)), ("valid", slice(0, min(n, batch_size)))):
        if not (root / split).exists():
            writer = ShardWriter(root / split)
            for start in range(rows.start, rows.stop, 2000):  # a few shards, as the pipeline's buckets
                writer.write({k: v[start : min(start + 2000, rows.stop)] for k, v in arrays.items()})
    set_seed(seed)
    model = build_model("trace", config)
    model.packed_events = packed
    model.set_class_weights(encoded["labels"])
    with nullcontext() if kernel else attention_kernel.pytorch_only():
        result = fit(
            model,
            ShardedExamples(root / "train"),
            ShardedExamples(root / "valid"),
            TrainConfig(epochs=1, batch_size=batch_size, num_threads=1, seed=seed, sample_budget=sample_budget),
        )
    return result.history[0].samples_per_second


def attention_kernel_side_by_side(model, batch: dict, steps: int, repeats: int) -> dict[bool, list[float]]:
    """Training sequences/s on one thread with the attention kernel (True) and with PyTorch's
    attention (False), alternated ``repeats`` times on the same batch."""
    rates = {True: [], False: []}
    for r in range(repeats):
        for kernel in (True, False) if r % 2 == 0 else (False, True):
            with nullcontext() if kernel else attention_kernel.pytorch_only():
                rates[kernel].append(training_throughput(model, batch, steps, 1))
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 30 s")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads for training / batched figures"
    )
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_users, steps, requests, batch_size = (400, 4, 300, 128) if args.quick else (3000, 20, 2000, 256)
    threads = max(1, args.threads)
    started = time.perf_counter()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads available, using {threads}; "
        f"max_len={args.max_len}; {'quick' if args.quick else 'full'} run"
    )
    gflops = matmul_gflops(threads, seconds=0.5 if args.quick else 2.0)
    gflops_1 = matmul_gflops(1, seconds=0.5 if args.quick else 2.0)
    print(f"matmul_gflops={gflops:.1f} (1024x1024 float32, {threads} threads); matmul_gflops_1thread={gflops_1:.1f}")

    # --- data and model --------------------------------------------------------------------
    events = simulated_events(n_users, args.seed)
    ev = prepare_events(events)
    last = events.groupby("user_id", observed=True)["event_time"].max()
    examples = pd.DataFrame({"user_id": last.index.astype(str), "cutoff": last.to_numpy() + pd.Timedelta(hours=1)})
    encoder = SequenceEncoder(EncoderConfig(max_len=args.max_len)).fit(ev, examples)
    set_seed(args.seed)
    model = build_model("trace", make_config("trace", encoder, TASKS))
    service = UserModel("trace", model, encoder)
    cfg = model.config
    flops = trace_flops_per_sequence(cfg)
    print(
        f"events={len(events):,} users={len(examples):,} params={count_parameters(model):,} "
        f"forward_mflops_per_sequence={flops / 1e6:.2f}"
    )

    # --- training throughput on full-length sequences (the cost ceiling per sequence) ------
    t0 = time.perf_counter()
    encoded = encoder.transform(ev, examples)
    encode_per_s = len(examples) / (time.perf_counter() - t0)
    full = {k: v[:batch_size].clone() for k, v in encoded.items()}
    rows = len(full["mask"])
    if rows < batch_size:  # tile to a full batch
        reps = -(-batch_size // rows)
        full = {k: v.repeat(reps, *([1] * (v.dim() - 1)))[:batch_size] for k, v in full.items()}
    full["mask"] = torch.ones_like(full["mask"])  # every position real: the FLOP count's assumption
    full["event_pos"] = torch.arange(cfg.max_len).flip(0).expand(batch_size, -1).to(torch.int32).contiguous()
    full["labels"] = torch.randint(0, 2, (batch_size, len(TASKS))).float()
    seq_per_s = training_throughput(model, full, steps, threads)
    achieved = seq_per_s * 3 * flops / 1e9
    print(f"train_sequences_per_s={seq_per_s:.0f} (batch {batch_size}, full length {cfg.max_len}, {threads} threads)")
    print(f"train_gflops={achieved:.2f} fraction_of_matmul={achieved / gflops:.3f}")
    # The same at larger batches, each bracketed by matmul measurements (the machine may be
    # shared: the fraction uses the mean of the rates just before and just after).
    for big in (batch_size * 4,):
        reps = -(-big // batch_size)
        batch = {k: v.repeat(reps, *([1] * (v.dim() - 1)))[:big] for k, v in full.items()}
        before = matmul_gflops(threads, seconds=0.5)
        rate = training_throughput(model, batch, max(2, steps // 2), threads)
        after = matmul_gflops(threads, seconds=0.5)
        print(
            f"train_sequences_per_s_batch{big}={rate:.0f} fraction_of_matmul_batch{big}="
            f"{rate * 3 * flops / 1e9 / ((before + after) / 2):.3f} (matmul {before:.1f} / {after:.1f} GFLOP/s around it)"
        )
    # The same full-length batch on one thread: the attention kernel (model_lib/attention_kernel.py,
    # what training on one thread uses) against PyTorch's attention, alternated.
    before = matmul_gflops(1, seconds=0.5)
    side = attention_kernel_side_by_side(model, full, max(2, steps // 4), 3 if args.quick else 5)
    after = matmul_gflops(1, seconds=0.5)
    fractions = {}
    for kernel, name in ((True, "kernel"), (False, "pytorch")):
        rate = float(np.median(side[kernel]))
        fractions[kernel] = rate * 3 * flops / 1e9 / ((before + after) / 2)
        print(
            f"train_sequences_per_s_1thread_attention_{name}={rate:.0f} "
            f"(min {min(side[kernel]):.0f}, max {max(side[kernel]):.0f}) fraction_of_matmul_1thread_attention_{name}="
            f"{fractions[kernel]:.3f}"
        )
    print(
        f"attention kernel available: {attention_kernel.kernel() is not None}; dropout kernel available: "
        f"{slot_dropout.kernel() is not None}; matmul {before:.1f} / {after:.1f} GFLOP/s around it"
    )
    print(f"target_fraction_of_matmul_1thread=0.25 met={fractions[True] >= 0.25} (full-length batch, attention kernel)")
    real_len = encoded["mask"].sum(1).float()
    print(f"encode_examples_per_s={encode_per_s:.0f} (mean real length {real_len.mean():.1f} of {cfg.max_len})")

    # --- the pipeline's training loop: training.fit over shards, one thread ------------------
    cut = pipeline_examples(events)
    pipe = encoder.transform(ev, cut)
    pipe["labels"] = torch.from_numpy(np.random.default_rng(args.seed).random((len(cut), len(TASKS))) < 0.3).float()
    lengths = pipe["mask"].sum(1).clamp(min=1)  # an empty history runs as one (padding) event
    useful = float(np.mean([trace_flops_per_sequence(cfg, int(n)) for n in lengths]))
    with tempfile.TemporaryDirectory() as tmp:
        matmul_1 = matmul_gflops(1, seconds=0.5)
        slow_budget = 4 * batch_size if args.quick else None  # the padded reference: a few batches in a quick run
        rates = {False: fit_throughput(cfg, pipe, Path(tmp), batch_size, False, args.seed, slow_budget)}
        # packed with the attention kernel (True) and with PyTorch's attention, alternated: medians
        packed_runs = {True: [], False: []}
        for r in range(3):
            for kernel in (True, False) if r % 2 else (False, True):
                packed_runs[kernel].append(
                    fit_throughput(cfg, pipe, Path(tmp), batch_size, True, args.seed, kernel=kernel)
                )
        rates[True], rate_pytorch_attention = (float(np.median(packed_runs[k])) for k in (True, False))
        matmul_1 = (matmul_1 + matmul_gflops(1, seconds=0.5)) / 2
    print(
        f"fit_over_shards: {len(cut)} examples (3 weekly cutoffs), mean real length {lengths.float().mean():.1f} "
        f"of {cfg.max_len}, batch {batch_size}, 1 thread, matmul {matmul_1:.1f} GFLOP/s around it"
    )
    for packed, name in ((True, "packed"), (False, "padded")):
        gflops_fit = rates[packed] * 3 * useful / 1e9
        print(
            f"fit_sequences_per_s_{name}={rates[packed]:.0f} fit_useful_gflops_{name}={gflops_fit:.2f} "
            f"fraction_of_matmul_1thread_{name}={gflops_fit / matmul_1:.3f}"
        )
    print(f"fit_speedup_packed_over_padded={rates[True] / rates[False]:.2f}")
    gflops_fit = rate_pytorch_attention * 3 * useful / 1e9
    print(
        f"fit_sequences_per_s_packed_pytorch_attention={rate_pytorch_attention:.0f} "
        f"fraction_of_matmul_1thread_packed_pytorch_attention={gflops_fit / matmul_1:.3f} "
        f"(packed: medians of 3 runs each, alternated; kernel {[round(r) for r in packed_runs[True]]}, "
        f"pytorch {[round(r) for r in packed_runs[False]]}; kernel available: {attention_kernel.kernel() is not None})"
    )

    # --- batched embedding throughput (encoding included) -----------------------------------
    model.eval()
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        t0 = time.perf_counter()
        emb = service.embed(ev, examples, batch_size=1024)
        rate = len(examples) / (time.perf_counter() - t0)
        print(f"batch_users_per_s_{n_threads}thread={rate:.0f} (embedding dim {emb.shape[1]})")

    # --- single-user latency, one thread, end to end ---------------------------------------
    torch.set_num_threads(1)
    sizes = events.groupby("user_id", observed=True).size()
    heavy = sizes.index[np.argsort(sizes.to_numpy())[-20:]]  # the longest histories: worst case
    by_user = {u: events[events["user_id"] == u] for u in heavy}
    as_of = {u: last.loc[u] + pd.Timedelta(hours=1) for u in heavy}
    users = list(heavy)
    for u in users[:3]:
        service.embed_user(by_user[u], as_of=as_of[u])  # warm-up
    lat = np.empty(requests)
    for i in range(requests):
        u = users[i % len(users)]
        t = time.perf_counter()
        service.embed_user(by_user[u], as_of=as_of[u])
        lat[i] = (time.perf_counter() - t) * 1e3
    one = encoder.transform(by_user[users[0]], pd.DataFrame({"user_id": [str(users[0])], "cutoff": [as_of[users[0]]]}))
    fwd = np.empty(requests)
    with torch.inference_mode():
        for i in range(requests):
            t = time.perf_counter()
            model.embed(one)
            fwd[i] = (time.perf_counter() - t) * 1e3
    print(
        f"single_user: {requests} requests, users with {sizes.loc[heavy].min()}-{sizes.loc[heavy].max()} events, 1 thread, end to end"
    )
    print(f"p50_ms={np.percentile(lat, 50):.2f}")
    print(f"p99_ms={np.percentile(lat, 99):.2f}")
    print(f"forward_only_p50_ms={np.percentile(fwd, 50):.2f} forward_only_p99_ms={np.percentile(fwd, 99):.2f}")
    print(f"target_p99_ms=5 met={bool(np.percentile(lat, 99) < 5)}")
    print(f"total_seconds={time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
