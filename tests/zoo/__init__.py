"""A zoo of small models of the shapes users bring, each a squeeze task on small real data.

Every task is one builder in `tests.zoo.tasks` and one yaml in ``tests/zoo_conf/task/``, used as
README's "Bring your own model" says::

    PYTHONPATH=. squeeze sweep --config-dir tests/zoo_conf task=zoo_resnet search.n_trials=3

The models (`tests.zoo.models`): a residual CNN, a depthwise-separable CNN, torch's own
``nn.TransformerEncoder``, an LSTM, a bidirectional GRU, an embedding tied to its output layer,
and all-MiniLM-L6-v2 cut to one layer. `tests.zoo.hf` builds Hugging Face ``transformers``
architectures from small configs (BERT, DistilBERT, GPT-2, ViT, ConvNeXt, ResNet, MobileNetV2),
fed dict batches, for ``tests/test_hf_zoo.py``.
"""

from __future__ import annotations

#: The zoo's task names, one yaml each in ``tests/zoo_conf/task/``.
ZOO_TASKS = (
    "zoo_resnet",
    "zoo_mobilenet",
    "zoo_transformer",
    "zoo_lstm",
    "zoo_gru",
    "zoo_tied",
    "zoo_minilm",
)
