"""Device, precision, compilation, processes and workers: each decision a pure function,
tested with the inputs Kaggle's T4 and P100, an A100 and an H200 give, on the CPU."""
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from kernel_runs import TINY, cli
from utils import engine
from utils.engine import Dist, choose_backend
from utils.runtime import (Device, RuntimeChoiceError, check_compile, choose_precision, default_workers,
                           plan_processes, setup_runtime, torchrun_command, under_torchrun)

T4 = Device((7, 5), "Tesla T4", 15.0)
P100 = Device((6, 0), "Tesla P100-PCIE-16GB", 16.0)
A100 = Device((8, 0), "NVIDIA A100-SXM4-40GB", 40.0)
H200 = Device((9, 0), "NVIDIA H200", 139.0)
CPU = Device()


@pytest.mark.parametrize("device, expected", [(T4, "fp16"), (P100, "fp16"), (A100, "bf16"),
                                              (H200, "bf16"), (CPU, "fp32")])
def test_auto_precision_is_bf16_only_where_cudnn_has_bf16_convolutions(device, expected):
    assert choose_precision("auto", device) == expected


@pytest.mark.parametrize("device", [T4, P100])
def test_bf16_on_a_gpu_older_than_ampere_is_an_error_naming_it(device):
    with pytest.raises(RuntimeChoiceError, match=f"{device.name} \\(compute capability") as err:
        choose_precision("bf16", device)
    assert "--precision fp16" in str(err.value)


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_where_it_runs(requested):
    assert choose_precision(requested, CPU) == requested
    assert choose_precision(requested, H200) == requested
    if requested != "bf16":
        assert choose_precision(requested, T4) == requested


def test_compile_is_refused_below_volta_only():
    with pytest.raises(RuntimeChoiceError, match="Tesla P100-PCIE-16GB .*compute capability 6.0"):
        check_compile(P100)
    for device in (T4, A100, H200, CPU):
        check_compile(device)  # no error


@pytest.mark.parametrize("cores, local, expected", [(16, 1, 8), (16, 2, 8), (16, 4, 4), (4, 2, 2),
                                                    (2, 1, 2), (1, 2, 1), (None, 1, 1)])
def test_loader_workers_share_the_cores_among_the_processes(cores, local, expected):
    assert default_workers(cores, local) == expected


def test_processes_one_per_gpu_unless_told_or_under_torchrun():
    assert plan_processes(None, gpus=2, started_by_torchrun=False) == 2  # Kaggle's 2 x T4
    assert plan_processes(None, gpus=1, started_by_torchrun=False) == 1
    assert plan_processes(None, gpus=0, started_by_torchrun=False) == 1
    assert plan_processes(2, gpus=0, started_by_torchrun=False) == 2     # gloo on the CPU
    assert plan_processes(1, gpus=2, started_by_torchrun=False) == 1
    assert plan_processes(None, gpus=2, started_by_torchrun=True) == 1   # torchrun has decided
    assert under_torchrun({"LOCAL_RANK": "0"}) and not under_torchrun({})
    command = torchrun_command("k.py", ["--epochs", "1"], 2)
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "k.py", "--epochs", "1"]


def test_nccl_only_when_every_process_has_a_gpu_of_its_own():
    assert choose_backend(cuda=True, gpus=2, local_processes=2) == "nccl"
    assert choose_backend(cuda=True, gpus=1, local_processes=2) == "gloo"  # NCCL refuses 2 ranks on 1 GPU
    assert choose_backend(cuda=False, gpus=0, local_processes=2) == "gloo"


def test_the_process_group_waits_longer_than_ncclS_default_10_minutes(monkeypatch):
    # rank 0 alone scans ~874k headers while the others wait in a barrier
    calls = []
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(engine.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    d = engine.init_distributed()
    assert d == Dist(1, 2, 1)
    (args, kwargs), = calls
    assert args == ("gloo",) and kwargs["timeout"] >= timedelta(hours=1)


def fake_gpu(monkeypatch, device: Device, count: int = 1):
    """torch.cuda as a machine with ``count`` GPUs like ``device`` shows it (nothing runs on it)."""
    props = SimpleNamespace(major=device.capability[0], minor=device.capability[1], name=device.name,
                            total_memory=int(device.memory_gib * 2**30))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def test_setup_runtime_on_a_t4_trains_fp16_with_autotuned_convolutions(monkeypatch):
    fake_gpu(monkeypatch, T4, count=2)
    rt = setup_runtime(Dist(1, 2, 1), "auto")
    assert rt.device == torch.device("cuda", 1) and rt.amp_dtype == torch.float16 and rt.precision == "fp16"
    assert rt.machine == Device((7, 5), "Tesla T4", 15.0)
    assert torch.backends.cudnn.benchmark is True
    shared = setup_runtime(Dist(3, 4, 3), "auto")  # 4 processes on 2 GPUs take them in turn
    assert shared.device == torch.device("cuda", 1)


def test_setup_runtime_on_the_cpu():
    rt = setup_runtime(Dist(), "auto", compile=True)
    assert rt.device.type == "cpu" and rt.amp_dtype is None and rt.machine == CPU


@pytest.mark.parametrize("gpu, args, message", [
    (T4, ["--precision", "bf16"], "needs a GPU of compute capability 8.0"),
    (P100, ["--compile"], "--compile needs a GPU of compute capability 7.0"),
])
def test_kernel_refuses_what_the_gpu_cannot_run_before_anything_is_written(tmp_path, monkeypatch, capsys,
                                                                          gpu, args, message):
    fake_gpu(monkeypatch, gpu)
    assert cli("--out-dir", tmp_path / "out", *TINY, *args) == 2
    err = capsys.readouterr().err
    assert message in err and gpu.name in err
    assert not (tmp_path / "out").exists()
