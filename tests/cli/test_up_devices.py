"""`chatstream up --workers auto`: one worker per visible CUDA device, else one CPU worker."""

from __future__ import annotations

import subprocess

import pytest

from chatstream_cluster import up
from chatstream_cluster.shared.settings import UpSettings
from chatstream_cluster.up import visible_cuda_devices, worker_devices

NVIDIA_SMI_L = (
    "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)\n"
    "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)\n"
)


@pytest.fixture
def no_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(up.shutil, "which", lambda name: None)


def settings(**values: str) -> UpSettings:
    return UpSettings(**{"model": "demo", "workers": "auto", **values})


@pytest.mark.parametrize(
    ("visible", "devices"),
    [
        ("0", ["cuda:0"]),
        ("0,1,2,3", ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
        # The process sees its visible devices as 0..n-1, whatever their physical ids.
        ("3,5", ["cuda:0", "cuda:1"]),
        ("GPU-aaaa,GPU-bbbb", ["cuda:0", "cuda:1"]),
        (" 0 , 1 ", ["cuda:0", "cuda:1"]),
    ],
)
def test_one_worker_per_visible_cuda_device(
    monkeypatch: pytest.MonkeyPatch, visible: str, devices: list[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert len(visible_cuda_devices()) == len(devices)
    assert worker_devices(settings()) == devices


@pytest.mark.parametrize("visible", ["", "-1", " "])
def test_no_visible_device_means_one_cpu_worker(
    monkeypatch: pytest.MonkeyPatch, visible: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_cuda_devices() == []
    assert worker_devices(settings()) == ["cpu"]


def test_no_nvidia_smi_means_one_cpu_worker(no_nvidia_smi: None) -> None:
    assert visible_cuda_devices() == []
    assert worker_devices(settings()) == ["cpu"]


def test_nvidia_smi_lists_the_gpus_when_cuda_visible_devices_is_unset(
    no_nvidia_smi: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(up.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    def fake_run(args, **kwargs):  # noqa: ANN001, ANN003, ANN202
        assert args == ["nvidia-smi", "-L"]
        return subprocess.CompletedProcess(args, 0, stdout=NVIDIA_SMI_L, stderr="")

    monkeypatch.setattr(up.subprocess, "run", fake_run)
    assert visible_cuda_devices() == ["0", "1"]
    assert worker_devices(settings()) == ["cuda:0", "cuda:1"]


def test_failing_nvidia_smi_means_one_cpu_worker(
    no_nvidia_smi: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(up.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    def failing_run(args, **kwargs):  # noqa: ANN001, ANN003, ANN202
        raise subprocess.CalledProcessError(9, args)

    monkeypatch.setattr(up.subprocess, "run", failing_run)
    assert worker_devices(settings()) == ["cpu"]


def test_mock_model_never_asks_for_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert worker_devices(settings(model="mock")) == ["cpu"]


def test_auto_keeps_an_explicit_cpu_device_when_there_is_no_gpu(no_nvidia_smi: None) -> None:
    assert worker_devices(settings(device="cpu")) == ["cpu"]


@pytest.mark.parametrize(
    ("device", "count", "devices"),
    [
        ("cpu", "2", ["cpu", "cpu"]),
        ("cuda", "3", ["cuda:0", "cuda:1", "cuda:2"]),
        ("cuda:1", "2", ["cuda:1", "cuda:1"]),
    ],
)
def test_a_worker_count_with_a_device(
    no_nvidia_smi: None, device: str, count: str, devices: list[str]
) -> None:
    assert worker_devices(settings(workers=count, device=device)) == devices


def test_worker_specs_plan_one_worker_group_per_model(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    plan = up.worker_plan(settings(worker=["mock:2", "Qwen/Qwen2.5-7B-Instruct:2", "demo"]))
    assert [(w.model, w.device) for w in plan] == [
        ("mock", "cpu"), ("mock", "cpu"),  # the mock takes no GPU
        ("Qwen/Qwen2.5-7B-Instruct", "cuda:0"), ("Qwen/Qwen2.5-7B-Instruct", "cuda:1"),
        ("demo", "cuda:2"),
    ]
    with pytest.raises(ValueError, match="more GPU workers than the 3"):
        up.worker_plan(settings(worker=["demo:4"]))


def test_worker_specs_without_gpus_run_on_the_device_given(no_nvidia_smi: None) -> None:
    plan = up.worker_plan(settings(worker=["mock", "demo:2"]))
    assert [(w.model, w.device) for w in plan] == [("mock", "cpu"), ("demo", "cpu"),
                                                   ("demo", "cpu")]
    # Without --worker: --workers of --model, as before.
    assert [(w.model, w.device) for w in up.worker_plan(settings())] == [("demo", "cpu")]


@pytest.mark.parametrize(("spec", "parsed"), [
    ("mock", ("mock", 1)), ("mock:3", ("mock", 3)), ("/models/a:b", ("/models/a:b", 1)),
    ("org/model:2", ("org/model", 2)),
])
def test_worker_spec_syntax(spec: str, parsed: tuple[str, int]) -> None:
    assert up.parse_worker_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["", ":2", "mock:0"])
def test_bad_worker_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="MODEL or MODEL:N"):
        up.parse_worker_spec(spec)
