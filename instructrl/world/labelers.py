"""Simulated labelers and the gold judge for the synthetic instruction world.

A labeler perceives a response as gold score + its own length preference + Gaussian noise
and ranks by perception. The noise is drawn once per distinct (text, stopped) response
in a ranking, so identical responses always tie, as they would for a person. Labelers
differ in noise scale and in length preference (some like longer answers, some shorter),
fixed by the pool's seed. The default noise makes two labelers agree on ~73% of response
pairs (the paper's 72.6 +- 1.5%) for the mix `tasks.synthetic_responses` produces; the
agreement depends on how different the responses are, so re-fit the noise with
`calibrate_noise` on real policy samples when they are available.

The gold judge is noise-free: it compares gold scores (ties count 1/2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from instructrl.world import families

PAPER_AGREEMENT = 0.726
# Fitted with calibrate_noise on 3,000 prompts x 4..9 tasks.synthetic_responses (data seed 1);
# tests/unit/test_world_labelers.py measures 0.72-0.74 agreement on fresh samples.
DEFAULT_NOISE = 0.28
_LENGTH_CAP = 30  # words; longer responses get no further length bonus/penalty


@dataclasses.dataclass(frozen=True)
class LabelerPool:
    """num_labelers labelers; labeler l has noise std noise * m_l (m_l uniform in
    1 +- noise_spread) and adds length_bias * z_l per 10 words of response (z_l ~ N(0, 1))."""

    num_labelers: int = 8
    noise: float = DEFAULT_NOISE
    length_bias: float = 0.03
    noise_spread: float = 0.25
    seed: int = 0

    def __post_init__(self):
        if self.num_labelers < 2:
            raise ValueError(f"LabelerPool.num_labelers={self.num_labelers}: need at least 2")
        if self.noise < 0 or self.length_bias < 0 or not 0 <= self.noise_spread < 1:
            raise ValueError(f"LabelerPool: bad noise/length_bias/noise_spread in {self}")

    def traits(self) -> tuple[np.ndarray, np.ndarray]:
        """(noise std [L], length bias per 10 words [L]); depends on seed, not on noise."""
        rng = np.random.default_rng([self.seed, 7])
        scale = rng.uniform(1 - self.noise_spread, 1 + self.noise_spread, self.num_labelers)
        bias = rng.standard_normal(self.num_labelers)
        return self.noise * scale, self.length_bias * bias

    def perceived_scores(
        self,
        record: dict,
        responses: Sequence[str],
        stopped: Sequence[bool] | None,
        labeler: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Labeler `labeler`'s perceived quality of each response: float64 [K]."""
        gold, lengths, inverse = _unique_items(record, responses, stopped)
        return self._perceive(gold, lengths, labeler, rng)[inverse]

    def _perceive(self, gold, lengths, labeler, rng) -> np.ndarray:
        """gold, lengths [U] over distinct responses -> perceived [U] (draws U normals)."""
        return _perceived(gold, lengths, labeler, self.traits(), rng)

    def rank(
        self,
        record: dict,
        responses: Sequence[str],
        stopped: Sequence[bool] | None,
        rng: np.random.Generator,
        labeler: int | None = None,
    ) -> tuple[list[int], list[list[int]]]:
        """(ranking best first, tie groups best first); labeler None -> drawn from rng.

        The ranking is a permutation of range(K): the tie groups concatenated, each group
        (responses with exactly equal perceived scores) in index order.
        """
        if labeler is None:
            labeler = int(rng.integers(self.num_labelers))
        if not 0 <= labeler < self.num_labelers:
            raise ValueError(f"labeler {labeler} not in [0, {self.num_labelers})")
        return _tie_groups(self.perceived_scores(record, responses, stopped, labeler, rng))


def _perceived(gold, lengths, labeler: int, traits, rng) -> np.ndarray:
    """LabelerPool._perceive with the pool's traits (noise std [L], length bias [L]) given."""
    sigma, bias = traits
    z = rng.standard_normal(len(gold))
    return gold + bias[labeler] * lengths / 10.0 + sigma[labeler] * z


def _stopped(responses: Sequence[str], stopped: Sequence[bool] | None) -> list[bool]:
    if stopped is None:
        return [True] * len(responses)
    if len(stopped) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(stopped)} stopped flags")
    return [bool(s) for s in stopped]


def _unique_items(record, responses, stopped):
    """Gold score and length [U] of the distinct (text, stopped) responses; inverse [K]."""
    keys = list(zip(responses, _stopped(responses, stopped), strict=True))
    uniq = list(dict.fromkeys(keys))
    gold = np.array([families.score(record, r, s) for r, s in uniq], dtype=np.float64)
    lengths = np.array([min(len(r.split()), _LENGTH_CAP) for r, _ in uniq], dtype=np.float64)
    index = {k: i for i, k in enumerate(uniq)}
    return gold, lengths, np.array([index[k] for k in keys], dtype=np.int64)


def _tie_groups(scores: np.ndarray) -> tuple[list[int], list[list[int]]]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and scores[groups[-1][0]] == scores[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return order, groups


# ---------------------------------------------------------------- agreement and calibration
def _agreement(pool: LabelerPool, items: list[tuple[np.ndarray, np.ndarray]], rng) -> float:
    """Mean over pairs of distinct responses of: 1 if two random labelers order them the same
    way, 1/2 if exactly one of them ties them, 0 if they disagree."""
    total, count = 0.0, 0
    traits = pool.traits()  # once: calibration calls this ~40 times over every prompt
    pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # K -> its upper-triangle pairs
    for gold, lengths in items:
        if len(gold) < 2:
            continue
        l1, l2 = (int(x) for x in rng.choice(pool.num_labelers, size=2, replace=False))
        s1 = _perceived(gold, lengths, l1, traits, rng)
        s2 = _perceived(gold, lengths, l2, traits, rng)
        if len(gold) not in pairs:
            pairs[len(gold)] = np.triu_indices(len(gold), k=1)
        i, j = pairs[len(gold)]
        a, b = np.sign(s1[i] - s1[j]), np.sign(s2[i] - s2[j])
        # halves and ones: every partial sum is exact, whatever the order
        total += float(np.count_nonzero(a == b)) + 0.5 * float(
            np.count_nonzero((a != b) & (a * b == 0))
        )
        count += len(a)
    if count == 0:
        raise ValueError("no prompt has two distinct responses to compare")
    return total / count


def _items(prompts, responses_lists, stopped_lists):
    if len(prompts) != len(responses_lists):
        raise ValueError(f"{len(prompts)} prompts but {len(responses_lists)} response lists")
    stopped_lists = stopped_lists or [None] * len(prompts)
    return [
        _unique_items(p, rs, st)[:2]
        for p, rs, st in zip(prompts, responses_lists, stopped_lists, strict=True)
    ]


def pairwise_agreement(
    pool: LabelerPool,
    prompts: Sequence[dict],
    responses_lists: Sequence[Sequence[str]],
    rng: np.random.Generator,
    stopped_lists: Sequence[Sequence[bool]] | None = None,
) -> float:
    """Measured inter-labeler agreement: for each prompt two different labelers (drawn from
    rng) rank its responses; returns the fraction of pairs of distinct responses they order
    the same way (a pair one of them ties counts 1/2)."""
    return _agreement(pool, _items(prompts, responses_lists, stopped_lists), rng)


def calibrate_noise(
    pool: LabelerPool,
    prompts: Sequence[dict],
    responses_lists: Sequence[Sequence[str]],
    stopped_lists: Sequence[Sequence[bool]] | None = None,
    target: float = PAPER_AGREEMENT,
    seed: int = 0,
    iters: int = 40,
) -> float:
    """The noise scale at which pairwise_agreement on these responses equals `target`.

    Bisection on log(noise); every evaluation reuses the same random draws (seed), so the
    measured agreement is a nearly monotone function of the noise. Use the returned value
    as LabelerPool(noise=...); the pool's other traits are kept.
    """
    items = _items(prompts, responses_lists, stopped_lists)

    def agreement(noise: float) -> float:
        return _agreement(
            dataclasses.replace(pool, noise=noise), items, np.random.default_rng(seed)
        )

    lo, hi = 1e-4, 10.0
    a_lo, a_hi = agreement(lo), agreement(hi)
    if not a_hi <= target <= a_lo:
        raise ValueError(
            f"calibrate_noise: target agreement {target} outside [{a_hi:.3f}, {a_lo:.3f}] "
            "reachable on these responses (too few distinct responses, or length_bias too large)"
        )
    for _ in range(iters):
        mid = float(np.sqrt(lo * hi))
        if agreement(mid) > target:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


# ---------------------------------------------------------------- comparisons, gold judge
def collect_comparisons(
    prompts: Sequence[dict],
    responses_per_prompt: Sequence[Sequence[str]],
    stopped: Sequence[Sequence[bool]] | None,
    pool: LabelerPool,
    rng: np.random.Generator,
    response_ids: Sequence[Sequence[Sequence[int]]] | None = None,
) -> list[dict]:
    """Comparison records {"prompt", "responses", "ranking", "labeler", ["stopped"],
    ["response_ids"], <prompt extras>}.

    Each prompt goes to a labeler drawn from rng. Identical responses (same text and stop)
    collapse to their first copy; distinct responses the labeler cannot separate (equal
    perceived scores: only with noise 0, e.g. the noise-free labelers) form a tie group,
    written as "ties" (the RM drops tied pairs, as the paper, and keeps their other pairs).
    Prompts left without two separable responses produce no record. "ranking" indexes the
    kept "responses" (in their original order), best first. "stopped" (when given): whether
    each kept response ended with the stop token, so that the record alone gives its gold
    scores (`world.score(record, response, stopped)`). "response_ids" (when given): the
    token ids each kept response was sampled as, so the RM trains on the tokens it will score.
    """
    if len(prompts) != len(responses_per_prompt):
        raise ValueError(f"{len(prompts)} prompts but {len(responses_per_prompt)} response lists")
    stopped = stopped or [None] * len(prompts)
    response_ids = response_ids or [None] * len(prompts)
    records = []
    rows = zip(prompts, responses_per_prompt, stopped, response_ids, strict=True)
    for record, responses, st, ids in rows:
        labeler = int(rng.integers(pool.num_labelers))
        _, groups = pool.rank(record, responses, st, rng, labeler=labeler)
        keys = list(zip(responses, _stopped(responses, st), strict=True))
        firsts = {keys.index(key) for key in keys}  # identical responses: the first copy
        groups = [[i for i in g if i in firsts] for g in groups]
        if len(groups) < 2:  # one distinct response, or all tied: no pair to learn from
            continue
        kept = sorted(firsts)
        position = {i: j for j, i in enumerate(kept)}
        extras = {k: v for k, v in record.items() if k != "prompt"}
        ties = [[position[i] for i in g] for g in groups if len(g) > 1]
        if ties:
            extras["ties"] = ties
        if st is not None:
            extras["stopped"] = [bool(st[i]) for i in kept]
        if ids is not None:
            extras["response_ids"] = [[int(x) for x in ids[i]] for i in kept]
        records.append(
            {
                "prompt": record["prompt"],
                "responses": [responses[i] for i in kept],
                "ranking": [position[i] for g in groups for i in g],
                "labeler": labeler,
                **extras,
            }
        )
    return records


def gold_compare(
    prompt_record: dict,
    response_a: str,
    response_b: str,
    stopped_a: bool = True,
    stopped_b: bool = True,
) -> float:
    """1 if the gold judge prefers a, 0 if b, 1/2 if their gold scores are equal."""
    sa = families.score(prompt_record, response_a, stopped_a)
    sb = families.score(prompt_record, response_b, stopped_b)
    return 1.0 if sa > sb else 0.0 if sa < sb else 0.5


def win_rate_with_stderr(results: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-prompt outcomes in {0, 1/2, 1}.

    The standard error uses the sample std (ddof=1); it is nan for a single result.
    """
    x = np.asarray(results, dtype=np.float64)
    if x.size == 0:
        raise ValueError("win_rate_with_stderr: no results")
    stderr = float(np.std(x, ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), stderr
