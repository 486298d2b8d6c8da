"""The contract suite on Hugging Face ``transformers`` architectures (`tests.zoo.hf`): BERT,
DistilBERT and GPT-2 sequence classifiers, ViT, ConvNeXt, ResNet and MobileNetV2 image
classifiers, each from a small config with random weights, fed dict batches and returning a
``ModelOutput``.

For every architecture and compressor: the compressor claims tensors of the model (or refuses it
with `UnsupportedModelError` before any training, as `REFUSED` lists), compresses it, one short
epoch of `experiments.fit` fine-tunes it, it is finalized, packed, and reloaded into a freshly
built model with the same outputs; a compressor that shrinks models makes the file smaller. And
every architecture, float and at 4 bits, deploys to ONNX and runs there as in torch.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from compressors import (
    CompressionContext,
    UnsupportedModelError,
    apply_pipeline,
    finalize_pipeline,
    get_compressor,
    load_packed,
    save_packed,
)
from experiments import LOSSES, fit, predict_outputs
from tests.zoo.hf import ARCHITECTURES, hf_task

pytestmark = pytest.mark.usefixtures("one_thread")

#: Training samples of each task (the contract is tested, not the accuracy).
SAMPLES = 128
#: Each cell's compressor and its settings (a small ``allocate`` ratio: the models are small,
#: and norms, biases and the header weigh).
METHODS = {
    "structured": ("structured", {"amount": 0.4}),
    "prune": ("prune", {"amount": 0.5}),
    "quant4": ("quant", {"bits": 4}),
    "cluster": ("cluster", {"bits": 4}),
    "lowrank": ("lowrank", {"keep": 0.3}),
    "kd": ("kd", {}),
    "allocate": ("allocate", {"ratio": 2.0, "sensitivity": "fisher"}),
    "int8": ("quant", {"bits": 8, "runtime": "int8"}),
}
#: (architecture, method) -> what its refusal says: a compressor that cannot act on the model
#: says so before any training (never a crash, never a silent no-op).
REFUSED: dict[tuple[str, str], str] = {}


@functools.cache
def _trained(arch: str):
    """The architecture's task and its baseline, trained one short epoch (cached per session)."""
    task = hf_task(arch, samples=SAMPLES)
    torch.manual_seed(0)
    model = task.build_model()
    fit(model, task.train, epochs=1, batch_size=32, lr=2e-3, loss_fn=task.loss, seed=0)
    return task, model.eval()


@functools.cache
def _baseline_bytes(arch: str, folder) -> int:
    task, baseline = _trained(arch)
    return save_packed(baseline, folder / f"{arch}.sqz")


@pytest.fixture(scope="module")
def sizes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_baselines")
    return lambda arch: _baseline_bytes(arch, folder)


#: Cells over ~10 s on this machine (MobileNetV2's 17 blocks: allocate packs it several times
#: to fit the target; the dynamo exporter traces it).
SLOW = {("mobilenet_v2", "allocate"), ("mobilenet_v2", "onnx")}


def _cells():
    return [
        pytest.param(
            arch,
            method,
            id=f"{arch}-{method}",
            marks=[pytest.mark.slow] if (arch, method) in SLOW else [],
        )
        for arch in ARCHITECTURES
        for method in METHODS
    ]


#: Float exports in the full run only (the lane exports every architecture quantized, and vit's
#: and resnet's float graphs).
SLOW_FLOAT = {"gpt2", "distilbert", "bert", "convnext"}


def _onnx_cells():
    return [
        pytest.param(
            a,
            r,
            marks=[pytest.mark.slow]
            if (a, "onnx") in SLOW or (r, a in SLOW_FLOAT) == ("float", True)
            else [],
        )
        for a in ARCHITECTURES
        for r in ("float", "quant4")
    ]


@pytest.mark.parametrize(("arch", "method"), _cells())
def test_every_compressor_on_every_hf_architecture(arch, method, sizes, tmp_path):
    task, baseline = _trained(arch)
    name, params = METHODS[method]
    compressor = get_compressor(name)(**params)
    example = task.example_inputs(4)
    if (arch, method) in REFUSED:
        with pytest.raises(UnsupportedModelError, match=REFUSED[arch, method]):
            compressor.check_model(baseline, example)
        return
    claimed = compressor.check_model(baseline, example)
    assert claimed or not compressor.shrinks, f"{method} claims nothing of {arch}"

    ctx = CompressionContext(
        train=task.train,
        teacher=baseline,
        example_inputs=example,
        seed=0,
        loss=task.loss,
        losses=LOSSES,
        outputs=task.outputs,
        fit=functools.partial(fit, train=task.train, seed=0, teacher=baseline),
    )
    model = apply_pipeline([compressor], copy.deepcopy(baseline), ctx)
    fit(
        model,
        task.train,
        epochs=1,
        batch_size=32,
        lr=1e-4,
        loss_fn=compressor.finetune_loss(ctx) or task.loss,
        teacher=baseline,
        before_epoch=lambda e, n: compressor.on_epoch(model, e, n),
    )
    model = finalize_pipeline([compressor], model, ctx).eval()
    size = save_packed(model, tmp_path / "m.sqz", like=baseline)

    reloaded = load_packed(tmp_path / "m.sqz", task.build_model(), int8=False).eval()
    expected, got = predict_outputs(model, task.val), predict_outputs(reloaded, task.val)
    assert got.shape == expected.shape == (len(task.val), 10)
    assert (got - expected).abs().max().item() <= 1e-5
    if params.get("runtime") == "int8":  # int8 kernels quantize activations on the fly
        int8 = load_packed(tmp_path / "m.sqz", task.build_model()).eval()
        assert any("quantized.dynamic" in type(m).__module__ for m in int8.modules())
        on_int8 = predict_outputs(int8, task.val)
        cosine = torch.nn.functional.cosine_similarity(on_int8.flatten(), got.flatten(), dim=0)
        assert cosine > 0.99
    if compressor.shrinks:
        base = sizes(arch)
        assert base / size > 1.05, f"{method} on {arch}: {base} -> {size} bytes"


#: architecture -> why its ONNX export is refused (`OnnxExportError` naming the op), if it is.
ONNX_REFUSED: dict[str, str] = {}


@pytest.mark.parametrize(("arch", "recipe"), _onnx_cells())
def test_every_hf_architecture_deploys_to_onnx(arch, recipe, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from compressors.onnx_export import EXACT_TOLERANCE, OnnxExportError
    from search.run.deploy import deploy_onnx

    task, baseline = _trained(arch)
    model = copy.deepcopy(baseline)
    if recipe == "quant4":
        quant = get_compressor("quant")(bits=4)
        ctx = CompressionContext(example_inputs=task.example_inputs(4), seed=0)
        model = finalize_pipeline([quant], apply_pipeline([quant], model, ctx), ctx).eval()
    packed = tmp_path / "m.sqz"
    save_packed(model, packed, like=baseline)
    if arch in ONNX_REFUSED:
        with pytest.raises(OnnxExportError, match=ONNX_REFUSED[arch]):
            deploy_onnx(packed, task, tmp_path / "m.onnx", threads=1)
        return
    deployed = deploy_onnx(packed, task, tmp_path / "m.onnx", threads=1)
    assert deployed.check.agree, deployed.check.message  # within 1e-4 absolute + relative
    shipped = load_packed(packed, task.build_model(), int8=False).eval()
    expected = predict_outputs(shipped, task.val)
    atol, rtol = EXACT_TOLERANCE
    assert torch.allclose(deployed.check.outputs, expected, atol=atol, rtol=rtol)


# ------------------------------------------------ Linears stored transposed (GPT-2's Conv1D)


def _gpt2_with_dead_units():
    """An untrained GPT-2 whose heads 1 and 3 and the first half of its MLP units compute
    nothing (their query / key / value columns, biases and output rows are zero)."""
    task = hf_task("gpt2", samples=SAMPLES)
    torch.manual_seed(0)
    model = task.build_model().eval()
    block = model.transformer.h[0]
    attn, mlp, size = block.attn, block.mlp, block.attn.head_dim
    width = attn.num_heads * size
    with torch.no_grad():
        for head in (1, 3):
            inside = torch.arange(head * size, (head + 1) * size)
            columns = torch.cat([inside + b * width for b in range(3)])  # its q, k and v
            attn.c_attn.weight[:, columns] = 0.0
            attn.c_attn.bias[columns] = 0.0
            attn.c_proj.weight[inside, :] = 0.0
        half = torch.arange(mlp.c_fc.nf // 2)
        mlp.c_fc.weight[:, half] = 0.0
        mlp.c_fc.bias[half] = 0.0
        mlp.c_proj.weight[half, :] = 0.0
    return task, model


def test_structured_pruning_removes_whole_heads_and_units_of_a_transposed_linear_gpt2():
    """GPT-2's fused ``c_attn`` (``Conv1D``, split into query, key and value along its last
    axis) loses whole heads in each of the three, ``c_proj`` the same inputs, the MLP its units;
    head count and ``split_size`` follow: removing the units that compute nothing keeps every
    output."""
    task, model = _gpt2_with_dead_units()
    example = task.example_inputs(8)
    structured = get_compressor("structured")(amount=0.5)
    pruned = structured.compress(model, CompressionContext(example_inputs=example))
    attn, mlp = pruned.transformer.h[0].attn, pruned.transformer.h[0].mlp
    assert (attn.num_heads, attn.split_size, attn.head_dim) == (2, 16, 8)
    assert tuple(attn.c_attn.weight.shape) == (32, 48) == (attn.c_attn.nx, attn.c_attn.nf)
    assert tuple(attn.c_proj.weight.shape) == (16, 32) and attn.c_proj.nx == 16
    assert tuple(mlp.c_fc.weight.shape) == (32, 32) and mlp.c_proj.nx == 32
    expected, got = predict_outputs(model, task.val), predict_outputs(pruned, task.val)
    assert (got - expected).abs().max().item() <= 1e-5


def test_every_weight_compressor_reaches_the_transposed_linears_of_gpt2():
    from compressors import coverage, targets

    task, baseline = _trained("gpt2")
    found = targets(baseline)
    for name in ("c_attn", "c_proj", "c_fc"):
        assert any(n.endswith(f"{name}.weight") and t.kind == "linear" for n, t in found.items())
    for method in ("prune", "quant4", "cluster", "allocate", "structured", "lowrank"):
        name, params = METHODS[method]
        reach = coverage([get_compressor(name)(**params)], baseline, task.example_inputs(4))
        assert reach > 0.6, f"{method} reaches {reach:.0%} of GPT-2's parameters"


def test_a_low_rank_pair_computes_what_the_transposed_linear_it_replaces_computes():
    from transformers.pytorch_utils import Conv1D

    from compressors.lowrank import factorize

    torch.manual_seed(0)
    layer = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs: weight (16, 24)
    torch.nn.init.normal_(layer.bias)
    pair = factorize(layer, 16)  # full rank: the same map
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert torch.allclose(pair(x), layer(x), atol=1e-5)
        assert torch.allclose(pair.weight, layer.weight, atol=1e-5)  # laid out (nx, nf)
    assert (pair.nx, pair.nf) == (16, 24)


def test_a_low_rank_conv_answers_with_the_geometry_of_the_conv_it_replaces():
    """A parent that pads as TensorFlow does (MobileNetV2) reads the replaced Conv's stride,
    kernel size and dilation."""
    from compressors.lowrank import factorize

    conv = torch.nn.Conv2d(8, 16, 3, stride=2, dilation=1, padding=0)
    pair = factorize(conv, 2)
    assert (pair.stride, pair.kernel_size, pair.dilation) == ((2, 2), (3, 3), (1, 1))
    assert (pair.in_channels, pair.out_channels) == (8, 16)
    with pytest.raises(AttributeError):
        pair.nf  # noqa: B018 (only a transposed Linear's pair has nf)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a in ("vit", "convnext", "resnet")])
def test_image_architectures_take_three_channels_at_another_size(arch):
    """RGB images of 32 x 32 pixels: the same builders, pruned with the same outputs' shape."""
    task = hf_task(arch, samples=32, size=32, channels=3)
    assert task.example_inputs(2)["pixel_values"].shape == (2, 3, 32, 32)
    torch.manual_seed(0)
    model = task.build_model().eval()
    ctx = CompressionContext(example_inputs=task.example_inputs(4))
    pruned = get_compressor("structured")(amount=0.4).compress(model, ctx)
    assert predict_outputs(pruned, task.val).shape == (len(task.val), 10)
