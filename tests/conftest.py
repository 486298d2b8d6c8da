"""Shared fixtures: real data, a real trained baseline, cached once per test session."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import sqlalchemy

from experiments import load_or_train_baseline
from experiments.digits import digits_mlp

PG_URL = os.environ.get(
    "SQUEEZE_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
#: The config a sweep of conf/task/digits_mlp.yaml keys its baseline on (its plan's task_kwargs;
#: tests/test_lane.py checks they agree): the `digits_baseline` fixture and the sweeps of a
#: session share one trained baseline instead of training the same weights twice.
DIGITS_CONFIG = {
    "name": "digits_mlp",
    "val_fraction": 0.2,
    "test_fraction": 0.2,
    "hidden": [300, 100],
    "train": {"epochs": 40, "batch_size": 64, "lr": 0.001},
    "seed": 0,
}


@pytest.fixture(scope="session", autouse=True)
def _torch_on_one_thread():
    """Torch on one intra-op thread for the whole session (tests that need more set them): two
    threads on two shared cores stall each other, and with ``pytest -n 2`` each worker has a
    core. The digits baseline trains in 16 s on one thread and 190 s on two on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Cases of parametrized tests that take over 4.5 s on 2 cores: the slow lane runs them, their
#: sibling cases stay in the fast lane (`pytest -m "not slow"`).
SLOW_CASES = {
    "test_any_model.py::test_a_two_trial_sweep_with_the_default_space_through_config_dir[minilm]",
    "test_explain.py::test_every_family_is_explained_and_attributes_like_itself[cnn1d]",
    "test_workloads.py::test_a_two_trial_sweep_runs_on_each_workload[wl_dict_bert]",
    "test_onnx.py::test_every_family_exports_its_codes_and_runs_like_the_torch_model[gru]",
    "test_hf_zoo.py::test_every_hf_architecture_deploys_to_onnx[gpt2-quant4]",
    "test_hf_zoo.py::test_every_hf_architecture_deploys_to_onnx[distilbert-quant4]",
    "test_minilm.py::test_packed_file_round_trips_bit_exactly_into_a_fresh_minilm[4bit-emb4]",
    "test_hf_zoo.py::test_every_hf_architecture_deploys_to_onnx[bert-quant4]",
    "test_onnx.py::test_every_family_exports_its_codes_and_runs_like_the_torch_model[tied]",
    "test_onnx.py::test_every_family_exports_its_codes_and_runs_like_the_torch_model[lstm]",
    "test_zoo_tasks.py::test_zoo_baseline_trains_and_caches_to_its_floor[zoo_minilm]",
    # 2-5 s each on a loaded machine; what stays in the lane covers what each one checks:
    # allocate's table on linears: gpt2's transposed ones here, test_allocate.py's, the zoo's
    "test_hf_zoo.py::test_every_compressor_on_every_hf_architecture[bert-allocate]",
    "test_hf_zoo.py::test_every_compressor_on_every_hf_architecture[distilbert-allocate]",
    "test_hf_zoo.py::test_every_compressor_on_every_hf_architecture[vit-allocate]",
    # MobileNetV2's 17 blocks: its structured and 4-bit cells stay; every method on depthwise
    # convolutions: test_any_model.py's zoo mobilenet
    "test_hf_zoo.py::test_every_compressor_on_every_hf_architecture[mobilenet_v2-prune]",
    "test_hf_zoo.py::test_every_compressor_on_every_hf_architecture[mobilenet_v2-cluster]",
    "test_hf_zoo.py::test_every_compressor_on_every_hf_architecture[mobilenet_v2-lowrank]",
    "test_hf_zoo.py::test_every_compressor_on_every_hf_architecture[mobilenet_v2-kd]",
    "test_hf_zoo.py::test_every_compressor_on_every_hf_architecture[mobilenet_v2-int8]",
    # float graphs: resnet's stays; vit's 4-bit graph stays
    "test_hf_zoo.py::test_every_hf_architecture_deploys_to_onnx[vit-float]",
    # the digits MLP's graph: every other test of test_onnx.py exports one; resnet's graph:
    # test_hf_zoo.py's resnet deployments
    "test_onnx.py::test_every_family_exports_its_codes_and_runs_like_the_torch_model[mlp]",
    "test_onnx.py::test_every_family_exports_its_codes_and_runs_like_the_torch_model[resnet]",
    # two inputs: the 4-bit export stays (float graphs and 8-bit codes: every other test)
    "test_onnx.py::test_a_model_of_several_or_keyword_inputs_deploys_and_runs_like_the_torch_model"
    "[wl_two_inputs-float]",
    "test_onnx.py::test_a_model_of_several_or_keyword_inputs_deploys_and_runs_like_the_torch_model"
    "[wl_two_inputs-quant8]",
    # a language model's sweep (3.7 s CPU, its 6-epoch baseline): its compressor cells, the
    # per-position scoring and inspect tests of test_workloads.py and the other workloads'
    # sweeps stay
    "test_workloads.py::test_a_two_trial_sweep_runs_on_each_workload[wl_tokens]",
}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.nodeid.removeprefix("tests/") in SLOW_CASES:
            item.add_marker(pytest.mark.slow)


#: Modules that build the same session-cached work as another module run on its worker: the zoo
#: baselines test_zoo_tasks.py trains are those test_any_model.py's cells and sweeps use.
SAME_WORKER = {"tests/test_zoo_tasks.py": "tests/test_any_model.py"}


def xdist_scope(nodeid: str) -> str:
    """The unit of work ``pytest -n`` gives one worker whole: the test's module, or the module
    `SAME_WORKER` runs it with."""
    module = nodeid.split("::", 1)[0]
    return SAME_WORKER.get(module, module)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """``pytest -n 2``: each test module runs whole on one worker (xdist's ``loadscope``, the
    units with the most tests first; `xdist_scope`) instead of in chunks that split a module
    between the workers, which then both build its module-scoped sweep, its cached baselines and
    models. Another ``--dist`` than the default ``load`` is left as asked."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class _ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return _ByModule(config, log)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def digits_task():
    return digits_mlp(**DIGITS_CONFIG)


@pytest.fixture(scope="session")
def digits_baseline(digits_task, cache_dir):
    return load_or_train_baseline(digits_task, config=DIGITS_CONFIG, cache_dir=cache_dir, seed=0)


@functools.cache
def _empty_mlflow_db() -> Path:
    """An MLflow SQLite store as MLflow creates it (every migration run, the Default experiment),
    made once per session: creating one takes 1-5 s of schema migrations on this machine."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="squeeze-test-mlflow-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


def study_runs(uri: str, *, max_results: int = 1000):
    """``(client, parents, children)``: a tracking store's squeeze runs, the studies' parent runs
    and the trials' child runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("squeeze")
    runs = client.search_runs([experiment.experiment_id], max_results=max_results)
    parents = [r for r in runs if r.data.tags.get("squeeze.role") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def sweep_overrides(
    tmp_path,
    cache_dir,
    *extra: str,
    storage: str | None = None,
    fresh_mlflow: bool = False,
    space: str | None = "wide",
) -> list[str]:
    """Overrides that keep a sweep small and inside ``tmp_path`` (cache shared by the session),
    on the wide space by default (``space=None``: the one the task or experiment names).

    ``tmp_path/mlflow.db`` starts as a copy of an empty MLflow store made once per session, unless
    it exists or ``fresh_mlflow`` asks the sweep to create it (as a first sweep does)."""
    if not fresh_mlflow and not (Path(tmp_path) / "mlflow.db").exists():
        shutil.copyfile(_empty_mlflow_db(), Path(tmp_path) / "mlflow.db")
    return [
        f"search.storage={storage or f'{tmp_path}/optuna.journal'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"cache_dir={cache_dir}",
        f"output_dir={tmp_path}/trials",
        *([f"space={space}"] if space else []),  # wide: every compressor's knob searched
        "space.finetune.epochs=2",
        "measure.latency_repeats=3",
        "threads=1",  # torch's spinning thread pool is many times slower on a busy 2-core machine
        *extra,
    ]


def structured_quant_overrides(tmp_path, cache_dir, *extra: str, **kwargs) -> list[str]:
    """`sweep_overrides` of two trials of structured 0.5 then quantization (``space.quant.bits``
    4 unless ``extra`` says otherwise) on digits, timed at batch 1 unless ``extra`` says."""
    return sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=2",
        "space.pipeline=[structured,quant]",
        "space.structured.amount=0.5",
        "space.quant.bits=4",
        "measure.latency_batch_sizes=[1]",
        *extra,  # (Hydra: the last override of a key wins)
        **kwargs,
    )


@pytest.fixture
def pg_url():
    """The PostgreSQL server every machine here runs; CI must reach it (fail, not skip)."""
    try:
        with sqlalchemy.create_engine(PG_URL).connect():
            pass
    except sqlalchemy.exc.OperationalError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_URL} must be reachable in CI: {err}")
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    return PG_URL


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests (``pytestmark = usefixtures("one_thread")``):
    two threads on two shared cores can stall each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
