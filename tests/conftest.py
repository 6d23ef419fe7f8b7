"""Test-wide setup.

Triton kernels run under the interpreter on machines without a GPU. TRITON_INTERPRET must be
set before any module that defines a @triton.jit kernel is imported, so it is set here, at
collection time, before the tests import fastcog.kernels.
"""

import os
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tier 2); run with -m gpu")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # GPU tests are reported as skipped with a reason, never silently dropped.
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="tier-2 GPU test: no CUDA device here (run with -m gpu on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Factory: the path of a tiny random checkpoint of a variant, built once per pytest session."""
    from fastcog.models import make_tiny

    built: dict[str, object] = {}

    def get(variant: str):
        if variant not in built:
            built[variant] = make_tiny(variant, tmp_path_factory.mktemp(variant.replace(".", "_")))
        return built[variant]

    return get


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory):
    """4 synthetic clips (9 frames, 64x96, first-frame images listed in images.txt), written once per pytest session.

    Every module that trains the tiny models in this process or under torchrun reads them, with their
    latent cache in `clips / "cache"` (tests/runs.py's make_cfg, tests/torchrun.py's raw_config): each
    (model, dtype, seed, ...) is encoded once per pytest session, by the first run that needs it.
    """
    from fastcog.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("clips")
    return make_synthetic_dataset(root, num_clips=4, num_frames=9, height=64, width=96, seed=0, with_images=True)


@pytest.fixture(scope="session")
def torchrun_data(tiny_checkpoint, clips, tmp_path_factory) -> dict[str, str]:
    """Paths for tests/torchrun.py's raw_config: the tiny 5B model, the session's clips and their cache,
    and a folder for the runs' outputs. The fp32 latents are cached here, before any launch, so ranks only
    read them."""
    import torch

    from fastcog.config import config_from_dict
    from fastcog.inputs import check_inputs, prepare_dataset
    from tests.torchrun import raw_config

    root = tmp_path_factory.mktemp("torchrun")
    paths = {"model": str(tiny_checkpoint("cogvideox-5b")), "clips": str(clips), "cache": str(clips / "cache"),
             "root": str(root)}
    cfg = config_from_dict(raw_config(paths, root / "prepare"))
    variant, samples = check_inputs(cfg)
    prepare_dataset(cfg, samples, variant, torch.device("cpu"))
    return paths


@pytest.fixture(scope="session")
def background():
    """The thread that runs the suite's background launches one after another (tests/torchrun.py's
    Background; see start_common_launches_early)."""
    from tests.torchrun import Background

    runner = Background()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def four_rank_started(torchrun_data, background, tmp_path_factory):
    """The suite's 4-rank work in one torchrun launch (starting 4 ranks on a 2-core machine costs more
    than either job), queued in the background: `hsdp`, test_distributed's HSDP training run, and
    `fp8_worker`, test_fp8_fsdp's FP8 sharding worker (tests/fp8_runs.py) as HSDP (replicate degree
    2). CPU and gloo even where a GPU is visible. (folder of the runs, Future of the outcomes)."""
    from tests.fp8_runs import HSDP_FP8_KIND
    from tests.torchrun import Call, hsdp_config

    root = tmp_path_factory.mktemp("four_rank_runs")
    (root / "fp8_worker").mkdir()
    runs = {"hsdp": hsdp_config(torchrun_data, root / "hsdp"),
            "fp8_worker": Call("tests.fp8_runs:worker", [str(root / "fp8_worker"), torchrun_data["model"], "2",
                                                         HSDP_FP8_KIND])}
    return root, background.submit(runs, root, nproc=4, cpu_only=True, background=True)


@pytest.fixture(scope="session")
def four_rank_runs(four_rank_started) -> dict:
    """four_rank_started's launch, ended: name -> (output folder, Outcome)."""
    root, launch = four_rank_started
    return {name: (root / name, outcome) for name, outcome in launch.result().items()}


@pytest.fixture(scope="session")
def one_rank(torchrun_data) -> Path:
    """test_distributed's reference run: one process, batch 2, 12 steps, checkpoints every 4 (its
    checkpoint-4 also starts a 2-rank resume in two_rank_launch). The output folder."""
    from tests.torchrun import in_process, raw_config

    out = Path(torchrun_data["root"]) / "one_rank"
    in_process(raw_config(torchrun_data, out))
    return out


@pytest.fixture(scope="session")
def two_rank_started(torchrun_data, one_rank, background, tmp_path_factory):
    """The suite's 2-rank runs that need nothing but 2 ranks, in one torchrun launch (each launch pays
    ~6 s to start its ranks), queued in the background: the runs of the groups `distributed`
    (tests/distributed_runs.py's two_rank_plan), `fp8` (tests/fp8_runs.py's) and `reliability`
    (tests/reliability/rank_workers.py's), in this order. (root, plans, Futures of the outcomes).

    fp8 and reliability run on CPU with gloo even where a GPU is visible (the fp8 tolerances were
    measured there); distributed's runs use a visible GPU as `fastcog train` would, so with one they
    get a launch of their own. One fresh compile cache for the launch, which distributed's low-bit
    optimizer runs share in their order (see test_torchao_low_bit_optimizers_under_fsdp_equal_one_process).
    """
    from tests.distributed_runs import two_rank_plan as distributed_plan
    from tests.fp8_runs import two_rank_plan as fp8_plan
    from tests.reliability.rank_workers import two_rank_plan as reliability_plan

    root = tmp_path_factory.mktemp("two_rank_launch")
    plans = {"distributed": distributed_plan(torchrun_data, one_rank, root / "distributed"),
             "fp8": fp8_plan(torchrun_data, root / "fp8"),
             "reliability": reliability_plan(torchrun_data, root / "reliability")}
    groups = [(["distributed"], False), (["fp8", "reliability"], True)] if _HAS_CUDA else [(list(plans), True)]
    launches = []
    for i, (names, cpu_only) in enumerate(groups):
        runs = {f"{group}.{name}": run for group in names for name, run in plans[group].items()}
        launches.append(background.submit(runs, root / f"launch{i}", cpu_only=cpu_only, background=True,
                                          env_vars={"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}))
    return root, plans, launches


@pytest.fixture(scope="session")
def two_rank_launch(two_rank_started) -> dict:
    """two_rank_started's launch, ended: group -> (folder of its runs, name -> Outcome)."""
    root, plans, launches = two_rank_started
    outcomes = {}
    for launch in launches:
        outcomes |= launch.result()
    return {group: (root / group, {name: outcomes[f"{group}.{name}"] for name in plan})
            for group, plan in plans.items()}


@pytest.fixture(scope="session")
def low_bit_started(torchrun_data, background, tmp_path_factory):
    """test_distributed's torchao references (tests/distributed_runs.py's low_bit_references) in one
    process, with a fresh compile cache of their own, started: a launch of one rank (WORLD_SIZE 1, so
    `train` runs as in this process). Most of its time is compiling the optimizers' steps, on one
    core, so it is queued in the background as the common launches are. (folder of the runs, Future
    of the outcomes)."""
    from tests.distributed_runs import low_bit_references

    root = tmp_path_factory.mktemp("low_bit_references")
    return root, background.submit(low_bit_references(torchrun_data, root), root / "launch", nproc=1,
                                   background=True,
                                   env_vars={"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")})


@pytest.fixture(scope="session")
def low_bit_references(low_bit_started) -> Path:
    """low_bit_started's runs, ended, each finished: the folder of their output folders."""
    root, launch = low_bit_started
    for name, outcome in launch.result().items():
        assert outcome.status == 0, (name, outcome.stderr[-3000:])
    return root


@pytest.fixture(scope="session", autouse=True)
def start_common_launches_early(request: pytest.FixtureRequest) -> None:
    """A session that will use the common torchrun launches starts them before its first test. They run
    beside the tests before their first user, on the core those mostly leave idle: one at a time and at
    the lowest priority, because anything more slows the tests (measured: beside all three at nice 10 the
    Triton-interpreter kernel tests run 4x slower, and beside one at nice 10 the CLI subprocess tests
    2.5x slower)."""
    used = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    for started, user in (("two_rank_started", "two_rank_launch"), ("low_bit_started", "low_bit_references"),
                          ("four_rank_started", "four_rank_runs")):
        if user in used:
            request.getfixturevalue(started)


@pytest.fixture(scope="session")
def gpu_suite_dry_run(tmp_path_factory: pytest.TempPathFactory):
    """bench/gpu_suite.py's CPU dry run, once per session (tests/suite_dry_run.py says who reads it)."""
    from tests.suite_dry_run import run_dry_suite

    return run_dry_suite(tmp_path_factory.mktemp("gpu_suite"))
