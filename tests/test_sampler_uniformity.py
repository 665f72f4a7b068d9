"""The step-hash sampler (FixedCountSampler / random_keys) draws like a uniform random sampler.

Each draw picks k of the m candidates of a pool (positives, then negatives). Under uniform sampling without
replacement, independent across draws, candidate i is picked with probability p = k / m, two given
candidates together with q = k (k - 1) / (m (m - 1)), and the draws of two independent streams (other image,
other stage, next step) coincide for a candidate with probability p^2. Each property is checked with a
chi-square statistic over SEEDS draws (seeds 0 .. SEEDS - 1, the step counters of a run) against its
1 - ALPHA quantile. The seeds are fixed, so the outcome is fixed too: the test is not flaky, it passes or
fails the same way on every run; ALPHA = 1e-3 bounds the chance that a truly uniform sampler would have
failed on this one set of seeds. Control samplers with a known flaw show that each statistic rejects it.
"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from scipy import stats

from src.maskrcnn.bbox_assign_sample import RCNN_STREAM, RPN_STREAM, FixedCountSampler, random_keys

SEEDS = 2000
ALPHA = 1e-3
NUM_CANDIDATES = 200
POSITIVES = np.arange(0, 20)          # contiguous pools: adjacent ids (id XOR state) share a pool
NEGATIVES = np.arange(20, 150)        # ids 150.. are ignored (neither positive nor negative)
NUM_POS, NUM_TOTAL = 8, 32            # quotas: 8 of the 20 positives, then 24 of the 130 negatives


class SamplerNet(nn.Cell):
    def __init__(self, stream):
        super().__init__()
        self.sampler = FixedCountSampler(NUM_CANDIDATES, NUM_POS, NUM_TOTAL, stream)

    def construct(self, positive, negative, seed, image_index):
        return self.sampler(positive, negative, seed, image_index)


def draw(net, positive, negative, image_index, seeds):
    """(seeds, N) bool: the candidates picked by each draw (positives and negatives); quota rules checked."""
    picked = np.zeros((len(seeds), NUM_CANDIDATES), bool)
    want_pos = min(int(positive.sum()), NUM_POS)
    want_neg = min(int(negative.sum()), NUM_TOTAL - want_pos)
    pos, neg = ms.Tensor(positive), ms.Tensor(negative)
    for row, seed in enumerate(seeds):
        pos_index, pos_used, neg_index, neg_used = (x.asnumpy() for x in net(
            pos, neg, ms.Tensor(seed, ms.int32), ms.Tensor(image_index, ms.int32)))
        chosen_pos, chosen_neg = pos_index[pos_used], neg_index[neg_used]
        assert len(chosen_pos) == want_pos and len(chosen_neg) == want_neg, f"seed {seed}: quota broken"
        assert positive[chosen_pos].all() and negative[chosen_neg].all(), f"seed {seed}: picked outside its pool"
        picked[row, chosen_pos] = True
        picked[row, chosen_neg] = True
    assert picked.sum(1).tolist() == [want_pos + want_neg] * len(seeds), "a candidate was picked twice"
    return picked


def pool_masks():
    positive = np.zeros(NUM_CANDIDATES, bool)
    negative = np.zeros(NUM_CANDIDATES, bool)
    positive[POSITIVES] = True
    negative[NEGATIVES] = True
    return positive, negative


@pytest.fixture(scope="module")
def draws():
    """Picks over SEEDS steps: stage 2 for images 0 and 1, stage 1 for image 0."""
    positive, negative = pool_masks()
    seeds = range(SEEDS)
    rcnn, rpn = SamplerNet(RCNN_STREAM), SamplerNet(RPN_STREAM)
    return {"rcnn_image0": draw(rcnn, positive, negative, 0, seeds),
            "rcnn_image1": draw(rcnn, positive, negative, 1, seeds),
            "rpn_image0": draw(rpn, positive, negative, 0, seeds)}


# ---------------------------------------------------------------- statistics

def bound(df):
    return stats.chi2.ppf(1.0 - ALPHA, df)


def frequency_statistic(picked, pool, k):
    """Chi-square (df m - 1) of the pick counts of the m pool members against S k / m.

    A draw's indicators have variance p (1 - p) and covariance -p (1 - p) / (m - 1) (fixed total), so the
    standardised sum of squares times (m - 1) / m is chi-square with m - 1 degrees of freedom.
    """
    m, s = len(pool), picked.shape[0]
    p = k / m
    counts = picked[:, pool].sum(0)
    return (m - 1) / m * np.sum((counts - s * p) ** 2) / (s * p * (1 - p)), m - 1


def pair_statistic(picked, pool, k, offset=1):
    """Chi-square (df = number of pairs) of how often ids i and i + offset of a pool are picked together."""
    m, s = len(pool), picked.shape[0]
    q = k * (k - 1) / (m * (m - 1))
    first, second = pool[:-offset], pool[offset:]
    together = np.sum(picked[:, first] & picked[:, second], axis=0)
    return np.sum((together - s * q) ** 2) / (s * q * (1 - q)), len(first)


def coincidence_statistic(a, b, pool, k):
    """Chi-square (df m) of how often a candidate is picked by both of two supposedly independent draws."""
    m, s = len(pool), a.shape[0]
    p2 = (k / m) ** 2
    both = np.sum(a[:, pool] & b[:, pool], axis=0)
    return np.sum((both - s * p2) ** 2) / (s * p2 * (1 - p2)), m


POOLS = {"positives": (POSITIVES, NUM_POS), "negatives": (NEGATIVES, NUM_TOTAL - NUM_POS)}


# ---------------------------------------------------------------- the sampler

@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("stream", ["rcnn_image0", "rcnn_image1", "rpn_image0"])
def test_every_candidate_is_picked_k_over_m_of_the_time(draws, pool, stream):
    members, k = POOLS[pool]
    statistic, df = frequency_statistic(draws[stream], members, k)
    assert statistic < bound(df), f"{stream} {pool}: chi2 {statistic:.1f} >= {bound(df):.1f} (df {df})"


@pytest.mark.parametrize("offset", [1, 2, 8])
@pytest.mark.parametrize("pool", sorted(POOLS))
def test_nearby_ids_are_picked_together_as_often_as_any_pair(draws, pool, offset):
    members, k = POOLS[pool]
    statistic, df = pair_statistic(draws["rcnn_image0"], members, k, offset)
    assert statistic < bound(df), f"{pool}, ids {offset} apart: chi2 {statistic:.1f} >= {bound(df):.1f}"


@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("other", ["other image", "other stage", "next step"])
def test_draws_are_independent_across_images_stages_and_steps(draws, pool, other):
    members, k = POOLS[pool]
    base = draws["rcnn_image0"]
    a, b = {"other image": (base, draws["rcnn_image1"]), "other stage": (base, draws["rpn_image0"]),
            "next step": (base[:-1], base[1:])}[other]
    statistic, df = coincidence_statistic(a, b, members, k)
    assert statistic < bound(df), f"{other}, {pool}: chi2 {statistic:.1f} >= {bound(df):.1f} (df {df})"


def test_keys_are_uniform_and_uncorrelated_between_neighbours():
    """The keys themselves, (SEEDS, N) from one batched call: uniform in 64 bins, and the correlation of the
    keys of ids i and i + 1 over the seeds is that of independent draws (each r * sqrt(S) ~ N(0, 1))."""
    ids = ms.Tensor(np.arange(NUM_CANDIDATES, dtype=np.int64))
    keys = random_keys(ms.Tensor(np.arange(SEEDS, dtype=np.int32)[:, None]), 0, RCNN_STREAM, ids).asnumpy()
    assert keys.shape == (SEEDS, NUM_CANDIDATES) and keys.min() >= 0.0 and keys.max() < 1.0
    counts = np.histogram(keys, bins=64, range=(0.0, 1.0))[0]
    assert stats.chisquare(counts).pvalue > ALPHA
    centred = (keys - 0.5) / keys.std()
    r = np.mean(centred[:, :-1] * centred[:, 1:], axis=0)
    statistic = np.sum(r ** 2) * SEEDS
    assert statistic < bound(NUM_CANDIDATES - 1)


def test_scarce_pools_give_what_they_have():
    """3 positives (quota 8) and 10 negatives: all 3, then all 10 negatives (not the 29 the rows allow)."""
    positive = np.zeros(NUM_CANDIDATES, bool)
    negative = np.zeros(NUM_CANDIDATES, bool)
    positive[[5, 77, 190]] = True
    negative[100:110] = True
    picked = draw(SamplerNet(RCNN_STREAM), positive, negative, 0, range(5))
    assert np.array_equal(picked, np.broadcast_to(positive | negative, picked.shape))


# ---------------------------------------------------------------- the statistics catch flawed samplers

def _topk_picks(keys, members, k):
    """(S, N) bool: the k members with the largest keys, per row."""
    order = np.argsort(-keys[:, members], axis=1, kind="stable")[:, :k]
    picked = np.zeros(keys.shape, bool)
    np.put_along_axis(picked, members[order], True, axis=1)
    return picked


def test_statistics_reject_flawed_samplers():
    rng = np.random.default_rng(0)
    members, k = NEGATIVES, NUM_TOTAL - NUM_POS
    uniform = rng.random((SEEDS, NUM_CANDIDATES))
    fair = _topk_picks(uniform, members, k)
    assert frequency_statistic(fair, members, k)[0] < bound(len(members) - 1)

    # low ids favoured (keys raised by up to 10 %)
    tilted = _topk_picks(uniform + 0.1 * (1.0 - np.arange(NUM_CANDIDATES) / NUM_CANDIDATES), members, k)
    statistic, df = frequency_statistic(tilted, members, k)
    assert statistic > bound(df)
    # pairs of ids (2j, 2j + 1) with correlated keys, as a weak hash of id XOR state could give
    paired = uniform.copy()
    paired[:, 1::2] = 0.5 * paired[:, 1::2] + 0.5 * paired[:, 0::2]
    statistic, df = pair_statistic(_topk_picks(paired, members, k), members, k)
    assert statistic > bound(df)
    # the other image (or stage, or step) drawing partly the same keys
    shared = np.where(rng.random(uniform.shape) < 0.2, uniform, rng.random(uniform.shape))
    statistic, df = coincidence_statistic(fair, _topk_picks(shared, members, k), members, k)
    assert statistic > bound(df)
