"""DistributedDataParallel: 2 gloo processes, launched the torchrun way, train TRACE as well as 1."""

import numpy as np
import pytest
import torch

from model_lib.distributed import fit_distributed
from model_lib.embedding_service import labels_tensor
from model_lib.encoding import EncoderConfig, SequenceEncoder
from model_lib.metrics import auroc
from model_lib.sequence_shards import ShardedExamples, ShardWriter
from model_lib.trace_baselines import build_model, make_config
from model_lib.training import TrainConfig, set_seed
from tests.trace_test_data import TASKS, simulated_split


def test_partition_gives_every_rank_the_same_number_of_disjoint_rows(tmp_path):
    writer = ShardWriter(tmp_path)
    for n in (7, 10):
        writer.write({"row": np.arange(n) + (0 if n == 7 else 100)})
    data = ShardedExamples(tmp_path)
    parts = [data.partition(r, 3) for r in range(3)]
    rows = [
        torch.cat([b["row"] for b in p.batches(2, shuffle=True, generator=torch.Generator())]).tolist() for p in parts
    ]
    assert [len(r) for r in rows] == [len(p) for p in parts] == [5, 5, 5]  # 7 // 3 + 10 // 3
    assert len({r for part in rows for r in part}) == 15


def encode_to_shards(encoder, events, examples, root, shards=3):
    writer = ShardWriter(root)
    for part in np.array_split(np.arange(len(examples)), shards):
        ex = examples.iloc[part].reset_index(drop=True)
        writer.write({**encoder.transform(events, ex), "labels": labels_tensor(ex, list(TASKS))})
    return ShardedExamples(root)


def bootstrap_se(y, p, n=200, seed=0):
    rng = np.random.default_rng(seed)
    values = [auroc(y[i], p[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n))]
    return float(np.nanstd(values))


@pytest.mark.slow
def test_two_gloo_processes_train_trace_as_well_as_one(tmp_path):
    events, train, valid, test = simulated_split(n_users=1200)
    encoder = SequenceEncoder(EncoderConfig(max_len=48)).fit(events, train)
    shards = {s: encode_to_shards(encoder, events, ex, tmp_path / s) for s, ex in (("train", train), ("valid", valid))}
    test_inputs = encoder.transform(events, test)
    y = labels_tensor(test, list(TASKS)).numpy()
    config = make_config("trace", encoder, list(TASKS))
    scores, ses = {}, {}
    for world in (1, 2):
        set_seed(0)
        model = build_model("trace", config)
        model.set_class_weights(torch.from_numpy(shards["train"].column("labels")).reshape(-1, len(TASKS)))
        result = fit_distributed(
            model,
            build_model,
            ("trace", config),
            shards["train"],
            shards["valid"],
            TrainConfig(epochs=4, batch_size=64, num_threads=1, patience=2),
            world_size=world,
        )
        assert result.history and result.best_epoch >= 1
        with torch.inference_mode():
            p = model.predict_proba(test_inputs).numpy()
        main = 0  # booking within 14 days: the task with the most signal in the simulator
        known = ~np.isnan(y[:, main])
        scores[world] = auroc(y[known, main], p[known, main])
        ses[world] = bootstrap_se(y[known, main], p[known, main])
    assert scores[1] > 0.6 and scores[2] > 0.6, scores  # both learn (chance is 0.5)
    assert abs(scores[2] - scores[1]) < 3 * max(ses.values()), (scores, ses)  # within noise
