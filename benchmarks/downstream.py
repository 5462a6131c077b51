"""Benchmark: does training on rankmill's negatives beat training on sentence-transformers'?

    python benchmarks/downstream.py                       # cranfield and cisi, ~15 min each
    python benchmarks/downstream.py --quick               # adi, a few tiny steps (smoke run)

For each collection the judged queries are split in half (seeded). On the first half both
miners get one seeded positive per query (as a synthetic query knows only its source
document) and mine the same number of hard negatives with all-MiniLM-L6-v2:
rankmill's :class:`~rankmill.retrieval.miner.Miner` with its defaults, and
sentence-transformers' ``mine_hard_negatives`` with its defaults. all-MiniLM-L6-v2 is then
fine-tuned one epoch with MultipleNegativesRankingLoss on (query, positive, negatives...)
tuples from each, with the same seed, order, batch size and steps, and evaluated with the
base model on the other half: nDCG@10 (graded gains where the judgments are graded) and
Recall@100 over exact search of the whole corpus.

Two CPU cores fine-tune slowly, so by default texts are cut to 128 tokens (training and
evaluation alike), batches hold 16 tuples and training stops after 40 steps; the output says
what was used. A query with fewer negatives than asked repeats the ones it has.
Last line: ``summary: ndcg10_base=… ndcg10_rankmill=… ndcg10_st=…`` (means over collections).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent))  # tests.fixtures
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def split_queries(coll, seed: int) -> tuple[list[str], list[str]]:
    judged = sorted(q for q in coll.relevant if q in coll.queries)
    rng = np.random.default_rng(seed)
    order = [judged[i] for i in rng.permutation(len(judged))]
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


def mine_st(coll, texts: list[str], pos: dict[str, str], k: int, model) -> dict[str, list[str]]:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    qids = sorted(pos)
    text_of = dict(zip(coll.doc_ids, texts, strict=True))
    ids_of_text: dict[str, str] = {}
    for d, t in zip(coll.doc_ids, texts, strict=True):
        ids_of_text.setdefault(t, d)
    q_of_text = {coll.queries[q]: q for q in qids}
    ds = Dataset.from_dict(
        {"query": [coll.queries[q] for q in qids], "positive": [text_of[pos[q]] for q in qids]}
    )
    out = mine_hard_negatives(ds, model, corpus=texts, num_negatives=k, verbose=False)
    negs: dict[str, list[str]] = {}
    for row in out:
        negs.setdefault(q_of_text[row["query"]], []).append(ids_of_text[row["negative"]])
    return negs


def mine_rankmill(coll, pos: dict[str, str], k: int, seed: int) -> dict[str, list[str]]:
    from rankmill.retrieval.miner import MineQuery, Miner, MiningParams

    with tempfile.TemporaryDirectory() as cache:
        miner = Miner(MiningParams(num_negatives=k), cache_dir=cache, seed=seed)
        miner.index_corpus(coll.doc_ids, coll.titles, coll.texts)
        res = miner.mine(
            [
                MineQuery(q, coll.queries[q], [pos[q]], sorted(coll.excluded.get(q, ())))
                for q in sorted(pos)
            ]
        )
    return {m.query_id: m.negative_ids for m in res if m.negative_ids}


def tuples(
    coll, texts_by_id: dict[str, str], pos: dict[str, str], negs: dict[str, list[str]], k: int
):
    rows = []
    for q in sorted(negs):
        n = negs[q]
        n = [n[i % len(n)] for i in range(k)]
        rows.append([coll.queries[q], texts_by_id[pos[q]], *[texts_by_id[d] for d in n]])
    return rows


def train(rows: list[list[str]], args: argparse.Namespace, seed: int):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    from rankmill.retrieval.dense import resolve_model

    torch.manual_seed(seed)
    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    model.max_seq_length = args.max_len
    loss_fn = losses.MultipleNegativesRankingLoss(model)
    order = np.random.default_rng(seed).permutation(len(rows))
    batches = [
        [rows[i] for i in order[s : s + args.batch]] for s in range(0, len(order), args.batch)
    ][: args.max_steps]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    warm = max(1, len(batches) // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, 1 - s / max(1, len(batches)))
    )
    model.train()
    for batch in batches:
        cols = list(zip(*batch, strict=True))
        feats = [model.preprocess(list(c)) for c in cols]
        loss = loss_fn(feats, labels=None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    return model, len(batches)


def evaluate(
    model, coll, texts: list[str], queries: list[str], graded: dict
) -> tuple[float, float]:
    d = model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    q = model.encode(
        [coll.queries[x] for x in queries], normalize_embeddings=True, show_progress_bar=False
    )
    top = np.argsort(-(q @ d.T), axis=1)[:, :100]
    ndcgs, recalls = [], []
    for i, qid in enumerate(queries):
        gains = graded[qid]
        ranked = [coll.doc_ids[j] for j in top[i]]
        dcg = sum(gains.get(doc, 0) / math.log2(r + 2) for r, doc in enumerate(ranked[:10]))
        ideal = sorted(gains.values(), reverse=True)[:10]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        ndcgs.append(dcg / idcg if idcg else 0.0)
        rel = {doc for doc, g in gains.items() if g > 0}
        recalls.append(len(rel & set(ranked)) / len(rel))
    return float(np.mean(ndcgs)), float(np.mean(recalls))


def graded_qrels(name: str) -> dict[str, dict[str, int]]:
    from tests.fixtures.judged import DATA

    out: dict[str, dict[str, int]] = {}
    for i, line in enumerate((DATA / name / "qrels" / "test.tsv").open(encoding="utf-8")):
        if i == 0 or not line.strip():
            continue
        q, doc, s = line.rstrip("\n").split("\t")
        if int(s) > 0:
            out.setdefault(q, {})[doc] = int(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--collections", nargs="+", default=None)
    ap.add_argument("--quick", action="store_true", help="adi, 32 tokens, 2 steps: a smoke run")
    ap.add_argument("--num-negatives", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=128, help="tokens per text, train and eval")
    ap.add_argument("--batch", type=int, default=16, help="tuples per step")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    if args.quick:
        args.collections = args.collections or ["adi"]
        args.max_len, args.batch, args.max_steps = 32, 4, 2
    args.collections = args.collections or ["cranfield", "cisi"]

    import torch
    from sentence_transformers import SentenceTransformer

    from rankmill.retrieval.dense import resolve_model
    from rankmill.retrieval.miner import doc_text
    from tests.fixtures.judged import DATA, load, one_positive

    if not DATA.is_dir():
        sys.exit(f"{DATA} is not there: this benchmark needs ../shared/data (see its README)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(
        f"downstream benchmark: all-MiniLM-L6-v2, MNRL, 1 epoch capped at {args.max_steps} steps "
        f"of {args.batch} tuples (query, positive, {args.num_negatives} negatives), "
        f"{args.max_len} tokens, lr {args.lr}, seed {args.seed}, CPU"
        + (" [--quick: a smoke run, numbers mean nothing]" if args.quick else "")
    )
    results = []
    for name in args.collections:
        t0 = time.perf_counter()
        coll = load(name)
        graded = graded_qrels(name)
        texts = [doc_text(t, x) for t, x in zip(coll.titles, coll.texts, strict=True)]
        by_id = dict(zip(coll.doc_ids, texts, strict=True))
        train_q, test_q = split_queries(coll, args.seed)
        all_pos = one_positive(coll, args.seed)
        pos = {q: all_pos[q] for q in train_q}
        # Both miners mine at the model's own max length; only training and eval are cut.
        base = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
        neg_st = mine_st(coll, texts, pos, args.num_negatives, base)
        neg_rm = mine_rankmill(coll, pos, args.num_negatives, args.seed)
        base.max_seq_length = args.max_len
        row = {"name": name}
        row["base"] = evaluate(base, coll, texts, test_q, graded)
        for label, negs in (("rankmill", neg_rm), ("st", neg_st)):
            rows = tuples(coll, by_id, pos, negs, args.num_negatives)
            fn = sum(d in coll.relevant.get(q, ()) for q, v in negs.items() for d in v)
            model, steps = train(rows, args, args.seed)
            row[label] = evaluate(model, coll, texts, test_q, graded)
            row[f"{label}_info"] = (
                len(rows),
                steps,
                fn / max(1, sum(len(v) for v in negs.values())),
            )
            del model
        results.append(row)
        print(
            f"\n{name}: {len(train_q)} training queries, {len(test_q)} test queries, "
            f"{time.perf_counter() - t0:.0f}s"
        )
        print(
            f"  {'model':<34}{'nDCG@10':>9}{'R@100':>8}{'tuples':>8}{'steps':>7}{'neg FN rate':>13}"
        )
        print(f"  {'base all-MiniLM-L6-v2':<34}{row['base'][0]:>9.4f}{row['base'][1]:>8.4f}")
        for label, title in (
            ("rankmill", "+ rankmill negatives"),
            ("st", "+ mine_hard_negatives negatives"),
        ):
            n, steps, fnr = row[f"{label}_info"]
            ndcg, recall = row[label]
            print(f"  {title:<34}{ndcg:>9.4f}{recall:>8.4f}{n:>8}{steps:>7}{fnr:>13.3f}")

    def mean(key: str, i: int) -> float:
        return float(np.mean([r[key][i] for r in results]))

    print(
        "summary: "
        + " ".join(
            f"{m}{k}={mean(key, i):.4f}"
            for m, i in (("ndcg10_", 0), ("recall100_", 1))
            for k, key in (("base", "base"), ("rankmill", "rankmill"), ("st", "st"))
        )
    )


if __name__ == "__main__":
    main()
