"""SoftSort, target permutations (order and ties) and the aggregation operators of MTLDS."""

import itertools

import pytest
import torch

from model_lib.mtlds import Aggregation, funnel_depth, permutation_loss, softsort, target_permutation

torch.set_num_threads(1)


def hard_permutation(scores: torch.Tensor) -> torch.Tensor:
    """Row i = one-hot of the item with the i-th largest score."""
    return torch.eye(scores.shape[-1])[scores.argsort(descending=True)]


@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("tau", [0.01, 1.0, 10.0])
def test_softsort_rows_are_distributions(tau, power):
    scores = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    p = softsort(scores, tau=tau, power=power)
    assert p.shape == (5, 7, 7)
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(5, 7))


def test_softsort_approaches_the_hard_permutation_as_tau_shrinks():
    scores = torch.tensor([0.3, -1.2, 2.0, 0.9, 0.31])
    hard = hard_permutation(scores)
    errors = [(softsort(scores, tau=tau) - hard).abs().max().item() for tau in (1.0, 0.1, 0.01, 0.001)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-3
    # at a large temperature every row is close to uniform: nothing is sorted yet
    assert (softsort(scores, tau=100.0) - 1 / 5).abs().max() < 0.05


def test_permutation_loss_gradients_flow_and_descent_sorts():
    scores = torch.tensor([[0.5, 0.1, 0.4, 0.2]], requires_grad=True)
    relevance = torch.tensor([[0.0, 2.0, 1.0, 0.0]])  # true order: item 1, item 2, then 0 and 3
    loss = permutation_loss(scores, relevance, tau=0.1)
    loss.backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0
    opt = torch.optim.SGD([scores], lr=0.05)
    first = loss.item()
    for _ in range(200):
        opt.zero_grad()
        loss = permutation_loss(scores, relevance, tau=0.1)
        loss.backward()
        opt.step()
    assert loss.item() < first / 2
    s = scores.detach()[0]
    assert s[1] > s[2] > max(s[0], s[3])


def test_funnel_depth_follows_the_label_order():
    # columns in funnel order (cart, buy): a buy without a cart is still the deepest stage
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    assert funnel_depth(labels).tolist() == [1.0, 2.0, 2.0, 0.0]
    # the same labels with the columns read in the opposite funnel order give another order
    assert funnel_depth(labels.flip(-1)).tolist() == [2.0, 1.0, 2.0, 0.0]


def test_target_permutation_without_ties_is_the_sorting_permutation():
    relevance = torch.tensor([1.0, 3.0, 0.0, 2.0])
    expected = torch.tensor(
        [[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.float32
    )  # ranks 1..4 are taken by items 1, 3, 0, 2
    torch.testing.assert_close(target_permutation(relevance), expected)


def test_target_permutation_spreads_ties_uniformly():
    relevance = torch.tensor([0.0, 2.0, 0.0, 2.0, 1.0])
    t = target_permutation(relevance)
    torch.testing.assert_close(t.sum(-1), torch.ones(5))
    # ranks 1 and 2 belong to {1, 3}, rank 3 to item 4, ranks 4 and 5 to {0, 2}
    for row in (0, 1):
        torch.testing.assert_close(t[row], torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0]))
    torch.testing.assert_close(t[2], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    for row in (3, 4):
        torch.testing.assert_close(t[row], torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0]))


def test_permutation_loss_is_plain_cross_entropy_without_ties():
    scores = torch.tensor([[0.2, 0.9, -0.4, 0.5]])
    relevance = torch.tensor([[1.0, 3.0, 0.0, 2.0]])
    p = softsort(scores, tau=0.5)[0]
    target = target_permutation(relevance[0])
    expected = -(target * p.log()).sum(-1).mean()
    torch.testing.assert_close(permutation_loss(scores, relevance, tau=0.5), expected)


def test_permutation_loss_ignores_the_order_inside_ties():
    relevance = torch.tensor([[2.0, 2.0, 0.0, 0.0, 0.0]])
    base = torch.tensor([[0.9, 0.7, 0.3, 0.2, 0.1]])
    swapped_inside_ties = torch.tensor([[0.7, 0.9, 0.1, 0.3, 0.2]])
    wrong_across_ties = torch.tensor([[0.9, 0.2, 0.3, 0.7, 0.1]])
    loss = lambda s: permutation_loss(s, relevance, tau=0.1).item()  # noqa: E731
    assert loss(base) == pytest.approx(loss(swapped_inside_ties), abs=1e-6)
    assert loss(wrong_across_ties) > loss(base) + 0.5


def test_permutation_loss_is_zero_for_lists_without_order():
    scores = torch.randn(3, 6, requires_grad=True)
    all_tied = torch.zeros(3, 6)
    loss = permutation_loss(scores, all_tied)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    # a tied list next to an ordered one does not dilute the ordered list's loss
    ordered = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    alone = permutation_loss(scores[:1], ordered)
    mixed = permutation_loss(scores[:2], torch.cat([ordered, torch.zeros(1, 6)]))
    torch.testing.assert_close(alone, mixed)


# ---------------------------------------------------------------------------------------------
# Aggregation operators

P = torch.tensor([[0.2, 0.5, 0.1], [0.9, 0.4, 0.3]])


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("sum", [0.8, 1.6]),
        ("mul", [0.01, 0.108]),
        ("max", [0.5, 0.9]),
        ("linear", [0.2 * 1 + 0.5 * 2 + 0.1 * 4, 0.9 * 1 + 0.4 * 2 + 0.3 * 4]),
        ("multiplicative", [0.01, 0.108]),
    ],
)
def test_aggregation_values(kind, expected):
    agg = Aggregation(kind, 3)
    if agg.weight is not None:
        with torch.no_grad():
            agg.weight.copy_(torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(agg(P), torch.tensor(expected))


def test_linear_aggregation_starts_as_sum_and_unknown_kinds_fail():
    torch.testing.assert_close(Aggregation("linear", 3)(P), Aggregation("sum", 3)(P))
    with pytest.raises(ValueError):
        Aggregation("median", 3)


SEQUENCES = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))  # all (click, cart, buy) label sequences


def confused_pairs(scores: torch.Tensor) -> set[frozenset]:
    """Pairs of sequences of different funnel depth that receive the same score."""
    depth = funnel_depth(SEQUENCES)
    rows = [tuple(int(v) for v in seq) for seq in SEQUENCES.tolist()]
    return {
        frozenset((rows[i], rows[j]))
        for i, j in itertools.combinations(range(len(rows)), 2)
        if depth[i] != depth[j] and torch.isclose(scores[i], scores[j])
    }


def test_mul_max_and_sum_cannot_tell_some_behaviour_sequences_apart():
    mul, mx, sm = (Aggregation(k, 3)(SEQUENCES) for k in ("mul", "max", "sum"))
    # mul: every sequence that misses a stage scores 0, e.g. click only vs no behaviour at all
    assert frozenset({(1, 0, 0), (0, 0, 0)}) in confused_pairs(mul)
    # max: any sequence with one behaviour scores 1, e.g. click only vs click, cart and buy
    assert frozenset({(1, 0, 0), (1, 1, 1)}) in confused_pairs(mx)
    # sum: counts behaviours, not how deep they go: click+cart vs click+buy (a buy without cart)
    assert frozenset({(1, 1, 0), (1, 0, 1)}) in confused_pairs(sm)


def test_linear_aggregation_can_separate_every_depth():
    agg = Aggregation("linear", 3)
    with torch.no_grad():
        agg.weight.copy_(torch.tensor([1.0, 2.0, 4.0]))
    scores = agg(SEQUENCES)
    assert confused_pairs(scores) == set()
    depth = funnel_depth(SEQUENCES)
    deeper = depth.unsqueeze(1) > depth.unsqueeze(0)
    assert torch.all((scores.unsqueeze(1) > scores.unsqueeze(0))[deeper])


def test_linear_weights_learned_by_the_permutation_loss_fix_what_sum_gets_wrong():
    """Per-task probabilities close to the sequences sum confuses: sum ranks the click+cart
    sample above the click+buy one; starting from the sum (w = 1), SoftSort alone learns
    weights that rank by depth. (Probabilities, not exact 0/1 labels: at an exact score tie the
    gradient of |s_i - s_j| is 0, so exact ties cannot be broken by the loss.)"""
    probs = torch.tensor([[0.9, 0.85, 0.1], [0.9, 0.1, 0.8], [0.9, 0.1, 0.1], [0.1, 0.1, 0.1]])
    depth = torch.tensor([[2.0, 3.0, 1.0, 0.0]])  # true sequences: click+cart, click+buy, click, none
    sum_scores = Aggregation("sum", 3)(probs)
    assert sum_scores[0] > sum_scores[1]  # the wrong order
    agg = Aggregation("linear", 3)
    opt = torch.optim.Adam(agg.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = permutation_loss(agg(probs).unsqueeze(0), depth, tau=0.1)
        loss.backward()
        opt.step()
    sum_loss = permutation_loss(sum_scores.unsqueeze(0), depth, tau=0.1)
    assert loss.item() < sum_loss.item() / 2
    s = agg(probs).detach()
    assert s[1] > s[0] > s[2] > s[3]
    assert agg.weight[2] > agg.weight[1]
