"""``squeeze explain``: what compression changed in one model — where its bytes went, which of its
predictions flipped, and whether it still looks at the same evidence as the baseline.

Three questions, three parts, each a plain function usable on its own:

- **Where the bytes went** (`byte_breakdown`): the packed file (`compressors.packing`) taken apart
  byte by byte, by what it stores. An SQZ5 file (or SQZ4, SQZ3) holds each tensor's arrays
  (values, codes, masks, gaps, scales, codebook, rANS frequency tables) one after the other, each
  compressed by its own codec (zstd'd byte planes, ``top``, rANS, bit-packed codes), then its
  index (zstd'd JSON: every tensor's name, shape, layout and its arrays' stored sizes; the format
  version, replaced modules, int8 layers, ties and changed attributes) and its framing (the magic,
  and a trailer of the index's length and the checksum). Each tensor costs its arrays' stored
  bytes, read from the index (`stored_arrays`; ``raw_bytes``: the same arrays uncompressed); the
  *index* and *framing* lines complete the sum to the file's size exactly. An old SQZ2 file, which
  LZMA-compresses one safetensors payload as a whole, is accounted on that payload as before:
  each tensor costs its arrays' data, their entries in the safetensors JSON header and its layout
  record; the *model record* line is the rest of the payload (length prefix, JSON framing,
  padding, the model record), the *LZMA container* line the LZMA stream minus the payload
  (negative when LZMA shrank it) and the *file header* line its magic, codec and CRC-32.
  Compressible tensors (`compressors.targets`) get a row each, with their shape before and after,
  what structured pruning kept, sparsity, bit width or codebook size and runtime (float or int8);
  the other tensors (biases, norms, buffers) are grouped by the module that owns them.
- **Which predictions flipped** (`agreement_report`): on validation and test, the share of inputs
  whose top-1 class is the baseline's (for an embedding task: whose nearest neighbour among the
  split is the baseline's, `experiments.neighbour_agreement`), the flip matrix (baseline class ->
  compressed class; its row sums are the baseline's class counts) and every flipped input.
- **The same evidence?** (`attribution_fidelity`): input attributions of the baseline and of the
  compressed model on a fixed, seeded validation sample, by Captum's Integrated Gradients from an
  all-zero input, for the class the baseline predicts (an embedding model: for the dot product of
  its embedding with the baseline's); for token inputs, Layer Integrated Gradients over the
  token embeddings, summed per token, from all-zero token ids. Features equal to that reference
  get no attribution from any model (IG's completeness) and are left out of the Spearman rank
  correlation, which ties would otherwise inflate; the mean correlation is reported per class.
  Int8 layers (``torch.ao``) have no gradients, so the compressed model is attributed on its float
  reload (``load_packed(..., int8=False)``: the same weights).

`explain_model` answers all three for one packed file; `explain_trial` for a study's trial (or
its baseline), writing CSV files and figures and logging them to the trial's MLflow run; the
report (`search.results.report`) and ``squeeze run`` (`search.results.reuse`) use them too.

The parts live in private modules, one job each: `_bytes` (the breakdown), `_agreement`,
`_attributions`, `_model` (`explain_model`), `_trial` (a study's trial and its front),
`_files` and `_figures` (what is written), `_console` (what ``squeeze explain`` prints).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # (before any part imports pyplot: explanations are drawn headless)

from search.results.explain._agreement import Agreement, agreement_report  # noqa: E402
from search.results.explain._attributions import (  # noqa: E402
    SAMPLES,
    STEPS,
    TOKEN_SAMPLES,
    Attributions,
    Fidelity,
    attribute,
    attribution_fidelity,
)
from search.results.explain._bytes import (  # noqa: E402
    CONTAINER,
    FILE_HEADER,
    FRAMING,
    INDEX,
    RECORD,
    Breakdown,
    Line,
    StoredArray,
    StoredFile,
    byte_breakdown,
    stored_arrays,
)
from search.results.explain._console import console_tables  # noqa: E402
from search.results.explain._figures import (  # noqa: E402
    attribution_figure,
    bytes_figure,
    bytes_plotly,
)
from search.results.explain._files import (  # noqa: E402
    agreement_table,
    bytes_table,
    write_explanation,
)
from search.results.explain._model import SHOWN, Explanation, explain_model  # noqa: E402
from search.results.explain._trial import explain_front, explain_trial  # noqa: E402

__all__ = [
    "CONTAINER",
    "FILE_HEADER",
    "FRAMING",
    "INDEX",
    "RECORD",
    "SAMPLES",
    "SHOWN",
    "STEPS",
    "StoredArray",
    "StoredFile",
    "TOKEN_SAMPLES",
    "Agreement",
    "Attributions",
    "Breakdown",
    "Explanation",
    "Fidelity",
    "Line",
    "agreement_report",
    "agreement_table",
    "attribute",
    "attribution_figure",
    "attribution_fidelity",
    "byte_breakdown",
    "bytes_figure",
    "bytes_plotly",
    "bytes_table",
    "console_tables",
    "explain_front",
    "explain_model",
    "explain_trial",
    "stored_arrays",
    "write_explanation",
]
