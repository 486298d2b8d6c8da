"""4-bit weights on ONNX Runtime's MatMulNBits kernels (`compressors._onnx_nbits`), kept by
`deploy_onnx` only where the task's validation score stays within ``nbits_tolerance``.

Needs the ``onnx`` extra (part of ``.[dev]``); skipped without it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from compressors._onnx_nbits import fused_ops, nbits_graph  # noqa: E402
from compressors.onnx_export import ort_session  # noqa: E402
from experiments.digits import digits_mlp  # noqa: E402
from search.run.deploy import deploy_onnx  # noqa: E402
from tests.test_onnx import pack_recipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _trained():
    """The digits MLP, trained for 200 full-batch Adam steps (an untrained model's score says
    nothing about a tolerance), and its task."""
    torch.manual_seed(0)
    task = digits_mlp(seed=0)
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = task.train.x, task.train.y
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return task, model.eval()


def _packed(tmp_path: Path, bits: int = 4) -> tuple:
    task, model = _trained()
    packed = tmp_path / "m.sqz"
    pack_recipe(model, [("quant", {"bits": bits})], task, packed)
    return task, packed  # (deploy_onnx loads the file's weights into task.build_model())


@pytest.fixture(scope="module")
def exact_4bit(tmp_path_factory):
    """The 4-bit packed digits MLP and its float-kernel deployment (no ``nbits_tolerance``),
    shared by the tests that compare against it: each ONNX export takes 2-3 s of CPU."""
    tmp_path = tmp_path_factory.mktemp("exact_4bit")
    task, packed = _packed(tmp_path)
    return task, packed, deploy_onnx(packed, task, tmp_path / "e.onnx", threads=1)


def test_a_4bit_digits_mlp_runs_on_matmulnbits_within_tolerance(tmp_path, exact_4bit):
    task, packed, exact = exact_4bit
    deployed = deploy_onnx(packed, task, tmp_path / "m.onnx", threads=1, nbits_tolerance=0.001)
    assert exact.kernels == "float" and "onnx_nbits" not in exact.metrics
    assert deployed.kernels == "nbits", deployed.kernels_why
    assert deployed.metrics["onnx_nbits"] == 1.0
    assert deployed.path.name == "m.nbits.onnx" and deployed.path.exists()
    ops = fused_ops(deployed.path, tmp_path / "opt.onnx")
    assert ops.count("MatMulNBits") == 3 and "Gemm" not in ops, ops
    assert abs(deployed.metrics["val_acc_onnx"] - exact.metrics["val_acc_onnx"]) <= 0.001 + 1e-6
    assert exact.metrics["val_acc_onnx"] > 0.8  # trained: the tolerance means something


def test_the_exported_gemm_is_never_fused_and_the_rewrite_keeps_the_float_outputs(
    tmp_path, exact_4bit
):
    task, _, exact = exact_4bit
    assert "MatMulNBits" not in fused_ops(exact.path, tmp_path / "opt.onnx")  # Gemm: no fusion
    assert nbits_graph(exact.path, tmp_path / "n.onnx") == 3
    x = task.val.x[:64].numpy()
    a, b = (ort_session(p) for p in (exact.path, tmp_path / "n.onnx"))
    got = [s.run(None, {s.get_inputs()[0].name: x})[0] for s in (a, b)]
    assert abs(got[0] - got[1]).max() <= 1e-5


def _output_mass(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """A score that any change of the outputs moves (accuracy did not move on the digits MLP)."""
    return float(outputs.abs().sum())


def test_a_fused_score_out_of_tolerance_falls_back_to_the_exact_session(tmp_path):
    task, packed = _packed(tmp_path)
    task = dataclasses.replace(task, metric=_output_mass)
    deployed = deploy_onnx(packed, task, tmp_path / "m.onnx", threads=1, nbits_tolerance=1e-7)
    assert deployed.kernels == "float", deployed.kernels_why
    assert "nbits_tolerance=1e-07" in deployed.kernels_why
    assert deployed.metrics["onnx_nbits"] == 0.0 and deployed.path.name == "m.onnx"
    assert not (tmp_path / "m.nbits.onnx").exists()


def test_8bit_weights_are_not_rewritten_and_a_bad_tolerance_is_named(tmp_path):
    task, packed = _packed(tmp_path, bits=8)
    deployed = deploy_onnx(packed, task, tmp_path / "m.onnx", threads=1, nbits_tolerance=0.001)
    assert deployed.kernels == "float" and "no 4-bit" in deployed.kernels_why
    with pytest.raises(ValueError, match="nbits_tolerance.*-1"):
        deploy_onnx(packed, task, tmp_path / "b.onnx", threads=1, nbits_tolerance=-1)


@pytest.mark.slow  # (a sweep of two trials in ONNX Runtime)
def test_a_sweep_records_which_kernels_its_trials_were_timed_on(tmp_path, cache_dir):
    from search import compose_config, run_sweep
    from tests.conftest import structured_quant_overrides, study_runs

    overrides = structured_quant_overrides(
        tmp_path,
        cache_dir,
        "space.quant.bits=choice(4, 8)",
        "measure.runtime=onnxruntime",
        "measure.onnx_nbits_tolerance=0.001",
        fresh_mlflow=True,
    )
    run_sweep(compose_config(overrides))
    children = study_runs(f"sqlite:///{tmp_path}/mlflow.db")[2]
    assert len(children) == 2
    for child in children:
        kernels = child.data.params["onnx_kernels"]
        assert kernels in ("float", "nbits")
        if child.data.params["quant.bits"] == "8":  # (on this project's CPU the 4-bit: nbits)
            assert kernels == "float"
        assert child.data.metrics["onnx_nbits"] == (kernels == "nbits")
        if kernels == "nbits":  # kept: its validation score within 0.001 of the torch model's
            assert child.data.metrics["val_acc_onnx"] == pytest.approx(
                child.data.metrics["val_acc"], abs=0.001 + 1e-9
            )
