"""Parallel evaluation on Ray: 2 local CPU workers give the serial run's genomes and best; a worker killed mid-candidate
is replaced and its genome re-queued; a parallel run killed mid-batch resumes exactly; ``evaluator.ray_address``
joins a cluster the test starts itself (``ray start`` on loopback, its own port and folder, stopped afterwards) and
gives the serial run's rows. One local Ray instance serves the other tests (its start-up takes seconds). And the
Hydra launcher configs compose.

Ray and the launchers are the extras ``eep[ray,launchers]``: missing, these tests are skipped with a reason, except
where ``EEP_REQUIRE_EXTRAS=1`` (CI sets it), where a missing extra is an error."""
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from eep.genome import Genome
from eep.search.state import Phase, SearchState, load_checkpoint, run_plan, save_checkpoint
from eep.search.strategy import EEPSettings

from eep.parallel import RayPool


def optional(module: str):
    """``module`` imported, or None (tests needing it skip) unless EEP_REQUIRE_EXTRAS is set (CI)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("EEP_REQUIRE_EXTRAS"):
            raise
        return None


ray = optional("ray")
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'eep[ray]')")
if ray is not None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module


@pytest.fixture(scope="module")
def _module_ray():
    """Shuts the module's local Ray instance down after the last test of the module."""
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray(_module_ray):
    """One local Ray instance (2 CPUs) shared by the Ray tests of the module (started again if a test that joins a
    cluster shut it down)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        _LOCAL_RAY_STARTED.append(True)
    yield


_LOCAL_RAY_STARTED = []  # Ray 2.60: a process that ran a local instance cannot then start actors on a cluster it
# joins (they are cancelled before they start: "all references to the actor were removed"); the cluster test runs
# before the module's other Ray tests (file order). A local instance after a cluster, or after another, works.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "ray")  # the venv's, also when it is not on PATH
    return beside if os.path.exists(beside) else shutil.which("ray")


@pytest.fixture
def ray_cluster(_module_ray):
    """A one-node Ray cluster of this test's own: ``ray start --head --block`` on loopback with a free port, its own
    short temporary folder (Ray's unix socket paths must stay under ~107 characters) and a custom resource
    ``eep_test_cluster`` that tells it from any other Ray instance. Yields ``(address, resource)``; afterwards the
    processes it started (its own process group) are stopped and its folder
    removed. ``RAY_AUTH_MODE=disabled``: Ray 2.60's ``ray start`` turns token authentication on whenever
    ``~/.ray/auth_token`` exists (any earlier local ``ray.init()`` writes one), while a driver given an explicit
    address only sends a token when ``RAY_AUTH_MODE=token`` is set; the test does not depend on that file."""
    assert not _LOCAL_RAY_STARTED, "run the cluster test before the tests that start a local Ray (file order)"
    if ray.is_initialized():  # a Ray this process joined before: ``eep.parallel.connect`` would reuse it
        ray.shutdown()
    port, folder = _free_port(), tempfile.mkdtemp(prefix="eepray", dir="/tmp")
    resource = "eep_test_cluster"
    out = open(os.path.join(folder, "ray_start.log"), "w")
    proc = subprocess.Popen(
        [_ray_cli(), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--temp-dir={folder}", "--num-cpus=2", f"--resources={json.dumps({resource: 1})}",
         "--include-dashboard=false", "--disable-usage-stats"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in open(out.name).read():
            assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{open(out.name).read()}"
            assert time.monotonic() < deadline, f"ray start not ready after 180 s:\n{open(out.name).read()}"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", resource
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop_group(proc)
        out.close()
        shutil.rmtree(folder, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group that ``proc`` leads (``ray start`` and every process it started: GCS, raylet,
    agents, workers), SIGKILL to what is left of it after 10 s; wait until the group is gone."""
    proc_group = proc.pid
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc_group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            try:
                os.killpg(proc_group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def fitness(genome: Genome) -> float:
    kept = [set(genome.kept(i) or []) for i in range(genome.num_layers)]
    return sum(len({0, 1, 2, 3} & k) for k in kept) / 8 - float(genome.merge.abs().mean()) / 10


def rows(state: SearchState) -> list[tuple[str, float, str]]:
    """The archive in commit order: genome hash, fitness, phase."""
    return [(key, fitness, phase) for key, (fitness, _, phase) in state.archive.entries.items()]


def new_state(ask_batch: int = 2) -> SearchState:
    return SearchState(plan=(Phase("prune", "eep", 12), Phase("merge", "eep", 6)),
                       template=Genome.pruning([[0, 1, 2, 3]] * 2, 8, 2), seed=3, settings=EEPSettings(population=5),
                       ask_batch=ask_batch)


def _first(flag: str) -> bool:
    """True for the one process that creates ``flag`` (atomically: both workers may reach it at once)."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def cheap_worker(flag: str, victim: int):
    """A worker's scorer: the synthetic fitness, a little slow; while ``flag`` does not exist, the ``victim``-th
    genome it scores kills its own process (SIGKILL) mid-candidate, once."""
    scored = []

    def score(genome):
        scored.append(genome)
        if len(scored) == victim and _first(flag):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
        return fitness(genome)

    return score


@needs_ray
def test_eep_search_joins_a_ray_cluster_at_ray_address(ray_cluster, serial_search, tmp_path, caplog, monkeypatch):
    """``evaluator.workers=2 evaluator.ray_address=127.0.0.1:<port>`` joins the cluster this test started (the
    driver's Ray sees the cluster's own custom resource, so no local instance was started instead), scores on its 2
    CPUs and gives the serial ``search.ask_batch=2`` run's rows (same genomes in the same order, same fitness and
    metrics) and best; the driver leaves the cluster afterwards (and the cluster, not the driver, is stopped by the
    fixture)."""
    address, resource = ray_cluster
    joined, real_init = [], ray.init

    def init(*args, **kwargs):  # the real ray.init; records what the driver connected to
        context = real_init(*args, **kwargs)
        joined.append((kwargs.get("address"), ray.cluster_resources()))
        return context

    monkeypatch.setattr(ray, "init", init)
    with caplog.at_level(logging.INFO, logger="eep.parallel"):
        report, rows, best = search(tmp_path, "evaluator.workers=2", f"evaluator.ray_address={address}")
    assert f"joining the Ray cluster at {address}" in caplog.text
    assert len(joined) == 1 and joined[0][0] == address
    assert joined[0][1].get(resource) == 1 and joined[0][1].get("CPU") == 2
    assert not ray.is_initialized()
    serial_report, serial_rows, serial_best = serial_search
    assert len(serial_rows) == 9 and rows == serial_rows and best == serial_best
    assert report["workers"] == 2 and report["worker_restarts"] == []


@needs_ray
def test_a_worker_killed_mid_candidate_is_replaced_and_the_run_equals_the_serial_one(local_ray, tmp_path, caplog):
    serial = run_plan(new_state(), fitness)
    flag = str(tmp_path / "killed")
    with caplog.at_level(logging.WARNING, logger="eep.parallel"), \
            RayPool(lambda: cheap_worker(flag, victim=3), workers=2, threads=1) as pool:
        parallel = run_plan(new_state(), pool)
        assert os.path.exists(flag) and len(pool.events) == 1
    assert parallel.finished and len(rows(serial)) == 18 and rows(parallel) == rows(serial)
    assert parallel.archive.best()[1] == serial.archive.best()[1]
    assert "died while evaluating genome" in caplog.text and "re-queueing" in caplog.text


@needs_ray
def always_dies_on(kept: list[int]):
    """A worker's scorer that kills its process whenever it scores a genome keeping ``kept`` in layer 0."""

    def score(genome):
        if genome.kept(0) == kept:
            os.kill(os.getpid(), signal.SIGKILL)
        return fitness(genome)

    return score


@needs_ray
def test_a_genome_that_keeps_killing_workers_stops_the_search_with_worker_lost(local_ray):
    from eep.parallel import WorkerLost

    killer, done = Genome.pruning([[4, 5, 6, 7]] * 2, 8, 2), []
    with RayPool(lambda: always_dies_on([4, 5, 6, 7]), workers=2, threads=1, max_retries=2) as pool:
        with pytest.raises(WorkerLost, match="killed 2 Ray workers in a row"):
            pool.run([killer], lambda g, r: done.append(r))
        assert [e["genome_hash"] for e in pool.events] == [killer.content_hash()] * 2 and done == []


@needs_ray
def test_a_parallel_run_killed_mid_batch_resumes_to_the_uninterrupted_result(local_ray, tmp_path):
    full = run_plan(new_state(), fitness)
    path, saves = tmp_path / "state.pkl", [0]

    class Killed(Exception):
        pass

    def dying_checkpoint(state):
        save_checkpoint(state, path)
        saves[0] += 1
        if saves[0] == 20:  # the driver dies part-way through the search
            raise Killed

    with RayPool(lambda: cheap_worker(str(tmp_path / "no-kill"), victim=0), workers=2, threads=1) as pool:
        with pytest.raises(Killed):
            run_plan(new_state(), pool, checkpoint=dying_checkpoint)
        state = load_checkpoint(path)
        assert not state.finished and 0 < len(state.archive.entries) < 18
        resumed = run_plan(state, pool, checkpoint=lambda s: save_checkpoint(s, path))
    assert len(rows(full)) == 18 and rows(resumed) == rows(full)
    assert resumed.archive.best()[1] == full.archive.best()[1] and load_checkpoint(path).finished


TINY_SEARCH = ["model=skills_olmoe", "task=skills_count", "search.num_experts=8", "search.prune_budget=7",
               "search.merge_budget=2", "search.eep.population=3", "evaluator.limit=20",
               "evaluator.validation_limit=10", "evaluator.test_limit=10", "search.final_candidates=1",
               "evaluator.threads=1"]


def search(folder, *extra: str) -> tuple[dict, list, dict]:
    """One tiny eep-search run in ``folder`` through ``eep.app.search.run``: its report, its rows (genome hash,
    fitness, metrics, in file order) and best.json."""
    from conftest import compose_config

    from eep.app import search as app

    report = app.run(compose_config("eep_search", [*TINY_SEARCH, *extra]), folder)
    rows = [(r["genome_hash"], r["fitness"], r["metrics"])
            for r in map(json.loads, (folder / "evaluations.jsonl").read_text().splitlines())]
    return report, rows, json.loads((folder / "best.json").read_text())


@pytest.fixture(scope="module")
def serial_search(tmp_path_factory):
    """The serial reference: ``search.ask_batch=2``, one process."""
    return search(tmp_path_factory.mktemp("serial"), "search.ask_batch=2")


@needs_ray
def test_eep_search_with_two_workers_evaluates_the_serial_runs_genomes(local_ray, serial_search, tmp_path):
    """``evaluator.workers=2 evaluator.threads=1`` = ``search.ask_batch=2 evaluator.threads=1``: the same rows (in ask
    order, same fitness and metrics), best genome and fitness; report.json records the workers."""
    serial_report, serial_rows, serial_best = serial_search
    report, rows, best = search(tmp_path, "evaluator.workers=2")
    assert len(serial_rows) == 9 and rows == serial_rows
    assert len({fitness for _, fitness, _ in rows}) > 1  # the rows tell candidates apart: the comparison can fail
    assert best == serial_best
    assert report["workers"] == 2 and serial_report["workers"] == 1
    assert report["worker_restarts"] == []


@pytest.mark.parametrize("launcher, plugin, target", [
    ("joblib_cpu", "hydra_plugins.hydra_joblib_launcher", "joblib_launcher.JoblibLauncher"),
    ("slurm_gpu", "hydra_plugins.hydra_submitit_launcher", "submitit_launcher.SlurmLauncher"),
])
def test_launcher_configs_compose_with_sweeps_under_runs(launcher, plugin, target):
    """``hydra/launcher=joblib_cpu`` and ``=slurm_gpu`` compose and build their launcher (no SLURM needed to build
    it); sweep folders go under runs/multirun/."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import eep

    if optional(plugin) is None:
        pytest.skip(f"{plugin} is not installed (pip install 'eep[launchers]')")
    with initialize_config_dir(version_base="1.3", config_dir=str(eep.conf_dir())):  # with the hydra node
        cfg = compose(config_name="eep_search", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == f"{plugin}.{target}"
    assert cfg.hydra.sweep.dir.startswith("runs/multirun/")
    assert type(instantiate(cfg.hydra.launcher)).__name__ == target.split(".")[-1]
    if launcher == "slurm_gpu":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.submitit_folder.startswith("runs/")
