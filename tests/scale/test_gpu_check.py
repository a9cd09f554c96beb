"""``opd-scale gpu-check`` on the CPU: the same code as on a GPU, on the tiny pipeline (CI runs it)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # 23 s at a load average of 8.5 on 2 cores (a tiny pipeline build, 10 trainers, the bench)
def test_gpu_check_runs_on_cpu_and_writes_its_json(tmp_path):
    from scale.cli import main

    out = tmp_path / "gpu_check.json"
    assert main(["gpu-check", "--out", str(out), "--repeats", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["full_size_sd35_medium"] is False and res["dtype"] == "float32"
    # float32: the engine's ODE rollout is the pipeline's scheduler loop, bit for bit
    ks = res["kernel_vs_scheduler"]
    assert ks["bit_identical"] is True and ks["rel_diff_max"] == 0.0 and ks["final_rms"] > 0
    mem = res["memory"]
    for mb in (1, 4):
        plain, ck = mem[f"micro_batch_{mb}"], mem[f"micro_batch_{mb}_checkpointing"]
        assert plain["peak_bytes"] > 0 and ck["peak_bytes"] < plain["peak_bytes"]
        # the same update with and without checkpointing
        assert abs(plain["loss"] - ck["loss"]) <= 1e-6 * abs(plain["loss"])
        assert res["throughput"][f"micro_batch_{mb}"]["achieved_tflops"] > 0
    assert mem["micro_batch_4"]["peak_bytes"] > mem["micro_batch_1"]["peak_bytes"]
    assert res["throughput"]["micro_batch_4"]["update_flops"] > 3 * res["throughput"]["micro_batch_1"]["update_flops"]
    assert res["overhead_ratio"] > 0 and "memory" in res["bench"]
