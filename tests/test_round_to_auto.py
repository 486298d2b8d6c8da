"""``structured.round_to: auto``: the CPU's channel block in a latency sweep, 1 in a size-only one,
fixed in the study's config so that `squeeze export` / `squeeze run` reproduce it anywhere."""

from __future__ import annotations

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from search import ConfigError, compose_config, run_sweep
from search.cli import main
from search.config import blocks
from search.config.blocks import auto_block, cpu_block, resolve_auto
from search.config.plan import plan_sweep
from search.results.reuse import load_study
from search.run.study_store import claim_study, open_study_storage
from tests.conftest import structured_quant_overrides

AVX512 = {"avx512f", "avx2", "fma", "sse4_2"}
AVX2 = {"avx2", "fma", "sse4_2"}


def _round_to(*overrides: str):
    plan = plan_sweep(compose_config(list(overrides)), connect=False)
    return plan.cfg.space.structured.round_to, plan.space.values("structured")


@pytest.mark.parametrize(
    ("flags", "block"), [(AVX512, 16), (AVX2, 8), ({"avx2"}, 1), ({"sse4_2"}, 1), (set(), 1)]
)
def test_the_block_is_16_with_avx512_8_with_avx2_and_fma_else_1(flags, block):
    assert cpu_block(flags).value == block


def test_the_default_is_auto_and_a_size_only_sweep_keeps_round_to_1():
    assert compose_config([]).space.structured.round_to == "auto"
    value, values = _round_to()
    assert value == 1 and values["structured.round_to"] == 1
    # its study is the one it was before auto (round_to 1 fingerprinted as such)
    before = plan_sweep(compose_config(["space.structured.round_to=1"]), connect=False)
    assert plan_sweep(compose_config([]), connect=False).fingerprint == before.fingerprint


@pytest.mark.parametrize(
    "overrides",
    [
        ["search.objectives=[val_acc,speedup]"],
        ["search.objectives=[val_acc,latency_ms]", "measure.runtime=onnxruntime"],
        ["search.objectives=[val_acc,latency_ms_b256]", "measure.latency_batch_sizes=[1,256]"],
        ["search.objectives=[val_acc,size_bytes]", "search.constraints.speedup=1.5"],
    ],
)
def test_a_latency_sweep_rounds_to_the_block_of_the_cpu_that_times_it(overrides):
    value, values = _round_to(*overrides)
    assert value == cpu_block().value == values["structured.round_to"]
    cfg = compose_config(overrides)
    assert resolve_auto(cfg, AVX512).space.structured.round_to == 16
    assert resolve_auto(cfg, AVX2).space.structured.round_to == 8
    assert cfg.space.structured.round_to == "auto"  # (the composed config is left as it was)
    assert "AVX-512" in auto_block(cfg, AVX512).reason


def test_a_size_only_sweep_ignores_the_cpu():
    cfg = compose_config(["search.objectives=[val_acc,size_bytes,flops]"])
    assert resolve_auto(cfg, AVX512).space.structured.round_to == 1


@pytest.mark.parametrize("given", ["1", "16", "choice(8, 16)"])
def test_a_round_to_the_user_sets_is_kept(given):
    value, values = _round_to(
        "search.objectives=[val_acc,speedup]", f"space.structured.round_to={given}"
    )
    if given.startswith("choice"):
        assert values["structured.round_to"].choices == (8, 16)
    else:
        assert value == values["structured.round_to"] == int(given)


@pytest.mark.parametrize("bad", ["0", "aut", "8.5", "choice(auto, 8)", "choice(0, 8)", "true"])
def test_a_bad_round_to_is_refused_up_front_naming_the_key_and_the_values_allowed(bad):
    with pytest.raises(ConfigError) as err:
        _round_to("search.objectives=[val_acc,speedup]", f"space.structured.round_to={bad}")
    message = str(err.value)
    assert "'structured.round_to'" in message
    assert "'auto'" in message and "an int in [1, 4096]" in message


# Slow lane (a sweep, `squeeze export` and `squeeze run`: 5 s CPU); CI runs it. The fast lane
# keeps how the block is chosen (the tests above), the continued study told the block it
# ran with (below) and test_reuse.py's export-then-run reproducing a trial exactly.
@pytest.mark.slow
def test_the_chosen_block_is_logged_exported_and_rerun_on_another_cpu(
    tmp_path, cache_dir, monkeypatch
):
    overrides = structured_quant_overrides(
        tmp_path, cache_dir, "search.n_trials=1", "search.objectives=[val_acc,speedup]"
    )
    block = cpu_block().value
    run_sweep(compose_config(overrides))
    study = load_study(compose_config(overrides), "digits_mlp")
    trial = study.trials[0]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    params = client.get_run(trial.user_attrs["mlflow_run_id"]).data.params
    assert params["structured.round_to"] == str(block)  # the trial's logged recipe
    saved = yaml.safe_load((tmp_path / "trials" / "digits_mlp" / "config.yaml").read_text())
    assert saved["space"]["structured"]["round_to"] == block

    conf = tmp_path / "conf"
    export = ["export", "--study", "digits_mlp", "--pick", "trial=0", "--name", "fast"]
    assert main([*export, "--config-dir", str(conf), *overrides]) == 0
    exported = yaml.safe_load((conf / "experiment" / "fast.yaml").read_text())
    assert exported["space"]["structured"]["round_to"] == block

    # rerun where the CPU has another block: the exported number is used, and the trial is
    # reproduced exactly
    other = AVX2 if block == 16 else AVX512
    monkeypatch.setattr(blocks, "cpu_flags", lambda: frozenset(other))
    assert cpu_block().value != block
    rerun = compose_config(["experiment=fast", *overrides], config_dirs=[conf])
    assert (
        plan_sweep(rerun, connect=False).space.values("structured")["structured.round_to"] == block
    )
    assert main(["run", "--config-dir", str(conf), "experiment=fast", *overrides]) == 0
    version = client.get_model_version_by_alias("fast", "champion")
    run = client.get_run(version.run_id).data
    assert run.metrics["val_acc"] == trial.user_attrs["metrics"]["val_acc"]
    assert run.metrics["size_bytes"] == trial.user_attrs["metrics"]["size_bytes"]


def test_a_study_continued_where_auto_gives_another_block_is_told_the_value_it_ran_with(
    tmp_path, monkeypatch
):
    overrides = [
        "search.objectives=[val_acc,speedup]",
        f"search.storage={tmp_path}/optuna.journal",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    monkeypatch.setattr(blocks, "cpu_flags", lambda: frozenset(AVX2))
    plan = plan_sweep(compose_config(overrides), connect=False)
    study = optuna.create_study(
        study_name=plan.study_name,
        storage=open_study_storage(plan),
        directions=list(plan.directions),
    )
    claim_study(study, plan)
    assert study.user_attrs["auto_params"] == {"structured.round_to": 8}
    monkeypatch.setattr(blocks, "cpu_flags", lambda: frozenset(AVX512))  # another machine
    with pytest.raises(
        ConfigError,
        match=r"continue it on this machine with "
        r"space\.structured\.round_to=8\.$",
    ) as err:
        claim_study(study, plan_sweep(compose_config(overrides), connect=False))
    assert "structured.round_to is 8, this config's 16" in str(err.value)
    # as told: the same study (its fingerprint), on the machine whose auto differs
    again = plan_sweep(compose_config([*overrides, "space.structured.round_to=8"]), connect=False)
    claim_study(study, again)
