"""The communicator seam's pieces in one process: the environment, sharding, synchronised batch norm's math.

Ranks are threads here (:class:`ThreadRanks`, collectives over a barrier), so the math is checked without
processes; tests/test_data_parallel.py runs real ranks through torch.distributed.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from xpcnn import functional as F
from xpcnn import nn
from xpcnn.apps import launch as launch_module
from xpcnn.apps.launch import GRACE, child_arguments, end_with_launcher, launch, rank_environment
from xpcnn.backends import distributed as D
from xpcnn.backends.backend import get_backend
from xpcnn.backends.ranks import join
from xpcnn.base.errors import ConfigError
from xpcnn.nn import BatchNorm2d, Conv2d, Flatten, Linear, ReLU, Sequential


class ThreadRanks:
    """``world_size`` communicators whose collectives meet at a barrier: one per thread."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=10)
        self._slots = [None] * world_size

    def communicator(self, rank: int) -> D.Communicator:
        ranks = self

        class Threaded(D.Communicator):
            def all_reduce_sum(self, array):
                ranks._slots[rank] = np.array(array)
                ranks._barrier.wait()
                total = sum(ranks._slots[1:], ranks._slots[0].copy())
                ranks._barrier.wait()
                array[...] = total
                return array

            def broadcast(self, array):
                ranks._slots[rank] = np.array(array)
                ranks._barrier.wait()
                root = ranks._slots[0].copy()
                ranks._barrier.wait()
                array[...] = root
                return array

        threaded = Threaded()
        threaded.rank, threaded.world_size = rank, self.world_size
        return threaded

    def run(self, work):
        """``work(rank, communicator)`` on every rank at once; the results in rank order."""
        results, errors = [None] * self.world_size, []

        def target(rank):
            try:
                results[rank] = work(rank, self.communicator(rank))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors, errors
        return results


# ---------------------------------------------------------------- the environment


def test_no_launcher_variables_mean_one_rank_alone():
    assert D.rank_from_environment({}) == D.Placement(0, 1, None, "none")


@pytest.mark.parametrize(
    "environ, launcher",
    [
        ({"XPCNN_RANK": "1", "XPCNN_WORLD_SIZE": "2", "XPCNN_RENDEZVOUS": "/tmp/r"}, "xpcnn"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "torchrun"),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "XPCNN_RENDEZVOUS": "/r"}, "mpiexec (Open MPI)"),
        ({"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "mpiexec (MPICH)"),
        ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "XPCNN_RENDEZVOUS": "file:///s/r"}, "srun"),
    ],
)
def test_each_launcher_is_read_from_its_variables(environ, launcher):
    placement = D.rank_from_environment(environ)
    assert (placement.rank, placement.world_size, placement.launcher) == (1, 2, launcher)
    expected = "env://" if "MASTER_ADDR" in environ else "file://"
    assert placement.init_method.startswith(expected)


def test_a_sbatch_script_outside_srun_is_one_rank():
    assert D.rank_from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}).world_size == 1


@pytest.mark.parametrize(
    "environ, words",
    [
        ({"RANK": "1", "WORLD_SIZE": "2"}, "no rendezvous"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "must be integers"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "is not a rank"),
        ({"RANK": "0", "WORLD_SIZE": str(2**32), "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "more ranks than the"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT must be"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"}, "MASTER_PORT must be"),
    ],
)
def test_bad_launcher_variables_are_one_clear_error(environ, words):
    with pytest.raises(D.DistributedError, match=words):
        D.rank_from_environment(environ)


def test_jax_ranks_need_no_torch_rendezvous_which_torch_ranks_do():
    placement = D.rank_from_environment({"RANK": "1", "WORLD_SIZE": "2", "XPCNN_COORDINATOR": "h:1234"})
    assert (placement.rank, placement.init_method) == (1, None)
    pytest.importorskip("torch.distributed")
    with pytest.raises(D.DistributedError, match="named no rendezvous"):
        D.TorchCommunicator(placement, timeout=2)


def test_the_timeout_comes_from_the_environment():
    assert D.timeout_seconds({}) == D.DEFAULT_TIMEOUT
    assert D.timeout_seconds({"XPCNN_DIST_TIMEOUT": "7.5"}) == 7.5
    for bad in ("-1", "0.0001", "1e15", "inf", "nan", "soon"):  # torch reads 0 ms as none; 1e15 s overflows
        with pytest.raises(ConfigError, match="XPCNN_DIST_TIMEOUT"):
            D.timeout_seconds({"XPCNN_DIST_TIMEOUT": bad})


def test_a_coordinator_port_in_use_is_one_clear_error_before_jax_starts(monkeypatch):
    """JAX's coordinator listens on every address, and died of a port in use with a segmentation fault."""
    import socket

    from xpcnn.backends import distributed_jax

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not distributed_jax.port_is_free(port)
        monkeypatch.setenv("XPCNN_COORDINATOR", f"127.0.0.1:{port}")
        with pytest.raises(D.DistributedError, match=f"^rank 0: XPCNN_COORDINATOR's port {port} is in use"):
            distributed_jax.initialize(D.Placement(0, 2, None, "torchrun"), 5.0)
        assert launch_module.free_port() != port
    assert distributed_jax.port_is_free(port)


def test_a_port_in_time_wait_is_free_and_a_kernel_without_ipv6_is_probed_on_ipv4(monkeypatch):
    """The coordinator binds a port in TIME_WAIT (a requeued job's fixed port); where the kernel has no IPv6
    (ipv6.disable=1), an IPv6 socket cannot even be made, and --nproc failed on every backend."""
    import socket

    from xpcnn.backends import distributed_jax

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's, a last run's coordinator
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first: its port waits in TIME_WAIT
        client.close()
    assert distributed_jax.port_is_free(port)

    real_socket = socket.socket

    def ipv4_only(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", ipv4_only)
    with real_socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not distributed_jax.port_is_free(listener.getsockname()[1])
    assert distributed_jax.port_is_free(launch_module.free_port())


@pytest.mark.parametrize("address", ["host0", ":1234", "host0:", "host0:http", "host0:0", "host0:70000", "h:\u00b2"])
def test_a_coordinator_address_without_a_usable_port_is_one_clear_error(monkeypatch, address):
    from xpcnn.backends import distributed_jax

    monkeypatch.setenv("XPCNN_COORDINATOR", address)
    with pytest.raises(D.DistributedError, match="XPCNN_COORDINATOR must be rank 0's host:port"):
        distributed_jax.initialize(D.Placement(0, 2, None, "torchrun"), 5.0)


def test_fewer_training_images_than_ranks_is_a_config_error():
    from xpcnn.data.device_data import Normalization
    from xpcnn.training.config import TrainConfig, make_optimizer
    from xpcnn.training.train import start_training

    class TwoRanks(D.Communicator):
        world_size = 2

    from xpcnn.models import build

    model = build("seed")
    config = TrainConfig(model="seed", batch_size=2)
    one = (np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.uint8))
    with pytest.raises(ConfigError, match="1 training image"):
        start_training(
            model,
            make_optimizer(config, model),
            get_backend("numpy"),
            config,
            Normalization(0.1, 0.3),
            one,
            {},
            communicator=TwoRanks(),
        )


def test_a_rendezvous_file_in_a_missing_folder_is_refused_at_once(tmp_path):
    """torch's file store waited 300 s for the folder (an unmounted shared filesystem), deaf to SIGTERM."""
    pytest.importorskip("torch.distributed")
    placement = D.Placement(0, 2, (tmp_path / "unmounted" / "rendezvous").as_uri(), "mpiexec (Open MPI)")
    with pytest.raises(D.DistributedError, match="unmounted is not a directory here"):
        D.TorchCommunicator(placement, timeout=2)


def test_the_rendezvous_folder_is_read_as_torch_reads_the_url(tmp_path):
    """file://localhost/... names a folder on this host; a launcher's folder with a space in it (TMPDIR) reaches
    torch as a path, which it does not decode, not as a URI with %20."""
    assert D.rendezvous_folder("file://localhost/shared/run.rdzv") == "/shared"
    assert D.rendezvous_folder("file:///shared/run.rdzv") == "/shared"
    spaced = tmp_path / "with space" / "rendezvous"
    placement = D.rank_from_environment(rank_environment(1, 2, spaced, environ={}))
    assert D.rendezvous_folder(placement.init_method) == str(spaced.parent)


def test_several_ranks_on_a_backend_without_collectives_are_refused(monkeypatch):
    monkeypatch.setenv("XPCNN_RANK", "0")
    monkeypatch.setenv("XPCNN_WORLD_SIZE", "2")
    monkeypatch.setenv("XPCNN_RENDEZVOUS", "/nonexistent/r")
    with pytest.raises(D.DistributedError, match="numpy, torch and jax backends on the CPU"):
        join(get_backend("array-api-strict"))


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("n, batch, ranks", [(10, 4, 2), (11, 4, 2), (9, 4, 2), (13, 6, 3), (10, 4, 1), (5, 6, 2)])
def test_the_shards_of_every_step_cover_the_usable_images_once(n, batch, ranks):
    usable = D.usable_count(n, batch, ranks)
    assert n - ranks < usable <= n and (ranks > 1 or usable == n)
    taken = []
    for start in range(0, usable, batch):
        stop = min(start + batch, usable)
        shards = [D.shard_bounds(start, stop, r, ranks) for r in range(ranks)]
        assert len({hi - lo for lo, hi in shards}) == 1  # every rank the same number of images
        taken += [i for lo, hi in shards for i in range(lo, hi)]
    assert taken == list(range(usable))


def test_a_batch_that_does_not_split_evenly_is_a_config_error():
    with pytest.raises(ConfigError, match="does not split evenly over 3 ranks") as caught:
        D.check_batch_size(64, 3)
    assert caught.value.setting == "batch_size"
    D.check_batch_size(64, 2)


# ---------------------------------------------------------------- synchronised batch norm


def _halves(array, ranks):
    return np.split(array, ranks)


@pytest.mark.parametrize("shape", [(8, 3), (6, 3, 4, 5)])
def test_sync_batchnorm_over_ranks_equals_batchnorm_over_the_whole_batch(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape)
    grad_y = rng.normal(size=shape)
    weight, bias = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    y, x_hat, inv_std, mean, var = F.batchnorm_forward(x, weight, bias, 1e-5)
    grad_x, grad_w, grad_b = F.batchnorm_backward(grad_y, x_hat, inv_std, weight)
    ranks = ThreadRanks(2)

    def work(rank, comm):
        xr, gr = _halves(x, 2)[rank], _halves(grad_y, 2)[rank]
        yr, hr, sr, mr, vr, count = F.sync_batchnorm_forward(xr, weight, bias, 1e-5, comm.all_reduce_sum, 2)
        back = F.sync_batchnorm_backward(gr, hr, sr, weight, count, comm.all_reduce_sum)
        return yr, mr, vr, count, back

    results = ranks.run(work)
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), y, rtol=1e-12, atol=1e-12)
    for _, mr, vr, count, _ in results:
        np.testing.assert_allclose(mr, mean, rtol=1e-12)
        np.testing.assert_allclose(vr, var, rtol=1e-12)
        assert count == x.size // shape[1]
    np.testing.assert_allclose(np.concatenate([r[4][0] for r in results]), grad_x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sum(r[4][1] for r in results), grad_w, rtol=1e-12)
    np.testing.assert_allclose(sum(r[4][2] for r in results), grad_b, rtol=1e-12)


def test_the_trainers_recalibration_on_ranks_is_one_processs_and_the_librarys_syncs_their_shards():
    """The trainer gives every rank every training image: summed over the ranks, the statistics counted each
    image N times (the unbiased variance's count / (count - 1) with it). nn.recalibrate_batchnorm given each
    rank its shard keeps the ranks' layers in step, as their training does."""
    from xpcnn.data.device_data import DeviceSplit, Normalization
    from xpcnn.training.train import recalibrate_on

    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)

    def recalibrated(communicator, shard=None):
        model = Sequential(Flatten(), Linear(784, 4, rng=np.random.default_rng(0)), nn.BatchNorm1d(4))
        model.to(get_backend("numpy"), np.float64)
        model.set_communicator(communicator)
        labels, norm = np.zeros(8, np.int64), Normalization(0.5, 0.3)
        split = DeviceSplit.from_host(get_backend("numpy"), images, labels, norm, np.float64)
        if shard is None:
            recalibrate_on(model, split, communicator)
        else:
            nn.recalibrate_batchnorm(model, [split.images[shard]])
        assert model[2].communicator is (communicator if communicator and communicator.world_size > 1 else None)
        return {name: np.array(value) for name, value in model[2].buffers.items()}

    alone = recalibrated(None)
    ranks = ThreadRanks(2).run(lambda rank, communicator: recalibrated(communicator))
    shards = ThreadRanks(2).run(lambda rank, communicator: recalibrated(communicator, slice(4 * rank, 4 * rank + 4)))
    for each in ranks + shards:
        for name, value in alone.items():
            np.testing.assert_allclose(each[name], value, rtol=1e-12)


def test_sync_batchnorm_alone_is_batchnorm():
    rng = np.random.default_rng(1)
    x, g = rng.normal(size=(5, 4, 3, 3)), rng.normal(size=(5, 4, 3, 3))
    w, b = rng.normal(size=4), rng.normal(size=4)
    y, x_hat, inv_std, mean, var = F.batchnorm_forward(x, w, b, 1e-5)
    ys, hs, ss, ms, vs, count = F.sync_batchnorm_forward(x, w, b, 1e-5, lambda a: a, 1)
    np.testing.assert_allclose(ys, y, rtol=1e-12, atol=1e-14)
    expected = F.batchnorm_backward(g, x_hat, inv_std, w)
    for got, want in zip(F.sync_batchnorm_backward(g, hs, ss, w, count, lambda a: a), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_sync_batchnorm_gradient_by_central_differences():
    """The global loss sum_r <y_r, c_r> over two ranks, differentiated in x, weight and bias."""
    rng = np.random.default_rng(2)
    x, c = rng.normal(size=(4, 2, 3, 3)), rng.normal(size=(4, 2, 3, 3))
    w, b = rng.normal(size=2), rng.normal(size=2)
    ranks = ThreadRanks(2)

    def loss_and_grads(x, w, b):
        def work(rank, comm):
            y, h, s, _, _, count = F.sync_batchnorm_forward(_halves(x, 2)[rank], w, b, 1e-5, comm.all_reduce_sum, 2)
            cr = _halves(c, 2)[rank]
            return float(np.sum(y * cr)), F.sync_batchnorm_backward(cr, h, s, w, count, comm.all_reduce_sum)

        results = ranks.run(work)
        grad_x = np.concatenate([r[1][0] for r in results])
        grads = (grad_x, sum(r[1][1] for r in results), sum(r[1][2] for r in results))
        return sum(r[0] for r in results), grads

    _, (gx, gw, gb) = loss_and_grads(x, w, b)
    for value, analytic, which in ((x, gx, 0), (w, gw, 1), (b, gb, 2)):
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            step = np.zeros_like(value)
            step[index] = 1e-6
            args = [x, w, b]
            args[which] = value + step
            plus = loss_and_grads(*args)[0]
            args[which] = value - step
            numeric[index] = (plus - loss_and_grads(*args)[0]) / 2e-6
        assert np.max(np.abs(numeric - analytic)) / max(np.max(np.abs(numeric)), 1e-12) <= 1e-6


def _bn_model():
    layers = (
        Conv2d(1, 3, 3, rng=np.random.default_rng(0)),
        BatchNorm2d(3),
        ReLU(),
        Flatten(),
        Linear(3 * 4 * 4, 5, rng=np.random.default_rng(1)),
    )
    return Sequential(*layers).to(get_backend("numpy"), np.float64)


def test_a_training_step_over_thread_ranks_equals_the_step_over_the_whole_batch():
    """Step.train with the ranks' communicator (batch norm's sums, the gradient's mean): one process's step."""
    from xpcnn.nn import CrossEntropyLoss
    from xpcnn.optim import SGD
    from xpcnn.training.step import Step

    rng = np.random.default_rng(3)
    x, labels = rng.normal(size=(8, 1, 6, 6)), rng.integers(0, 5, 8)

    def trained(comm, batch):
        model = _bn_model()
        model.set_communicator(comm)
        optimizer = SGD(model, lr=0.1, momentum=0.9)
        step = Step(model, CrossEntropyLoss(), optimizer, communicator=comm)
        state, _ = step.train(step.state(), x, labels, batch, None, 0.1, 1)
        step.adopt(state)
        return model.state_dict()

    expected = trained(D.Local(), np.arange(8))
    for state in ThreadRanks(2).run(lambda rank, comm: trained(comm, _halves(np.arange(8), 2)[rank])):
        for name, value in expected.items():
            np.testing.assert_allclose(state[name], value, rtol=1e-10, atol=1e-13, err_msg=name)


def test_broadcast_state_gives_every_rank_rank_0s_model():
    def work(rank, comm):
        model = Sequential(Linear(3, 2, rng=np.random.default_rng(rank)))
        D.broadcast_state(model, comm)
        return model.state_dict()

    first, second = ThreadRanks(2).run(work)
    expected = Sequential(Linear(3, 2, rng=np.random.default_rng(0))).state_dict()
    for name in expected:
        np.testing.assert_array_equal(first[name], expected[name])
        np.testing.assert_array_equal(second[name], expected[name])


# ---------------------------------------------------------------- the launcher


def test_each_rank_reruns_the_command_without_nproc_and_with_one_out():
    given = ["--epochs", "2", "--nproc", "2", "-q"]
    assert child_arguments(given, "runs/x") == ["--epochs", "2", "-q", "--out", "runs/x"]
    assert child_arguments(["--nproc=2", "--out", "d"], "runs/x") == ["--out", "d"]
    assert child_arguments(["--resume", "d", "--nproc", "3"], "runs/x") == ["--resume", "d"]


def test_each_rank_gets_its_variables_and_a_share_of_the_threads(tmp_path):
    environ = rank_environment(1, 2, tmp_path / "rendezvous", {})
    assert environ["XPCNN_RANK"] == "1" and environ["XPCNN_WORLD_SIZE"] == "2"
    assert environ["XPCNN_RENDEZVOUS"] == str(tmp_path / "rendezvous")
    assert int(environ["OMP_NUM_THREADS"]) >= 1
    assert rank_environment(0, 2, tmp_path, {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"


def _ranks_exit(code_of_rank_1: str, rank_0: str = "pass") -> list[str]:
    body = f"import os, sys, time\nif os.environ['XPCNN_RANK'] == '1': {code_of_rank_1}\nelse: {rank_0}"
    return [sys.executable, "-c", body]


def test_the_launcher_succeeds_when_every_rank_does():
    lines = []
    assert launch(2, _ranks_exit("pass"), lines.append) == 0
    assert lines == []


def test_a_failed_rank_stops_the_others_within_the_grace_period_with_one_line():
    lines = []
    started = time.monotonic()
    assert launch(2, _ranks_exit("sys.exit(3)", "time.sleep(60)"), lines.append) == 1
    assert time.monotonic() - started < GRACE + 5
    statuses = "rank 0: signal 9 (SIGKILL), rank 1: exit status 3"
    assert lines == [f"Error: rank 1 of 2 failed; every rank has stopped ({statuses})"]


def test_ranks_all_interrupted_are_interrupted():
    assert launch(2, _ranks_exit("sys.exit(130)", "sys.exit(130)"), lambda line: None) == 130


def test_each_rank_has_a_session_of_its_own_and_knows_its_launcher():
    rank = "sys.exit(0 if os.getsid(0) == os.getpid() and os.environ['XPCNN_LAUNCHER_PID'] == str(os.getppid()) else 5)"
    assert launch(2, _ranks_exit(rank, rank), lambda line: None) == 0


def test_a_ctrl_c_to_the_launcher_reaches_every_rank_and_is_no_failure():
    """Rank 1 sends the launcher Ctrl-C; both ranks get it from the launcher and end by it (Python's default
    for an uncaught KeyboardInterrupt: killed by SIGINT), which is a stop, not a failed rank."""
    lines = []
    ctrl_c = "os.kill(os.getppid(), signal.SIGINT); time.sleep(60)"
    started = time.monotonic()
    assert launch(2, _ranks_exit(f"import signal; {ctrl_c}", "time.sleep(60)"), lines.append) == 130
    assert time.monotonic() - started < 30 and lines == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the launcher's handler is gone


def test_a_failure_before_a_ctrl_c_is_still_the_failure():
    lines = []
    ctrl_c_later = "time.sleep(1); import signal; os.kill(os.getppid(), signal.SIGINT); time.sleep(60)"
    assert launch(2, _ranks_exit("sys.exit(3)", ctrl_c_later), lines.append) == 1
    statuses = "rank 0: signal 2 (SIGINT), rank 1: exit status 3"
    assert lines == [f"Error: rank 1 of 2 failed; every rank has stopped ({statuses})"]


def test_a_second_ctrl_c_kills_ranks_that_keep_running_after_the_grace_period():
    deaf = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)"
    twice = f"{deaf}; [os.kill(os.getppid(), signal.SIGINT) or time.sleep(0.2) for _ in range(2)]; time.sleep(60)"
    lines = []
    started = time.monotonic()
    assert launch(2, _ranks_exit(twice, f"{deaf}; time.sleep(60)"), lines.append) == 130
    assert GRACE <= time.monotonic() - started < GRACE + 5
    assert lines == [f"xpcnn: ranks still running {GRACE:g} s after the second Ctrl-C were killed"]


def test_a_rank_asks_linux_for_sigterm_when_its_launcher_ends():
    read_back = (
        "import ctypes, os, sys; from xpcnn.apps.launch import end_with_launcher; "
        "end_with_launcher({'XPCNN_LAUNCHER_PID': sys.argv[1]}); "
        "value = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0); print(value.value)"
    )  # 2: PR_GET_PDEATHSIG
    if not sys.platform.startswith("linux"):
        pytest.skip("a parent-death signal is Linux's")
    launcher = subprocess.run([sys.executable, "-c", read_back, str(os.getpid())], capture_output=True, text=True)
    assert launcher.stdout.strip() == str(int(signal.SIGTERM)), launcher.stderr
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a launcher that ended before its rank asked: the rank stops at once
    assert subprocess.run([sys.executable, "-c", read_back, str(gone.pid)]).returncode == -signal.SIGTERM


@pytest.mark.parametrize("launcher", ["", "x", "-1", "99999999999999999999"])
def test_without_a_launcher_pid_a_process_is_left_alone(launcher):
    end_with_launcher({"XPCNN_LAUNCHER_PID": launcher} if launcher else {})


def test_nproc_checks_the_data_once_before_starting_ranks(tmp_path):
    from click.testing import CliRunner

    from xpcnn.apps.cli import main

    arguments = ["train", "--data-dir", str(tmp_path), "--nproc", "2", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 1
    assert result.output.count("Error:") == 1 and "missing mnist files" in result.output


@pytest.mark.parametrize("images, validation", [(1, "0"), (5, "4")])
def test_nproc_refuses_too_few_training_images_for_its_ranks_once_before_starting_them(
    tmp_path, monkeypatch, images, validation
):
    from click.testing import CliRunner
    from helpers import write_synthetic_mnist

    from xpcnn.apps import launch as launch_module
    from xpcnn.apps.cli import main

    monkeypatch.setattr(launch_module, "launch", lambda *args: pytest.fail("ranks were started"))
    data = write_synthetic_mnist(tmp_path / "data", n_train=images, n_test=5)
    arguments = ["train", "--data-dir", str(data), "--batch-size", "2", "--validation", validation]
    result = CliRunner().invoke(main, [*arguments, "--nproc", "2", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    refusal = "Error: 1 training image(s) for 2 ranks: each rank needs one at least"
    assert result.output.strip().splitlines()[-1] == refusal, result.output


def test_without_torch_several_ranks_are_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    with pytest.raises(D.DistributedError, match=r"pip install 'xpcnn\[distributed\]'"):
        D.TorchCommunicator(D.Placement(0, 2, "file:///nonexistent/r", "xpcnn"), 1.0)


def test_eager_jax_over_several_ranks_is_refused_once_up_front(tmp_path):
    pytest.importorskip("jax")
    from click.testing import CliRunner

    from xpcnn.apps.cli import main

    args = ["train", "--nproc", "2", "--backend", "jax", "--eager", "--device", "cpu", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "runs compiled: leave out --eager" in result.output and "rank" not in result.output


def test_ranks_still_running_after_another_stopped_on_a_passed_on_signal_are_killed(monkeypatch):
    """A SIGTERM while the ranks meet: one ends, the other waits in torch's rendezvous, deaf to signals, for all of
    XPCNN_DIST_TIMEOUT (120 s). The launcher now kills it STOP_GRACE after the first stopped."""
    monkeypatch.setattr(launch_module, "STOP_GRACE", 1.0)
    deaf = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    stop = "import signal; time.sleep(2); os.kill(os.getppid(), signal.SIGTERM); time.sleep(60)"  # once 1 is deaf
    lines = []
    started = time.monotonic()
    assert launch(2, _ranks_exit(deaf, stop), lines.append) == 143
    assert time.monotonic() - started < 2 + 1 + GRACE + 5
    assert lines == ["xpcnn: ranks still running 1 s after another rank stopped were killed"]


def test_the_launcher_names_the_rank_that_failed_not_the_one_that_lost_it():
    """Rank 0 ends first with the status of a rank whose partner died (75); rank 1, the cause, a moment later."""
    lines = []
    assert launch(2, _ranks_exit("time.sleep(0.5); sys.exit(1)", "sys.exit(75)"), lines.append) == 1
    statuses = "rank 0: exit status 75, rank 1: exit status 1"
    assert lines == [f"Error: rank 1 of 2 failed; every rank has stopped ({statuses})"]


def test_a_second_ctrl_c_kills_sooner_than_the_grace_after_another_rank_stopped():
    """Rank 0 ends on the first Ctrl-C, rank 1 does not: the second Ctrl-C's 5 s replace the 10 s kept for a
    rank that may be saving."""
    deaf = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)"
    twice = f"{deaf}; time.sleep(1); [os.kill(os.getppid(), signal.SIGINT) or time.sleep(0.5) for _ in range(2)]"
    lines = []
    started = time.monotonic()
    assert launch(2, _ranks_exit(f"{twice}; time.sleep(60)", "time.sleep(60)"), lines.append) == 130
    assert time.monotonic() - started < 1 + 1 + GRACE + 3
    assert lines == [f"xpcnn: ranks still running {GRACE:g} s after the second Ctrl-C were killed"]


def test_a_rank_that_lost_its_partner_ends_with_75_and_its_traceback_under_xpcnn_debug():
    import click
    from click.testing import CliRunner

    from xpcnn.apps.exits import friendly_errors

    @click.command()
    @friendly_errors
    def lost():
        raise D.RankLost("rank 1: another rank died or did not answer")

    quiet = CliRunner().invoke(lost)
    assert quiet.exit_code == 75 and quiet.output == "Error: rank 1: another rank died or did not answer\n"
    loud = CliRunner().invoke(lost, env={"XPCNN_DEBUG": "1"})
    assert loud.exit_code == 75 and "Traceback" in loud.output
