"""The same recipe on every CPU: `auto` precision from the CPU's flags, budgets in steps, built-ins that stop the
recipe below their targets, MFU against the fastest peak, and results that name their machine."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from iomm.cli import main
from iomm.lab.bench.train_step import bench_train_step
from iomm.nano import mllm_training
from iomm.nano.mllm import UNDERSTANDING_TARGETS
from iomm.nano.mllm_training import check_understanding, train_nano_mllm
from iomm.nano.vae import check_reconstruction
from iomm.registry import BuiltinBelowTarget
from iomm.training import hardware, run_log
from iomm.training.precision import autocast, describe_precision, resolve_precision
from tests.conftest import TINY_OVERRIDES

AVX2 = {"fma", "avx2"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # the Xeon of the report: bf16 emulated
CPU_KINDS = {
    "avx2": (AVX2, "fp32"),
    "avx512 without bf16": (AVX512, "fp32"),
    "avx512_bf16": (AVX512 | {"avx512_bf16"}, "bf16"),
    "amx": (AVX512 | {"amx_tile", "amx_bf16", "amx_int8"}, "bf16"),
}


@pytest.fixture
def cpu(monkeypatch):
    def simulate(flags: set[str]) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))

    return simulate


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_auto_is_bf16_only_on_a_cpu_that_computes_bf16_natively(kind, cpu):
    flags, expected = CPU_KINDS[kind]
    cpu(flags)
    assert resolve_precision("auto") == expected
    assert resolve_precision("fp32") == "fp32"
    assert describe_precision("auto").startswith(f"{expected} (auto: ")
    assert isinstance(autocast("auto"), torch.autocast) == (expected == "bf16")
    if expected == "fp32":
        with pytest.warns(UserWarning, match="neither avx512_bf16 nor amx_bf16"):
            assert resolve_precision("bf16") == "fp32"
    # torch's own "supported" answer plays no part: it is True on the AVX512 Xeon whose bf16 is emulated
    assert hardware.machine_facts()["bf16_native"] == (expected == "bf16")


def test_the_flags_are_read_from_proc_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C\n"
                       "flags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n\nprocessor\t: 1\n")
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    hardware.cpu_flags.cache_clear()
    hardware.cpu_model.cache_clear()
    try:
        assert hardware.cpu_flags() >= {"avx2", "avx512f"} and "avx512_bf16" not in hardware.cpu_flags()
        assert not hardware.bf16_is_native("cpu")
        facts = hardware.machine_facts()
        assert facts["cpu"] == "Intel(R) Xeon(R) Platinum 8375C" and facts["flags"] == ["avx2", "avx512f"]
        assert "bf16 emulated" in hardware.machine()
    finally:
        hardware.cpu_flags.cache_clear()
        hardware.cpu_model.cache_clear()


def test_mfu_is_divided_by_the_fastest_peak_and_bf16_is_timed_only_where_native(cpu, monkeypatch):
    peaks = {torch.float32: 100.0, torch.bfloat16: 300.0}
    timed: list[torch.dtype] = []

    def fake_peak(device, dtype=torch.float32, repeats=10):
        timed.append(dtype)
        return peaks[dtype]

    monkeypatch.setattr(hardware, "matmul_peak", fake_peak)
    cpu(AVX512)
    assert hardware.fastest_matmul_peak(torch.device("cpu")) == 100.0 and timed == [torch.float32]
    cpu(AVX512 | {"avx512_bf16"})
    assert hardware.fastest_matmul_peak(torch.device("cpu")) == 300.0
    peaks[torch.bfloat16] = 30.0  # native but slower at this size: fp32's peak still counts
    assert hardware.fastest_matmul_peak(torch.device("cpu")) == 100.0


def test_the_nano_mllm_trains_its_steps_whatever_the_clock_says(tmp_path, monkeypatch):
    assert inspect.signature(train_nano_mllm).parameters["minutes"].default is None
    assert inspect.signature(train_nano_mllm).parameters["steps"].default == mllm_training.DEFAULT_STEPS
    clock = iter(range(0, 10**9, 3600))  # every reading of the clock is an hour later: a very slow machine
    monkeypatch.setattr(run_log.time, "monotonic", lambda: float(next(clock)))
    fast = json.loads((train_nano_mllm(tmp_path / "a", steps=4, tiny=True, progress=False)
                       / "nano_mllm.json").read_text())
    slow = json.loads((train_nano_mllm(tmp_path / "b", steps=4, tiny=True, progress=False, minutes=30)
                       / "nano_mllm.json").read_text())
    assert fast["steps"] == 4  # no budget in minutes unless one is asked for
    assert slow["steps"] == 1  # the clock is really slowed: an explicit --minutes budget stops at once
    assert fast["precision"] == "fp32 (set in the config)" and fast["machine"]["cpu"]


def _below_target_mllm(tiny_mllm_dir: Path, tmp_path: Path) -> Path:
    """A cached nano MLLM whose understanding report is the emulated-bf16 Xeon's (273 steps)."""
    path = tmp_path / "nano-mllm"
    shutil.copytree(tiny_mllm_dir, path)
    (path / "nano_mllm.json").write_text(json.dumps({"random_init": False, "steps": 273,
                                                      "precision": "bf16 (auto: ...)"}))
    (path / "understanding.json").write_text(json.dumps({"accuracy": {"color": 0.65, "shape": 0.415,
                                                                       "count": 0.54}}))
    return path


def test_a_nano_mllm_below_its_targets_stops_the_recipe_before_stage_1(tiny_mllm_dir, tmp_path, capsys):
    path = _below_target_mllm(tiny_mllm_dir, tmp_path)
    with pytest.raises(BuiltinBelowTarget, match=r"shape 0\.415 \(target 0\.85\).*273 steps"):
        check_understanding(path)
    out = tmp_path / "recipe"
    code = main(["recipe", "nano", "--out", str(out), "--no-progress", "--set=mllm.path=nano",
                 f"--set=mllm.nano_dir={path}", *(f"--set={o}" for o in TINY_OVERRIDES), "--set=train.steps=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "color 0.650 (target 0.85), shape 0.415 (target 0.85), count 0.540 (target 0.85)" in err
    assert "too few steps" in err and f"Delete {path}" in err
    assert not (out / "pretrain").exists()  # nothing was trained on top of it
    (path / "understanding.json").write_text(json.dumps({"accuracy": dict.fromkeys(UNDERSTANDING_TARGETS, 0.95)}))
    check_understanding(path)  # at its targets it passes


def test_a_nano_vae_below_its_target_stops_with_its_numbers(tmp_path):
    (tmp_path / "nano_vae.json").write_text(json.dumps({"steps": 100, "reconstruction": {"scorer_exact": 0.5}}))
    with pytest.raises(BuiltinBelowTarget, match=r"0\.500 of held-out scenes exactly .* after 100 steps"):
        check_reconstruction(tmp_path)
    (tmp_path / "nano_vae.json").write_text(json.dumps({"steps": 600, "reconstruction": {"scorer_exact": 1.0}}))
    check_reconstruction(tmp_path)


def test_on_a_cpu_without_native_bf16_the_bench_times_fp32_against_the_fp32_peak(tiny_config, cpu, monkeypatch):
    dtypes: list[torch.dtype] = []
    monkeypatch.setattr(hardware, "matmul_peak",
                        lambda device, dtype=torch.float32, repeats=10: dtypes.append(dtype) or 1e9)
    cpu(AVX512)
    run = bench_train_step(tiny_config("train.mixed_precision=auto"), steps=1, warmup=0)
    assert run["mixed_precision"] == "fp32"  # the same precision as the naive step it is compared with
    assert dtypes == [torch.float32] and run["matmul_peak_flops"] == 1e9
