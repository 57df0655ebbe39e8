"""``sparse-mim bench what=loader``: our input pipeline against plain torchvision, per worker count."""
from __future__ import annotations

import json

from helpers.runs import make_images

from sparse_mim.bench import main


def test_loader_bench_reports_images_per_second_of_every_loader(tmp_path, capsys):
    for label in ("a", "b"):
        make_images(tmp_path / "data" / label, 4, size=72, ext=".jpg")
    out = tmp_path / "out"
    code = main(["what=loader", f"data_path={tmp_path / 'data'}", "loader_workers=[0]", "loader_batches=1",
                 "batch_size=2", "repeats=1", "img_size=64", f"output_dir={out}"])
    assert code == 0
    table = capsys.readouterr().out
    assert ("| workers | sparse-mim | sparse-mim tensor | torchvision baseline | sparse-mim / baseline | "
            "sparse-mim tensor / baseline |") in table
    rows = json.loads((out / "loader.json").read_text())["rows"]
    assert [r["workers"] for r in rows] == [0]
    speeds = rows[0]["images_per_sec"]
    assert set(speeds) == {"sparse-mim", "sparse-mim tensor", "torchvision"} and all(v > 0 for v in speeds.values())
    assert rows[0]["ratio"]["sparse-mim tensor"] == speeds["sparse-mim tensor"] / speeds["torchvision"]


def test_loader_bench_refuses_a_missing_folder_and_mixing_with_encoder_runs(tmp_path, capsys):
    assert main(["what=[loader,encoder]", f"data_path={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "what=loader runs alone" in err and "needs data_path" in err
