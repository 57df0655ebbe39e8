"""``sparse-mim bench``: a tiny run end to end, the FLOP accounting, and the config errors."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sparse_mim.bench import main
from sparse_mim.bench.flops import CORRECTED_FORMULAS
from sparse_mim.bench.memory import cpu_peak_mb_subprocess
from sparse_mim.bench.workload import WorkloadSpec

TINY = ["models=[resnet18]", "mask_ratios=[0.5]", "batch_size=2", "img_size=64", "repeats=1", "warmup=0",
        "decoder_width=32", "threads=1", "memory=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        code = main(TINY + [f"output_dir={out}"])
    finally:
        torch.set_num_threads(threads)
    return code, out


def test_tiny_run_writes_table_json_csv_and_plot(tiny_run, capsys):
    code, out = tiny_run
    assert code == 0
    for name in ("results.md", "results.json", "results.csv", "speedup.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "results.md").read_text()
    assert "| resnet18 | 0.5 | 2/4 |" in table
    assert "sparse-mim bench models=[resnet18]" in table  # the command line is on top
    info = json.loads((out / "results.json").read_text())
    assert info["machine"]["torch"] == torch.__version__ and info["machine"]["date"]
    (row,) = info["results"]
    assert set(row["time_ms"]) == {"encoder", "step"}
    assert all(row["time_ms"][w][v] > 0 for w in ("encoder", "step") for v in ("sparse", "dense"))
    assert row["maps_ms"] > 0
    with (out / "results.csv").open() as f:
        (csv_row,) = list(csv.DictReader(f))
    assert csv_row["model"] == "resnet18" and float(csv_row["speedup.encoder"]) > 0


def test_sparse_encoder_executes_about_the_visible_fraction_of_the_dense_flops(tiny_run):
    _, out = tiny_run
    (row,) = json.loads((out / "results.json").read_text())["results"]
    assert row["visible_fraction"] == 0.5
    for part in ("fwd", "fwd_bwd"):
        sparse, dense = (row["flops"]["encoder"][v][part] for v in ("sparse", "dense"))
        assert 0 < sparse < dense
        assert 0.9 * row["visible_fraction"] <= sparse / dense <= 1.15 * row["visible_fraction"]
    # the step adds the same dense decoder to both, so its ratio lies between the encoder's and 1
    assert row["flop_ratio"]["encoder"] < row["flop_ratio"]["step"] < 1


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_counted_conv_backward_is_twice_the_forward_for_any_group_count(groups):
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    w = torch.randn(8, 8 // groups, 3, 3, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=CORRECTED_FORMULAS) as counter:
        y = F.conv2d(x, w, padding=1, groups=groups)
        forward = counter.get_total_flops()
        y.sum().backward()
    assert counter.get_total_flops() - forward == 2 * forward


def test_cpu_peak_memory_of_one_variant_is_measured_in_a_fresh_process():
    spec = WorkloadSpec(model="resnet18", mask_ratio=0.5, batch_size=2, img_size=64, device="cpu", autocast=False,
                        channels_last=True, execution="auto", decoder_width=32, seed=0)
    peak = cpu_peak_mb_subprocess(spec, "dense", "encoder", threads=1, timeout=120)
    assert 0 < peak < 2048


def test_bad_settings_are_reported_together_with_exit_code_2(capsys):
    code = main(["models=[resnet5]", "mask_ratios=[0.99]", "img_size=100", "dtype=fp8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "resnet5" in err and "img_size" in err and "dtype" in err
    assert main(["execution_small_tiles=fast"]) == 2
    assert "execution_small_tiles" in capsys.readouterr().err


def _fake_row(encoder_sparse_ms: float, step_sparse_ms: float) -> dict:
    times = {"encoder": {"sparse": [encoder_sparse_ms - 1, encoder_sparse_ms, encoder_sparse_ms + 2],
                         "dense": [20.0, 21.0, 25.0]},
             "step": {"sparse": [step_sparse_ms - 1, step_sparse_ms, step_sparse_ms + 1],
                      "dense": [40.0, 41.0, 42.0]}}
    return {"model": "resnet18", "mask_ratio": 0.6, "len_keep": 2, "num_patches": 4, "visible_fraction": 0.5,
            "times_ms": times, "time_ms": {w: {v: t[1] for v, t in ts.items()} for w, ts in times.items()},
            "speedup": {"encoder": 2.0, "step": 1.5}, "maps_ms": 1.0, "maps_pct": 5.0, "maps_pct_of": "step",
            "flops": {}, "memory_mb": {}}


def _fake_info() -> dict:
    machine = {"date": "today", "command": "sparse-mim bench", "cpu": "cpu", "cpu_count": 2, "torch": "x",
               "threads": 2, "device": "cpu"}
    settings = {"what": ["encoder", "step"], "batch_size": 2, "img_size": 64, "effective_dtype": "float32",
                "warmup": 0, "repeats": 3, "execution": "auto", "channels_last": True}
    return {"machine": machine, "settings": settings}


def test_the_table_shows_each_time_with_the_spread_of_its_repeats():
    from sparse_mim.bench.report import markdown

    table = markdown(_fake_info(), [_fake_row(encoder_sparse_ms=10.0, step_sparse_ms=20.0)])
    assert "| 10.0 (9.0-12.0) | 21.0 (20.0-25.0) | 2.00x |" in table
    assert "| ok |" in table and "Warning" not in table


def test_an_encoder_time_above_its_whole_step_is_flagged():
    from sparse_mim.bench.report import consistency_warnings, flat_rows, markdown

    row = _fake_row(encoder_sparse_ms=30.0, step_sparse_ms=20.0)
    (warning,) = consistency_warnings(row)
    assert "sparse encoder fwd+bwd 30.0 ms exceeds the whole step containing it (20.0 ms)" in warning
    table = markdown(_fake_info(), [row])
    assert "parts exceed the whole: see warnings" in table and f"- {warning}" in table
    row["warnings"] = [warning]
    assert flat_rows([row])[0]["warnings"] == warning


def test_fcmae_workload_runs_the_same_fcmae_step_sparse_and_masked_dense():
    from sparse_mim.bench.workload import Workload
    from sparse_mim.fcmae import FCMAE
    spec = WorkloadSpec(model="convnextv2_atto", method="fcmae", mask_ratio=0.6, batch_size=2, img_size=64,
                        device="cpu", autocast=False, channels_last=True, execution="auto", decoder_width=32, seed=0)
    workload = Workload(spec)
    assert isinstance(workload.models["sparse"], FCMAE) and workload.models["dense"].dense_reference
    (active,) = workload.masks(1)
    assert spec.len_keep == 1 and active.sum((1, 2)).tolist() == [1, 1]  # FCMAE's int(4 * 0.4), not round
    for what in ("encoder", "step"):
        sparse, dense = (workload.forward(v, what, active) for v in ("sparse", "dense"))
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)


def test_fcmae_bench_refuses_a_model_that_is_not_convnext_v2(capsys):
    assert main(["method=fcmae", "models=[resnet18]"]) == 2
    assert "FCMAE pretrains ConvNeXt V2 encoders; model=resnet18" in capsys.readouterr().err
    assert main(["method=mae"]) == 2
    assert "method must be one of spark, fcmae" in capsys.readouterr().err
