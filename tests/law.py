"""A goodness-of-fit test over the whole output law, with a reference independent of the project's sampling code.

Terms:
- *law*: the distribution of the next token given everything before it, after temperature, top-k and top-p.
- *reference law*: the law computed from one teacher-forced forward pass of the plain transformers model over
  prompt + generated tokens, with transformers' own warpers (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
  `TopPLogitsWarper`, in that order, the order `generate()` applies them). Nothing of `picospec.shared.sampling`
  is used. Conventions match ours: ties at the k-th logit are kept by both; top-p keeps a token while the mass
  strictly above it is below top_p, as transformers' ascending `cumsum <= 1 - top_p` removal does. A token one
  side keeps and the other drops fails the support check below.
- *PIT value*: for a generated token x at a position with reference law p, the tokens are ranked in an order
  fixed before x is drawn (descending, ties by id) and u = P(tokens ranked before x) + V * p(x), V ~ U(0, 1)
  drawn by the test. If every token is drawn from its reference law, the u of a generation are independent
  U(0, 1) (each is uniform given everything before it), whatever the prompt, the position or the timing. So all
  tokens of all generations of a test pool into one sample: no cells over tokens, nothing pooled.
- Six statistics over that sample (LawCheck): the PIT ranked by p, by q/p (q the draft's law), with the previous
  token first, by token id, and by a random permutation of the vocabulary drawn per test, each by
  Kolmogorov-Smirnov against U(0, 1), and consecutive pairs against independence. One ranking alone is blind to
  mass moved between tokens it ranks alike: a residual that ignores q moves mass towards the tokens the draft
  over-proposes, which the ranking by p barely sees and the ranking by q/p sees at once; randomness reused across
  positions leaves each u uniform given the position's law but repeats tokens, which the repeat ranking and the
  pairs see; a coin that already decided something else (reused across streams) is biased, and `sample_from` draws
  in token-id order, so the draw it makes is shifted along the ids, which only the ranking by id sees (the ranking
  by p mixes ids). The random permutation covers an axis nobody thought of, differently in every test.
- *support check*: a token whose reference probability is 0 fails the test at once, named with its position.

False alarm: ALPHA per test (ALPHA / STATISTICS per statistic) over the choice of seeds; seeds are fixed, so a run is
deterministic where the tokens are a function of the seeds alone: every coin is keyed by its position, so they are in
stop-and-wait with fixed lengths and in coupled everywhere, but not where a bonus token's position depends on
timing (dense and split in the pipeline, lengths chosen online from measured times, passes the verification budget
cuts by measured cost). Those tests draw fresh tokens every run and test at ALPHA_TIMED instead: with TIMED_TESTS
of them the chance of a false law failure is TIMED_TESTS x ALPHA_TIMED = 0.092% per full run. Power: for the family F_D(t) = t + 4D t(1 - t) of PIT laws (mass D moved to one end of the
ranking, the PIT CDF off by D at its median), each KS statistic catches D >= detectable_shift(n) =
(c + 1.2816 * 0.5) / sqrt(n) at 90% (asymptotic; c its critical value); the pair statistic catches a Gaussian-
copula correlation of PAIR_RHO_90 between neighbours at 90% with 2,000 values. Both checked by simulation in
tests/test_law.py, with bugs of realistic shapes.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

ALPHA = 1e-3  # per test; each of its STATISTICS statistics runs at ALPHA / STATISTICS (Bonferroni)
ALPHA_TIMED = 4e-5  # per test whose tokens depend on timing: a fresh sample every run
TIMED_TESTS = 23  # of them: 14 in tests/test_law_tiny.py, 5 in tests/test_llama_cpp.py, 4 in tests/test_law_models.py
# (tests/test_law.py counts them)
EVENTS = ("first", "bonus", "correction", "after_rejection")  # tokens tested apart too (LawCheck.events)
STATISTICS = 6 + 2 * len(EVENTS)
PAIR_BINS = 4
MIN_EVENT_TOKENS = 20  # an event with fewer tokens is not tested apart (it still counts among all tokens)
PAIR_RHO_90 = 0.25  # measured with 1,000 pairs: 93% at 0.25, 52% at 0.2 (tests/test_law.py)
Z_90 = 1.2816  # the 90th percentile of N(0, 1); the Brownian bridge's sd at the median is 0.5


def detectable_shift(n: int, alpha: float = ALPHA) -> float:
    """The PIT CDF deviation (at its median) that n PIT values detect with probability 0.9 at alpha / STATISTICS."""
    return (critical_value(alpha) + Z_90 * 0.5) / math.sqrt(n)


def critical_value(alpha: float) -> float:
    """The KS critical value of sqrt(n) * D_n at alpha / STATISTICS (Kolmogorov's limit law)."""
    return math.sqrt(-math.log(alpha / STATISTICS / 2) / 2)


@dataclass(frozen=True)
class Warping:
    temperature: float
    top_k: int = 0
    top_p: float = 1.0

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList([TemperatureLogitsWarper(self.temperature)])
        if self.top_k:
            procs.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            procs.append(TopPLogitsWarper(self.top_p))
        return procs

    def edge_kwargs(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


T1 = Warping(1.0)
T07_TOPK_TOPP = Warping(0.7, top_k=20, top_p=0.9)


def reference_laws(model: torch.nn.Module, prompt_ids: list[int], generated: list[int],
                   warping: Warping) -> torch.Tensor:
    """The reference law at every generated position: [G, V] float64, one teacher-forced forward pass."""
    seq = torch.tensor([list(prompt_ids) + list(generated)])                  # [1, P + G]
    with torch.inference_mode():
        logits = model(seq).logits[0, len(prompt_ids) - 1: -1].float()       # [G, V]
        # these three warpers never read input_ids; float32, as generate() would run them on this model
        no_ids = torch.zeros(len(generated), 1, dtype=torch.long)             # [G, 1]
        warped = warping.processors()(no_ids, logits)                         # [G, V], -inf where cut
    return torch.softmax(warped.double(), dim=-1)


def pit_values(laws: torch.Tensor, tokens: list[int], rng: np.random.Generator,
               scores: torch.Tensor | None = None) -> np.ndarray:
    """Randomized PIT of each token under its law, tokens ranked by `scores` (default: the law itself),
    descending, ties by id: [G]. Any ranking fixed before the token is drawn keeps the PIT uniform."""
    scores = laws if scores is None else scores                               # [G, V]
    tok = torch.tensor(tokens)                                                # [G]
    p_x = laws.gather(1, tok[:, None])                                        # [G, 1]
    s_x = scores.gather(1, tok[:, None])                                      # [G, 1]
    ids = torch.arange(laws.shape[1])[None]                                   # [1, V]
    before = (scores > s_x) | ((scores == s_x) & (ids < tok[:, None]))        # [G, V]
    mass_before = (laws * before).sum(1).numpy()                              # [G]
    return mass_before + rng.uniform(size=len(tokens)) * p_x[:, 0].numpy()


def pair_chisquare(pairs: np.ndarray, bins: int = PAIR_BINS) -> float:
    """Chi-square p-value of PIT pairs [N, 2] against independence and uniformity on a bins x bins grid."""
    cells = np.minimum((pairs * bins).astype(int), bins - 1)                 # [N, 2]
    counts = np.bincount(cells[:, 0] * bins + cells[:, 1], minlength=bins * bins)
    return float(stats.chisquare(counts).pvalue)


def _by_id(laws: torch.Tensor) -> torch.Tensor:
    """A ranking by token id, smallest first: [G, V]."""
    return -torch.arange(laws.shape[1], dtype=torch.float64).expand_as(laws)


def _is_event(event: str, kinds: list[str], i: int) -> bool:
    if event == "first":
        return i == 0
    if event == "after_rejection":
        return i > 0 and kinds[i - 1] == "correction"
    return kinds[i] == event


@dataclass
class LawCheck:
    """Collects whole generations and tests them as one sample with STATISTICS statistics, each at ALPHA / 6:
    - `by_p`: KS of the PIT ranked by the target's law (mass moved between likelier and less likely tokens);
    - `by_ratio`: KS of the PIT ranked by q/p, q the `ranking` model's law under the same warping (mass moved
      towards or away from the tokens the draft over-proposes: the direction verification bugs take);
    - `by_repeat`: KS of the PIT with the previous token ranked first, then by p (a token repeated more or less
      often than the law says, as when one position's random draw is reused at the next);
    - `by_id`: KS of the PIT ranked by token id, smallest first (a draw by inverse CDF in id order made with a
      biased coin, e.g. one that already decided an acceptance);
    - `by_permutation`: KS of the PIT ranked by a random permutation of the vocabulary, fresh per test (seeded by
      the test's name: deterministic, and a different axis in every test);
    - `pairs`: chi-square of non-overlapping consecutive `by_p` pairs of one generation on a 4 x 4 grid
      (tokens that depend on each other beyond the law, e.g. randomness reused across positions);
    - per event (EVENTS), where `add` is told what made each token (GenerationStats.token_kinds): the PIT by p and
      by id of those tokens alone (each generation's first token; the cloud's bonus tokens; the token after a
      correction: each drawn from p given what came before; and corrections, drawn from the residual
      norm(max(0, p - q)), tested under it where `residual_corrections`), so that a bug in one event is not
      diluted among all tokens."""
    model: torch.nn.Module = field(repr=False)
    warping: Warping
    ranking: torch.nn.Module | None = field(default=None, repr=False)
    seed: int = 0
    residual_corrections: bool = False  # corrections are drawn from norm(max(0, p - q)) (dense, split-exact)
    alpha: float = ALPHA  # the false-alarm rate of the whole test (ALPHA_TIMED where its tokens depend on timing)
    by_p: list[float] = field(default_factory=list, repr=False)
    by_ratio: list[float] = field(default_factory=list, repr=False)
    by_repeat: list[float] = field(default_factory=list, repr=False)
    by_id: list[float] = field(default_factory=list, repr=False)
    by_permutation: list[float] = field(default_factory=list, repr=False)
    pairs: list[tuple[float, float]] = field(default_factory=list, repr=False)
    events: dict[str, tuple[list[float], list[float]]] = field(
        default_factory=lambda: {e: ([], []) for e in EVENTS}, repr=False)  # event -> (PIT by p, PIT by id)
    outside_support: list[str] = field(default_factory=list)
    rng: np.random.Generator = field(init=False, repr=False)
    _permutation: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def add(self, prompt_ids: list[int], generated: list[int], kinds: list[str] | None = None) -> None:
        """One generation; `kinds`: what made each token (GenerationStats.token_kinds), for the per-event tests."""
        if not generated:
            return
        laws = reference_laws(self.model, prompt_ids, generated, self.warping)        # [G, V]
        zero = (laws.gather(1, torch.tensor(generated)[:, None])[:, 0] <= 0).nonzero().flatten().tolist()
        self.outside_support += [f"token {generated[i]} at generated position {i} of {generated}" for i in zero]
        q = None if self.ranking is None else reference_laws(self.ranking, prompt_ids, generated, self.warping)
        u = pit_values(laws, generated, self.rng)
        self.by_p += u.tolist()
        self.pairs += list(zip(u[0:-1:2].tolist(), u[1::2].tolist()))
        self.by_ratio += pit_values(laws, generated, self.rng, self._ratio(laws, q)).tolist()
        previous = torch.tensor([prompt_ids[-1], *generated[:-1]])                        # [G]
        repeat_first = laws + 2.0 * torch.nn.functional.one_hot(previous, laws.shape[1])  # [G, V]
        self.by_repeat += pit_values(laws, generated, self.rng, repeat_first).tolist()
        self.by_id += pit_values(laws, generated, self.rng, _by_id(laws)).tolist()
        self.by_permutation += pit_values(laws, generated, self.rng, self._shuffled(laws)).tolist()
        if kinds is not None:
            self._add_events(kinds, generated, laws, q)

    def _shuffled(self, laws: torch.Tensor) -> torch.Tensor:
        """A ranking by a permutation of the vocabulary fixed per test (seeded by its name): [G, V]."""
        vocab = laws.shape[1]
        if self._permutation is None or len(self._permutation) != vocab:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            rng = np.random.default_rng([self.seed, zlib.crc32(test.encode())])
            self._permutation = torch.from_numpy(rng.permutation(vocab))
        return self._permutation.double().expand_as(laws)

    def _add_events(self, kinds: list[str], generated: list[int], laws: torch.Tensor, q: torch.Tensor | None) -> None:
        """The PITs of each event's tokens under the law each was drawn from: p, except a correction, drawn from the
        residual norm(max(0, p - q)) (dense, split-exact: `residual_corrections`; q the draft's law, `ranking`)."""
        assert len(kinds) == len(generated), f"{len(kinds)} token kinds for {len(generated)} tokens"
        for event in EVENTS:
            rows = [i for i in range(len(kinds)) if _is_event(event, kinds, i)]
            if not rows or (event == "correction" and not (self.residual_corrections and q is not None)):
                continue
            idx = torch.tensor(rows)
            law = laws[idx]                                                                  # [R, V]
            if event == "correction":
                law = torch.clamp(laws[idx] - q[idx], min=0.0)
                law = law / law.sum(1, keepdim=True).clamp(min=1e-300)
            tokens = [generated[i] for i in rows]
            by_p, by_id = self.events[event]
            by_p += pit_values(law, tokens, self.rng).tolist()
            by_id += pit_values(law, tokens, self.rng, _by_id(law)).tolist()

    def event_counts(self) -> dict[str, int]:
        return {e: len(by_p) for e, (by_p, _) in self.events.items()}

    def _ratio(self, laws: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """log q - log p (descending ranks first the tokens the draft over-proposes); without a ranking model, a
        random ranking drawn before looking at the tokens."""
        if q is None:
            return torch.from_numpy(self.rng.uniform(size=tuple(laws.shape)))
        return torch.log(q + 1e-300) - torch.log(laws + 1e-300)

    def pvalues(self) -> dict[str, float]:
        return {"by_p": float(stats.kstest(self.by_p, "uniform").pvalue),
                "by_ratio": float(stats.kstest(self.by_ratio, "uniform").pvalue),
                "by_repeat": float(stats.kstest(self.by_repeat, "uniform").pvalue),
                "by_id": float(stats.kstest(self.by_id, "uniform").pvalue),
                "by_permutation": float(stats.kstest(self.by_permutation, "uniform").pvalue),
                "pairs": pair_chisquare(np.array(self.pairs)),
                **{f"{e}_{axis}": float(stats.kstest(us, "uniform").pvalue) if len(us) >= MIN_EVENT_TOKENS else 1.0
                   for e, pits in self.events.items() for axis, us in zip(("by_p", "by_id"), pits)}}

    def assert_matches(self, what: str) -> None:
        n = len(self.by_p)
        assert not self.outside_support, f"{what}: tokens the target never produces: {self.outside_support[:5]}"
        ps = self.pvalues()
        assert min(ps.values()) > self.alpha / STATISTICS, (
            f"{what} deviates from the target's law over {n} tokens: "
            + ", ".join(f"{k} p={v:.2e}" for k, v in ps.items())
            + f" (each at {self.alpha / STATISTICS:.1e}; a PIT shift of {detectable_shift(n, self.alpha):.3f} is "
            + "caught at 90%; "
            + f"tokens per event {self.event_counts()})")
