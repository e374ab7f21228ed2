"""MTLDS training throughput on this CPU and the cost of the SoftSort permutation term.

Measured side by side in one run: a training step (forward, loss, backward, gradient
clipping, AdamW step, as in ``training.fit``) of the same MTLDS model with the permutation
loss (lambda = 1) and without it (lambda = 0), interleaved round by round so that load from
other processes hits both alike. Also the throughput of every baseline and the time to build
samples. Data: the Taobao slices under ../shared/data if present, else synthetic tensors.

    python bench/mtlds_model.py [--quick] [--threads 1] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

if __package__ in (None, ""):  # `python bench/x.py`: the repository root, as `python -m bench.x` has it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_lib.funnel_samples import FUNNELS, build_funnel_samples, samples_to_tensors
from model_lib.mtlds import MTLDSConfig
from model_lib.mtlds_baselines import MODEL_NAMES, build_model
from model_lib.training import iterate_batches

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "taobao_userbehavior"
SPEC = replace(FUNNELS["taobao"], item_buckets=2**12, category_buckets=2**10)


def load_samples() -> tuple[dict[str, torch.Tensor], str]:
    files = [DATA / "userbehavior_head.csv.gz", DATA / "userbehavior_tail.csv.gz"]
    if all(f.exists() for f in files):
        cols = ["user_id", "item_id", "category", "event_name", "timestamp"]
        events = pd.concat([pd.read_csv(f, header=None, names=cols, dtype=str) for f in files]).dropna()
        events["event_time"] = pd.to_datetime(events.pop("timestamp").astype(np.int64), unit="s", utc=True)
        started = time.perf_counter()
        samples = build_funnel_samples(events, SPEC)
        seconds = time.perf_counter() - started
        note = f"Taobao slices: {len(events):,} events -> {len(samples):,} samples in {seconds:.2f} s ({len(events) / seconds:,.0f} events/s)"
        return samples_to_tensors(samples, SPEC), note
    g = torch.Generator().manual_seed(0)
    n = 40_000
    data = {
        "item": torch.randint(1, SPEC.item_buckets, (n,), generator=g),
        "category": torch.randint(1, SPEC.category_buckets, (n,), generator=g),
        "user": torch.randint(1, SPEC.user_buckets, (n,), generator=g),
        "hour": torch.randint(0, 24, (n,), generator=g),
        "weekday": torch.randint(0, 7, (n,), generator=g),
        "dense": torch.randn(n, MTLDSConfig.from_spec(SPEC).dense_features, generator=g),
        "labels": (torch.rand(n, len(SPEC.tasks), generator=g) < 0.02).float(),
    }
    return data, f"synthetic tensors ({n:,} samples): Taobao slices not found under {DATA}"


def make_step(model: torch.nn.Module):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch):
        loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step


def time_steps(step, batches) -> float:
    """Seconds per step over ``batches``."""
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    return (time.perf_counter() - started) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (< 30 s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, steps = (5, 20) if args.quick else (15, 50)

    data, note = load_samples()
    batches = list(iterate_batches(data, args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)))
    batches = [b for b in batches if len(b["labels"]) == args.batch_size][:steps]
    cfg = MTLDSConfig.from_spec(SPEC, bottom=(128, 64), tower=(32,), embed_dim=16)
    print(f"data: {note}")
    print(
        f"torch {torch.__version__}, threads {args.threads}, batch {args.batch_size}, list_size {cfg.list_size}, "
        f"bottom {cfg.bottom}, tower {cfg.tower}; {rounds} rounds x {len(batches)} steps, medians"
    )

    # The same MTLDS weights with and without the permutation term, interleaved.
    torch.manual_seed(0)
    with_perm = build_model("mtlds_linear", replace(cfg, perm_weight=1.0))
    without = build_model("mtlds_linear", replace(cfg, perm_weight=0.0))
    without.load_state_dict(with_perm.state_dict())
    variants = {"with permutation loss": make_step(with_perm), "without (BCE only)": make_step(without)}
    for step in variants.values():  # warm-up
        time_steps(step, batches[:3])
    seconds = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            seconds[name].append(time_steps(step, batches))
    med = {name: statistics.median(v) for name, v in seconds.items()}
    print("\nMTLDS (linear) training step")
    for name, s in med.items():
        print(f"  {name:24s} {s * 1e3:7.2f} ms/step  {args.batch_size / s:9,.0f} samples/s")
    extra = med["with permutation loss"] - med["without (BCE only)"]
    print(
        f"  SoftSort term: +{extra * 1e3:.2f} ms/step = {100 * extra / med['without (BCE only)']:.1f}% of a step "
        f"without it ({100 * extra / med['with permutation loss']:.1f}% of a full step)"
    )

    print("\nevery model, default losses (same widths)")
    round_robin = {name: make_step(build_model(name, cfg)) for name in MODEL_NAMES if name != "mtlds"}
    for step in round_robin.values():
        time_steps(step, batches[:2])
    per_model = {name: [] for name in round_robin}
    for _ in range(max(2, rounds // 3)):
        for name, step in round_robin.items():
            per_model[name].append(time_steps(step, batches))
    for name, v in per_model.items():
        s = statistics.median(v)
        print(f"  {name:15s} {s * 1e3:7.2f} ms/step  {args.batch_size / s:9,.0f} samples/s")


if __name__ == "__main__":
    main()
