"""Judge ensembles: from votes to labels, when to stop asking, how much judges agree, and
what to relabel. Pure: no Ray, no LLM client, no files; plain rows in, plain rows out.

A **vote** is one answer of one judge about one (query, document) pair ("task"): a row with
``task``, ``judge``, ``sample`` and ``verdict`` (True = relevant; None = the answer did not
parse). A judge that samples k times (self-consistency) casts one **judge vote** per task: the
majority of its valid samples (a tie abstains). Judge votes are what the aggregation methods of
`crowd-kit <https://github.com/Toloka/crowd-kit>`_ see: majority vote, Wawa, Dawid–Skene,
one-coin Dawid–Skene, GLAD and MACE::

    votes = [{"task": "q1\\x1fd1", "judge": "a", "sample": 0, "verdict": True}, ...]
    agg = aggregate(votes, method="dawid_skene")
    agg.pairs.loc["q1\\x1fd1", "posterior"]      # P(relevant), the soft label
    agg.judges.loc["a", "accuracy"]              # estimated accuracy of judge a
    model = JudgeModel.from_aggregate(agg)        # sensitivity/specificity per judge + prior

**Adaptive stopping** (:class:`PairVotes`, :func:`stop_reason`): judges are asked cheapest
first, round by round (every judge's first sample, then second samples, ...); a judge stops
sampling once its majority is fixed, and the pair stops once the outcome cannot change with the
votes left, or once it is confident enough: under a :class:`JudgeModel` fitted on a fully
labelled calibration slice (each judge's sensitivity, specificity and sample consistency), the
probability that asking every remaining sample of every judge would leave the pair's label
unchanged reaches a confidence; or at a cap on votes. An expensive judge late in the order is
therefore asked only where the cheap ones disagree or are unsure (a cascade).

**Agreement**: Cohen's κ per judge pair (scikit-learn), Fleiss' κ (statsmodels) and
Krippendorff's α (crowd-kit), with warnings for near-duplicate and at-or-below-chance judges.

**Relabeling** (:func:`relabel`): mined negatives the ensemble calls relevant become positives
(or are dropped), positives it calls irrelevant are dropped, a teacher's score stays a
distillation target only where teacher and ensemble agree, and pairs the ensemble is unsure
about are rejected; every decision carries its reason and posterior.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

METHODS = ("majority_vote", "wawa", "dawid_skene", "one_coin_dawid_skene", "glad", "mace")
Method = Literal["majority_vote", "wawa", "dawid_skene", "one_coin_dawid_skene", "glad", "mace"]

TASK_SEP = "\x1f"  # ids never contain the ASCII unit separator


def task_id(query_id: str, doc_id: str) -> str:
    """The task key of a (query, document) pair."""
    return f"{query_id}{TASK_SEP}{doc_id}"


def split_task(task: str) -> tuple[str, str]:
    q, _, d = task.partition(TASK_SEP)
    return q, d


# -- votes -> judge votes -> crowd-kit input ------
def _frame(votes: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    df = votes if isinstance(votes, pd.DataFrame) else pd.DataFrame(list(votes))
    if df.empty:
        return pd.DataFrame(columns=["task", "judge", "sample", "verdict"])
    missing = {"task", "judge", "verdict"} - set(df.columns)
    if missing:
        raise ValueError(f"votes lack columns {sorted(missing)}")
    return df


def judge_votes(votes: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (task, judge) that cast a vote: ``label`` (1 relevant, 0 not) is the
    majority of the judge's valid samples; a tie, or no valid sample, abstains (no row).

    Columns: task, worker (the judge), label, samples (valid answers), yes (of them),
    consistency (share of samples that agree with the judge's own majority).
    """
    df = _frame(votes)
    cols = ["task", "worker", "label", "samples", "yes", "consistency"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    valid = df[df["verdict"].notna()]
    if valid.empty:
        return pd.DataFrame(columns=cols)
    g = valid.assign(v=valid["verdict"].astype(bool).astype(int)).groupby(
        ["task", "judge"], sort=True
    )["v"]
    out = pd.DataFrame({"yes": g.sum(), "samples": g.count()}).reset_index()
    out = out[2 * out["yes"] != out["samples"]]
    out = out.assign(
        label=(2 * out["yes"] > out["samples"]).astype(int),
        consistency=np.maximum(out["yes"], out["samples"] - out["yes"]) / out["samples"],
    ).rename(columns={"judge": "worker"})
    return out[cols].reset_index(drop=True)


def crowd_input(votes: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The ``task, worker, label`` frame crowd-kit's aggregators take (labels 0/1)."""
    return judge_votes(votes)[["task", "worker", "label"]]


# -- aggregation ------
@dataclass
class Aggregate:
    """What one aggregation method says about the pairs and the judges.

    ``pairs`` (index task): label (0/1), posterior (P(relevant)), confidence (of the leading
    answer), votes (valid samples), judges (judge votes), self_consistency (mean over judges
    with more than one sample of the share agreeing with their own majority; NaN if none),
    agreement (share of judge votes equal to the label), difficulty (GLAD's 1/β; NaN for other
    methods).
    ``judges`` (index judge): n (judge votes), accuracy, sensitivity (P(yes | relevant)),
    specificity (P(no | not relevant)), tp, fp, fn, tn — soft counts against the posteriors.
    """

    method: str
    pairs: pd.DataFrame
    judges: pd.DataFrame
    prior: float  # P(relevant) over the tasks


def _fit_proba(method: str, data: pd.DataFrame, n_iter: int, seed: int) -> tuple[pd.Series, Any]:
    """P(label = 1) per task from crowd-kit, and the fitted model."""
    from crowdkit import aggregation as ck

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "majority_vote":
            model: Any = ck.MajorityVote()
            proba = model.fit_predict_proba(data)
        elif method == "wawa":
            # Wawa = majority vote weighted by each worker's accuracy against the plain
            # majority; its own predict step fails under recent scikit-learn (a fitted-check
            # on a non-estimator), so its fitted skills go to crowd-kit's weighted vote.
            model = ck.Wawa().fit(data)
            proba = ck.MajorityVote().fit_predict_proba(data, skills=model.skills_)
        elif method == "dawid_skene":
            model = ck.DawidSkene(n_iter=n_iter)
            proba = model.fit_predict_proba(data)
        elif method == "one_coin_dawid_skene":
            model = ck.OneCoinDawidSkene(n_iter=n_iter)
            proba = model.fit_predict_proba(data)
        elif method == "glad":
            model = ck.GLAD(n_iter=n_iter, silent=True)
            proba = model.fit_predict_proba(data)
        elif method == "mace":
            # One restart: crowd-kit's MACE costs about 0.1 s per iteration whatever the size.
            model = ck.MACE(n_restarts=1, n_iter=n_iter, random_state=seed, verbose=0)
            proba = model.fit_predict_proba(data)
        else:
            raise ValueError(f"unknown aggregation method {method!r} (one of {', '.join(METHODS)})")
    p1 = proba[1] if 1 in proba.columns else pd.Series(0.0, index=proba.index)
    return p1.astype(float).clip(0.0, 1.0), model


def aggregate(
    votes: pd.DataFrame | Iterable[Mapping[str, Any]],
    method: Method | str = "dawid_skene",
    n_iter: int = 100,
    seed: int = 0,
) -> Aggregate:
    """Aggregate votes with one crowd-kit method; see :class:`Aggregate`."""
    jv = judge_votes(votes)
    df = _frame(votes)
    if jv.empty:
        empty_pairs = pd.DataFrame(
            columns=[
                "label",
                "posterior",
                "confidence",
                "votes",
                "judges",
                "self_consistency",
                "agreement",
                "difficulty",
            ]
        )
        return Aggregate(str(method), empty_pairs, _empty_judges(), float("nan"))
    data = jv[["task", "worker", "label"]]
    p1, model = _fit_proba(str(method), data, n_iter, seed)
    tasks = sorted(set(df["task"]))
    post = p1.reindex(tasks)
    label = (post > 0.5).astype("Int64")
    label[post.isna()] = pd.NA
    jv = jv.assign(post=jv["task"].map(p1))
    agree = (jv["label"] == (jv["post"] > 0.5).astype(int)).groupby(jv["task"]).mean()
    multi = jv[jv["samples"] > 1]
    valid = df[df["verdict"].notna()]
    pairs = pd.DataFrame(index=pd.Index(tasks, name="task"))
    pairs["label"] = label
    pairs["posterior"] = post
    pairs["confidence"] = np.maximum(post, 1.0 - post)
    pairs["votes"] = valid.groupby("task").size().reindex(tasks).fillna(0).astype(int)
    pairs["judges"] = jv.groupby("task").size().reindex(tasks).fillna(0).astype(int)
    pairs["self_consistency"] = multi.groupby("task")["consistency"].mean().reindex(tasks)
    pairs["agreement"] = agree.reindex(tasks)
    difficulty = pd.Series(np.nan, index=tasks)
    if str(method) == "glad" and getattr(model, "betas_", None) is not None:
        difficulty = (1.0 / model.betas_.astype(float)).reindex(tasks)
    pairs["difficulty"] = difficulty.to_numpy()
    return Aggregate(str(method), pairs, judge_confusion(jv, p1), float(p1.mean()))


def _empty_judges() -> pd.DataFrame:
    return pd.DataFrame(
        columns=["n", "accuracy", "sensitivity", "specificity", "tp", "fp", "fn", "tn"]
    ).rename_axis("judge")


def judge_confusion(jv: pd.DataFrame, p_relevant: pd.Series) -> pd.DataFrame:
    """Each judge's soft confusion counts against P(relevant) per task, and the accuracy,
    sensitivity and specificity they give (NaN where a class has no mass)."""
    if jv.empty:
        return _empty_judges()
    p = jv["task"].map(p_relevant).astype(float)
    yes = jv["label"] == 1
    frame = pd.DataFrame(
        {
            "judge": jv["worker"],
            "tp": np.where(yes, p, 0.0),
            "fp": np.where(yes, 1.0 - p, 0.0),
            "fn": np.where(~yes, p, 0.0),
            "tn": np.where(~yes, 1.0 - p, 0.0),
        }
    )
    out = frame.groupby("judge", sort=True).sum()
    out.insert(0, "n", frame.groupby("judge").size())
    pos = out["tp"] + out["fn"]
    neg = out["tn"] + out["fp"]
    out.insert(1, "accuracy", (out["tp"] + out["tn"]) / out["n"])
    out.insert(2, "sensitivity", (out["tp"] / pos).where(pos > 0))
    out.insert(3, "specificity", (out["tn"] / neg).where(neg > 0))
    return out


def accuracy_against(
    votes: pd.DataFrame | Iterable[Mapping[str, Any]], truth: Mapping[str, int | bool]
) -> pd.Series:
    """Each judge's accuracy (judge votes) against known labels, on the tasks it voted on."""
    jv = judge_votes(votes)
    jv = jv[jv["task"].isin(list(truth))]
    ok = jv["label"] == jv["task"].map(lambda t: int(bool(truth[t])))
    return ok.groupby(jv["worker"]).mean().rename_axis("judge")


# -- a fitted model of the judges, for stopping ------
@dataclass
class JudgeModel:
    """What the stopping rule knows about the judges: per judge the sensitivity and
    specificity of its judge vote (the majority of its samples, as the aggregation methods see
    it), the prior P(relevant), and, for judges that sample, the **consistency** of a sample:
    the chance that one sample repeats the judge's own belief about the pair (judges
    independent given the true label; samples independent given the judge's belief).

    With consistencies, :meth:`predict` tells how likely asking every remaining sample of
    every judge would change a pair's label; without, only judges whose vote is fixed count.
    """

    prior: float
    sensitivity: dict[str, float]
    specificity: dict[str, float]
    floor: float = 0.02  # no judge is trusted beyond 1 - floor (small calibration slices)
    consistency: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_aggregate(
        cls,
        agg: Aggregate,
        smoothing: float = 1.0,
        floor: float = 0.02,
        votes: pd.DataFrame | Iterable[Mapping[str, Any]] | None = None,
    ) -> JudgeModel:
        """Estimates with ``smoothing`` pseudo-counts per cell (Laplace), so that a judge
        seen on few pairs is not taken as perfect; with the ``votes`` the aggregate was fitted
        on, each sampling judge's consistency too (:func:`sample_consistency`)."""
        sens, spec = {}, {}
        for judge, r in agg.judges.iterrows():
            sens[str(judge)] = float((r["tp"] + smoothing) / (r["tp"] + r["fn"] + 2 * smoothing))
            spec[str(judge)] = float((r["tn"] + smoothing) / (r["tn"] + r["fp"] + 2 * smoothing))
        # the prior too: a small calibration slice that happens to be all relevant must not
        # make the prior alone settle later pairs
        n = float(len(agg.pairs))
        prior = agg.prior if math.isfinite(agg.prior) else 0.5
        prior = (prior * n + smoothing) / (n + 2 * smoothing)
        cons = sample_consistency(votes) if votes is not None else {}
        return cls(
            prior=float(prior), sensitivity=sens, specificity=spec, floor=floor, consistency=cons
        )

    def _clip(self, x: float) -> float:
        return min(1.0 - self.floor, max(self.floor, x))

    def llr(self, judge: str, vote: int | None) -> float:
        """log P(vote | relevant) / P(vote | not relevant); 0 for an abstention or a judge
        the model does not know."""
        if vote is None or judge not in self.sensitivity:
            return 0.0
        se = self._clip(self.sensitivity[judge])
        sp = self._clip(self.specificity[judge])
        if vote:
            return math.log(se / (1.0 - sp))
        return math.log((1.0 - se) / sp)

    def prior_log_odds(self) -> float:
        p = self._clip(self.prior)
        return math.log(p / (1.0 - p))

    def posterior(self, votes: Mapping[str, int | None]) -> float:
        """P(relevant | judge votes)."""
        return _sigmoid(self.prior_log_odds() + sum(self.llr(j, v) for j, v in votes.items()))

    def can_predict(self, judges: Sequence[JudgeSpec]) -> bool:
        """Whether every judge is known, and every sampling one has a consistency."""
        return all(
            j.name in self.sensitivity and (j.samples == 1 or j.name in self.consistency)
            for j in judges
        )

    def _belief_model(self, spec: JudgeSpec) -> tuple[float, float, float]:
        """(P(belief yes | relevant), P(belief no | not relevant), consistency) of one judge:
        the judge-vote sensitivity and specificity undone through the majority of
        ``spec.samples`` samples of the given consistency."""
        se = self._clip(self.sensitivity[spec.name])
        sp = self._clip(self.specificity[spec.name])
        if spec.samples <= 1:
            return se, sp, 1.0
        c = min(1.0 - self.floor / 2, max(0.5 + self.floor, self.consistency[spec.name]))
        right = wrong = 0.0  # P(the majority repeats / contradicts the belief)
        n = spec.samples
        for k in range(n + 1):  # k samples repeat the belief
            pk = _binom_pmf(n, k, c)
            if 2 * k > n:
                right += pk
            elif 2 * k < n:
                wrong += pk

        # judge-vote se = (se_b * right + (1 - se_b) * wrong) / (right + wrong), solved for se_b
        def undo(x: float) -> float:
            return self._clip((x * (right + wrong) - wrong) / (right - wrong))

        return undo(se), undo(sp), c

    def predict(self, state: PairVotes) -> tuple[int, float]:
        """(the label the pair has now, the probability that asking every remaining sample of
        every judge leaves it unchanged).

        The label now is the sign of the posterior log-odds from the current judge votes (a
        judge's majority of the samples asked so far), as an aggregation of the votes cast
        would give; the label at the end is the same for the judge votes once every sample is
        in. Their distribution given the samples so far is exact under the model: a judge's
        belief, its samples given the belief, judges independent given the true label.
        """
        base = self.prior_log_odds()
        now = base
        # per true label t: P(samples so far | t), and the distribution of the final log-odds
        lik = {1: 1.0, 0: 1.0}
        final: dict[int, dict[float, float]] = {1: {base: 1.0}, 0: {base: 1.0}}
        for spec in state.judges:
            yes, no, left = state._counts(spec)
            left = max(0, left)
            now += self.llr(spec.name, _majority(yes, no))
            se_b, sp_b, c = self._belief_model(spec)
            # P(samples so far | belief), and the judge's final vote given its belief
            obs = {b: (c if b else 1 - c) ** yes * (1 - c if b else c) ** no for b in (1, 0)}
            ends: dict[int, dict[int | None, float]] = {1: {}, 0: {}}
            for b in (1, 0):
                p_yes = c if b else 1.0 - c
                for k in range(left + 1):  # k more yes among the samples left
                    v = _majority(yes + k, no + left - k)
                    ends[b][v] = ends[b].get(v, 0.0) + _binom_pmf(left, k, p_yes)
            for t in (1, 0):
                pb1 = se_b if t else 1.0 - sp_b  # P(belief yes | t)
                w = {1: pb1 * obs[1], 0: (1.0 - pb1) * obs[0]}
                z = w[1] + w[0]
                lik[t] *= z
                votes: dict[int | None, float] = {}
                for b in (1, 0):
                    for v, pv in ends[b].items():
                        votes[v] = votes.get(v, 0.0) + (w[b] / z) * pv
                nxt: dict[float, float] = {}
                for x, px in final[t].items():
                    for v, pv in votes.items():
                        key = round(x + self.llr(spec.name, v), 9)
                        nxt[key] = nxt.get(key, 0.0) + px * pv
                final[t] = nxt
        label = int(now > 0.0)
        prior = self._clip(self.prior)
        post1 = prior * lik[1] / (prior * lik[1] + (1.0 - prior) * lik[0])
        keep = 0.0
        for t, pt in ((1, post1), (0, 1.0 - post1)):
            same = sum(p for x, p in final[t].items() if int(x > 0.0) == label)
            keep += pt * same
        return label, min(1.0, keep)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "judge": j,
                "sensitivity": self.sensitivity[j],
                "specificity": self.specificity[j],
                "prior": self.prior,
                "consistency": self.consistency.get(j),
            }
            for j in sorted(self.sensitivity)
        ]

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], floor: float = 0.02) -> JudgeModel:
        if not rows:
            return cls(prior=0.5, sensitivity={}, specificity={}, floor=floor)
        return cls(
            prior=float(rows[0]["prior"]),
            sensitivity={str(r["judge"]): float(r["sensitivity"]) for r in rows},
            specificity={str(r["judge"]): float(r["specificity"]) for r in rows},
            floor=floor,
            consistency={
                str(r["judge"]): float(r["consistency"])
                for r in rows
                if r.get("consistency") is not None
            },
        )


def sample_consistency(votes: pd.DataFrame | Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per judge that sampled a pair more than once: the chance c that one sample repeats the
    judge's belief, from the share a of agreeing sample pairs (a = c² + (1 - c)²)."""
    df = _frame(votes)
    valid = df[df["verdict"].notna()]
    if valid.empty:
        return {}
    g = valid.assign(v=valid["verdict"].astype(bool).astype(int)).groupby(["judge", "task"])["v"]
    per = pd.DataFrame({"yes": g.sum(), "k": g.count()}).reset_index()
    per = per[per["k"] >= 2]
    if per.empty:
        return {}
    no = per["k"] - per["yes"]
    per = per.assign(
        agree=per["yes"] * (per["yes"] - 1) + no * (no - 1), pairs=per["k"] * (per["k"] - 1)
    )
    out: dict[str, float] = {}
    for judge, grp in per.groupby("judge"):
        a = float(grp["agree"].sum() / grp["pairs"].sum())
        out[str(judge)] = 0.5 + 0.5 * math.sqrt(max(0.0, 2.0 * a - 1.0))
    return out


def _majority(yes: int, no: int) -> int | None:
    """A judge's vote from its valid samples: 1 or 0 by majority, None on a tie."""
    return None if yes == no else int(yes > no)


def _binom_pmf(n: int, k: int, p: float) -> float:
    return math.comb(n, k) * p**k * (1.0 - p) ** (n - k)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# -- adaptive stopping ------
@dataclass(frozen=True)
class JudgeSpec:
    """A judge in asking order: its name, samples per pair, and whether a call costs an LLM
    request (model judges do not)."""

    name: str
    samples: int = 1
    llm: bool = True


@dataclass
class StopRule:
    """When a pair is settled. ``confidence``: stop once the chance that the remaining votes
    leave the pair's label unchanged reaches it (needs a :class:`JudgeModel`; see
    :func:`stop_reason`); ``max_votes``: a cap on calls per pair; ``full``: ask every judge
    every sample (the calibration slice); ``min_votes``: calls asked of every pair before
    anything but exhaustion stops it (a pair is never labelled by the prior alone)."""

    confidence: float = 0.99
    max_votes: int | None = None
    full: bool = False
    min_votes: int = 1


@dataclass
class PairVotes:
    """The votes asked so far about one pair, in asking order."""

    judges: Sequence[JudgeSpec]
    asked: dict[str, list[bool | None]] = field(default_factory=dict)

    def add(self, judge: str, verdict: bool | None) -> None:
        self.asked.setdefault(judge, []).append(verdict)

    @property
    def calls(self) -> int:
        return sum(len(v) for v in self.asked.values())

    def llm_calls(self) -> int:
        llm = {j.name for j in self.judges if j.llm}
        return sum(len(v) for j, v in self.asked.items() if j in llm)

    def _counts(self, spec: JudgeSpec) -> tuple[int, int, int]:
        got = self.asked.get(spec.name, [])
        yes = sum(1 for v in got if v is True)
        no = sum(1 for v in got if v is False)
        return yes, no, spec.samples - len(got)

    def judge_vote(self, spec: JudgeSpec) -> tuple[int | None, bool]:
        """(the judge's vote so far: majority of valid samples, None on a tie; whether it is
        fixed, i.e. no remaining sample can change it)."""
        yes, no, left = self._counts(spec)
        return _majority(yes, no), (left <= 0 or abs(yes - no) > left)

    def outcomes(self, spec: JudgeSpec) -> set[int | None]:
        """The judge votes still possible once all its samples are in (bad answers may leave
        a tie, so a tie is possible whenever the margin does not exceed the samples left)."""
        yes, no, left = self._counts(spec)
        if left <= 0 or abs(yes - no) > left:
            return {self.judge_vote(spec)[0]}
        out: set[int | None] = {None}
        if yes + left > no:
            out.add(1)
        if no + left > yes:
            out.add(0)
        return out

    def next_call(self, rule: StopRule | None = None) -> tuple[str, int] | None:
        """The next (judge, sample index) to ask; None when every judge's vote is fixed.

        Round by round, cheapest judge first: every judge's first sample, then second samples,
        and so on, skipping judges whose vote no remaining sample can change. A later, dearer
        judge is thus asked only while the cheaper ones leave the pair open, and a judge's
        extra samples only where its first ones did not settle it. ``rule.full`` (the
        calibration slice) asks every sample of every judge.
        """
        full = rule is not None and rule.full
        best: tuple[str, int] | None = None
        for spec in self.judges:
            got = len(self.asked.get(spec.name, []))
            if got >= spec.samples or (not full and self.judge_vote(spec)[1]):
                continue
            if best is None or got < best[1]:
                best = (spec.name, got)
        return best

    def settled_votes(self) -> dict[str, int | None]:
        return {s.name: self.judge_vote(s)[0] for s in self.judges if self.judge_vote(s)[1]}


def _llr(model: JudgeModel | None, judge: str, vote: int | None) -> float:
    if vote is None:
        return 0.0
    if model is None:
        return 1.0 if vote else -1.0  # plain majority of judge votes
    return model.llr(judge, vote)


def stop_reason(state: PairVotes, rule: StopRule, model: JudgeModel | None = None) -> str | None:
    """Why asking about this pair stops now, or None to go on.

    Before ``rule.min_votes`` calls only exhaustion or the cap stops a pair.
    "exhausted": every judge's vote is fixed; "cap": ``max_votes`` calls made; "settled": the
    decision (posterior above or below one half under ``model``; the majority of judge votes
    without one) is the same whatever the remaining votes say; "confident": under ``model``,
    the probability that asking every remaining sample of every judge leaves the pair's label
    as it is now reaches ``rule.confidence`` (:meth:`JudgeModel.predict`; a model without
    sample consistencies counts the posterior from the judges whose votes are fixed instead).
    """
    if state.next_call(rule) is None:
        return "exhausted"
    if rule.max_votes is not None and state.calls >= rule.max_votes:
        return "cap"
    if rule.full or state.calls < rule.min_votes:
        return None
    base = model.prior_log_odds() if model is not None else 0.0
    lo = hi = base
    for spec in state.judges:
        llrs = [_llr(model, spec.name, v) for v in state.outcomes(spec)]
        lo += min(llrs)
        hi += max(llrs)
    if lo > 0.0 or hi < 0.0:
        return "settled"
    if model is not None:
        if model.can_predict(state.judges):
            if model.predict(state)[1] >= rule.confidence:
                return "confident"
            return None
        p = _sigmoid(base + sum(_llr(model, j, v) for j, v in state.settled_votes().items()))
        if max(p, 1.0 - p) >= rule.confidence:
            return "confident"
    return None


def full_calls(judges: Sequence[JudgeSpec], llm_only: bool = False) -> int:
    """Calls per pair when every judge is asked every sample."""
    return sum(j.samples for j in judges if j.llm or not llm_only)


# -- agreement ------
def cohen_kappas(votes: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Cohen's κ (scikit-learn) and raw agreement for every pair of judges, on the tasks both
    voted on (NaN κ where it is undefined, e.g. a judge that always says the same)."""
    from sklearn.metrics import cohen_kappa_score

    jv = judge_votes(votes)
    wide = jv.pivot(index="task", columns="worker", values="label")
    judges = sorted(wide.columns)
    rows = []
    for i, a in enumerate(judges):
        for b in judges[i + 1 :]:
            both = wide[[a, b]].dropna()
            n = len(both)
            kappa = float("nan")
            if n and both[a].nunique() + both[b].nunique() > 2:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kappa = float(cohen_kappa_score(both[a].astype(int), both[b].astype(int)))
            agreement = float((both[a] == both[b]).mean()) if n else float("nan")
            rows.append(
                {"judge_a": a, "judge_b": b, "n": n, "agreement": agreement, "kappa": kappa}
            )
    return pd.DataFrame(rows, columns=["judge_a", "judge_b", "n", "agreement", "kappa"])


def fleiss_kappa(votes: pd.DataFrame | Iterable[Mapping[str, Any]]) -> float:
    """Fleiss' κ (statsmodels) over the tasks every judge voted on (NaN if fewer than two
    judges or no such task)."""
    from statsmodels.stats.inter_rater import fleiss_kappa as _fleiss

    jv = judge_votes(votes)
    wide = jv.pivot(index="task", columns="worker", values="label").dropna()
    if wide.shape[1] < 2 or wide.empty:
        return float("nan")
    yes = wide.sum(axis=1).to_numpy(dtype=float)
    table = np.column_stack([wide.shape[1] - yes, yes])
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        return float(_fleiss(table, method="fleiss"))


def krippendorff_alpha(votes: pd.DataFrame | Iterable[Mapping[str, Any]]) -> float:
    """Krippendorff's α (crowd-kit; nominal), tolerating missing judge votes."""
    from crowdkit.metrics.data import alpha_krippendorff

    data = crowd_input(votes)
    if data.empty or data["worker"].nunique() < 2:
        return float("nan")
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        return float(alpha_krippendorff(data))


def judge_warnings(
    kappas: pd.DataFrame,
    judges: pd.DataFrame,
    duplicate_agreement: float = 0.95,
    chance_margin: float = 0.05,
    min_votes: int = 10,
) -> list[dict[str, Any]]:
    """Warnings worth a look: two judges that agree on at least ``duplicate_agreement`` of
    their common pairs (the second adds little), and judges whose Youden index
    (sensitivity + specificity - 1) is below ``chance_margin`` (at or below chance)."""
    out = []
    for r in kappas.itertuples():
        if r.n >= min_votes and r.agreement >= duplicate_agreement:
            out.append(
                {
                    "kind": "near_duplicate",
                    "judges": [r.judge_a, r.judge_b],
                    "message": f"judges {r.judge_a} and {r.judge_b} agree on "
                    f"{r.agreement:.0%} of {r.n} pairs (kappa {r.kappa:.2f}): the second adds "
                    "little; vary its prompt or model, or drop it",
                }
            )
    for judge, r in judges.iterrows():
        if r["n"] < min_votes:
            continue
        youden = r["sensitivity"] + r["specificity"] - 1.0
        if not math.isfinite(youden) or youden < chance_margin:
            out.append(
                {
                    "kind": "below_chance",
                    "judges": [str(judge)],
                    "message": f"judge {judge} is at or below chance (sensitivity "
                    f"{r['sensitivity']:.2f}, specificity {r['specificity']:.2f}): its votes "
                    "carry no information; use a stronger model or another prompt",
                }
            )
    return out


# -- relabeling ------
@dataclass
class Decision:
    """What happens to one pair."""

    query_id: str
    doc_id: str
    role: str  # the pair's role before: "positive", "negative" or "candidate"
    new_role: str  # "positive", "negative", "candidate" or "dropped"
    reason: str | None  # why the role changed or the pair was rejected; None if unchanged
    posterior: float | None
    teacher_score: float | None  # kept as a distillation target, else None
    teacher_dropped: bool = False  # a teacher score existed but disagreed with the ensemble
    rejected: bool = False  # the filter rejected it (low confidence or agreement)
    held: str | None = None  # ``hold``: the reason of the change not made (role kept)


def relabel(
    pairs: Iterable[Mapping[str, Any]],
    negatives_relevant: Literal["positive", "drop"] = "positive",
    min_confidence: float | None = None,
    min_agreement: float | None = None,
    hold: bool = False,
) -> list[Decision]:
    """Decide each pair's fate from its aggregate.

    Each pair has query_id, doc_id, role, label (1/0/None), posterior, confidence, agreement
    and optionally teacher_score / teacher_verdict. Pairs with no label, a confidence below
    ``min_confidence`` or an agreement below ``min_agreement`` are rejected (their reason says
    which). A negative labelled relevant becomes a positive (``negatives_relevant="positive"``)
    or is dropped; a positive labelled irrelevant is dropped. A teacher score is kept only
    where the teacher's verdict equals the ensemble's label. With ``hold`` (an ensemble not
    to be trusted) nothing changes: every pair keeps its role and its teacher score, none is
    rejected, and ``held`` names the change that was not made.
    """
    out = []
    for p in pairs:
        role = str(p["role"])
        label = p.get("label")
        post = p.get("posterior")
        post = None if post is None or (isinstance(post, float) and math.isnan(post)) else post
        reason, new_role, rejected = None, role, False
        conf = p.get("confidence")
        agree = p.get("agreement")
        if label is None or post is None:
            reason, new_role, rejected = "no_judge_vote", "dropped", True
        elif min_confidence is not None and (conf is None or conf < min_confidence):
            reason, new_role, rejected = "low_confidence", "dropped", True
        elif min_agreement is not None and (agree is None or agree < min_agreement):
            reason, new_role, rejected = "low_agreement", "dropped", True
        elif role == "negative" and int(label) == 1:
            reason = "negative_judged_relevant"
            new_role = "positive" if negatives_relevant == "positive" else "dropped"
        elif role == "positive" and int(label) == 0:
            reason, new_role = "positive_judged_irrelevant", "dropped"
        teacher = p.get("teacher_score")
        tverdict = p.get("teacher_verdict")
        keep_teacher, dropped = None, False
        if teacher is not None and not rejected:
            if tverdict is not None and label is not None and int(bool(tverdict)) == int(label):
                keep_teacher = float(teacher)
            else:
                dropped = True
        held = None
        if hold and (new_role != role or rejected or dropped):
            held = reason or "teacher_disagrees"
            reason, new_role, rejected, dropped = None, role, False, False
            keep_teacher = None if teacher is None else float(teacher)
        out.append(
            Decision(
                query_id=str(p["query_id"]),
                doc_id=str(p["doc_id"]),
                role=role,
                new_role=new_role,
                reason=reason,
                posterior=None if post is None else float(post),
                teacher_score=keep_teacher,
                teacher_dropped=dropped,
                rejected=rejected,
                held=held,
            )
        )
    return out


# -- asking adaptively ------
Call = tuple[str, str, int]  # (task, judge, sample index)


def ask_adaptively(
    tasks: Sequence[str],
    judges: Sequence[JudgeSpec],
    answer: Any,
    rule: StopRule,
    model: JudgeModel | None = None,
) -> tuple[dict[str, PairVotes], dict[str, str]]:
    """Ask judges about ``tasks`` in rounds until each is settled (see :func:`stop_reason`).

    Each round asks every unsettled task its next call; ``answer(calls)`` gets the round's
    list of (task, judge, sample) and returns one verdict (True/False/None) per call, so a
    caller can send a whole round at once. Returns the votes per task and why each stopped.
    """
    states = {t: PairVotes(judges) for t in tasks}
    reasons: dict[str, str] = {}
    active = list(tasks)
    while active:
        calls: list[Call] = []
        still = []
        for t in active:
            why = stop_reason(states[t], rule, model)
            if why is not None:
                reasons[t] = why
                continue
            nxt = states[t].next_call(rule)
            assert nxt is not None  # stop_reason says "exhausted" otherwise
            calls.append((t, nxt[0], nxt[1]))
            still.append(t)
        if not calls:
            break
        verdicts = answer(calls)
        if len(verdicts) != len(calls):
            raise ValueError(f"answer() returned {len(verdicts)} verdicts for {len(calls)} calls")
        for (t, j, _), v in zip(calls, verdicts, strict=True):
            states[t].add(j, None if v is None else bool(v))
        active = still
    return states, reasons


def votes_of(states: Mapping[str, PairVotes]) -> list[dict[str, Any]]:
    """The vote rows (task, judge, sample, verdict) of :func:`ask_adaptively`'s states."""
    return [
        {"task": t, "judge": j, "sample": s, "verdict": v}
        for t, st in states.items()
        for j, got in st.asked.items()
        for s, v in enumerate(got)
    ]


# -- simulated judges (for planning an ensemble and for testing this module) ------
@dataclass(frozen=True)
class SimulatedJudge:
    """A judge with a known quality: per pair it forms a belief that is right with
    probability ``sensitivity`` (relevant pairs) or ``specificity`` (irrelevant ones); each of
    its samples repeats that belief with probability ``consistency`` and flips it otherwise."""

    name: str
    sensitivity: float
    specificity: float
    samples: int = 1
    consistency: float = 1.0
    llm: bool = True

    def spec(self) -> JudgeSpec:
        return JudgeSpec(self.name, self.samples, self.llm)


def simulate_answers(
    truth: Mapping[str, int | bool], judges: Sequence[SimulatedJudge], seed: int
) -> dict[tuple[str, str, int], bool]:
    """Every answer every simulated judge would give, drawn once (seeded), so that full and
    adaptive voting see the same answers."""
    rng = np.random.default_rng(seed)
    out: dict[tuple[str, str, int], bool] = {}
    for j in judges:
        for t in sorted(truth):
            rel = bool(truth[t])
            right = rng.random() < (j.sensitivity if rel else j.specificity)
            belief = rel if right else not rel
            for s in range(j.samples):
                out[(t, j.name, s)] = belief if rng.random() < j.consistency else not belief
    return out
