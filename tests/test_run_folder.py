"""The run folder: an output_dir that cannot be written is a one-line error for every command, and a
run that fails or is interrupted during start-up leaves no folder behind (but never removes one
that existed before)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.runs import TINY, env, make_images

from sparse_mim.cli import main
from sparse_mim.runtime.run_folder import RunFolder, check_output_dir


class Refused(ValueError):
    pass


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    make_images(folder, 8)
    return folder


def _unwritable(tmp_path: Path, how: str) -> Path:
    """An output_dir nobody can create, root included: below a regular file, or inside /proc."""
    if how == "under_a_file":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder")
        return blocker / "run"
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    return Path("/proc/sparse_mim_no_such_folder/run")


# -- check_output_dir ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["under_a_file", "proc"])
def test_an_output_dir_that_cannot_be_created_is_refused_naming_it_and_the_fix(tmp_path, how):
    path = _unwritable(tmp_path, how)
    with pytest.raises(Refused) as e:
        check_output_dir(path, Refused)
    message = str(e.value)
    assert "\n" not in message and "pass output_dir=<a folder you can write>" in message
    assert str(path.parent if how == "under_a_file" else path) in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    try:
        with pytest.raises(Refused, match="cannot be written"):
            check_output_dir(parent / "run", Refused)
    finally:
        parent.chmod(0o700)


def test_checking_an_output_dir_leaves_nothing_behind(tmp_path):
    check_output_dir(tmp_path / "a" / "b" / "run", Refused)
    assert list(tmp_path.iterdir()) == []


# -- RunFolder -----------------------------------------------------------------------------------
def test_a_start_up_error_removes_the_folders_the_run_created(tmp_path):
    with pytest.raises(RuntimeError):
        with RunFolder(tmp_path / "new" / "run"):
            (tmp_path / "new" / "run").mkdir(parents=True)
            (tmp_path / "new" / "run" / "config.yaml").write_text("x")
            raise RuntimeError("start-up failed")
    assert list(tmp_path.iterdir()) == []


def test_a_start_up_error_never_removes_a_folder_that_existed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_text("a previous run")
    with pytest.raises(KeyboardInterrupt):
        with RunFolder(run):
            raise KeyboardInterrupt
    assert (run / "checkpoint.pth").read_text() == "a previous run"


def test_an_error_after_start_up_keeps_the_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with RunFolder(tmp_path / "run") as folder:
            (tmp_path / "run").mkdir()
            folder.started()
            raise RuntimeError("during training")
    assert (tmp_path / "run").is_dir()


# -- every command: one line, exit 2, nothing written --------------------------------------------
def _labelled(root: Path) -> Path:
    for split, count in (("train", 2), ("val", 1)):
        for name in ("a", "b"):
            make_images(root / split / name, count, size=40)
    return root


@pytest.mark.parametrize("how", ["under_a_file", "proc"])
@pytest.mark.parametrize("command", ["pretrain", "finetune", "bench"])
def test_every_command_refuses_an_unwritable_output_dir_in_one_line(tmp_path, capsys, images, command, how):
    out = _unwritable(tmp_path, how)
    args = {"pretrain": [*TINY, f"data.path={images}"],
            "finetune": [f"data.path={_labelled(tmp_path / 'labelled')}", "train.epochs=1"],
            "bench": ["models=[resnet18]", "mask_ratios=[0.5]", "img_size=64", "repeats=1", "warmup=0"]}[command]
    assert main([command, *args, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"sparse-mim {command}: error: output_dir")
    assert "Traceback" not in err and "pass output_dir=<a folder you can write>" in err


def test_a_folder_without_a_readable_image_is_refused_before_the_run_folder_exists(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "photo.jpg").write_text("not an image")
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, f"data.path={data}", "train.batch_size=1", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "no readable image" in err and str(data / "photo.jpg") in err and "batch_size" not in err
    assert not out.exists()


def test_a_pretrain_start_up_failure_after_the_folder_was_made_removes_it(images, tmp_path, monkeypatch):
    from sparse_mim.train import compose_config, pretrain

    def broken(*args, **kwargs):
        raise RuntimeError("start-up failed after config.yaml")

    monkeypatch.setattr("sparse_mim.runtime.run.Monitor", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="after config.yaml"):
        pretrain(compose_config([*TINY, f"data.path={images}", f"output_dir={out}"]))
    assert not out.exists()


def test_finetune_weights_of_another_arch_leave_no_run_folder(tmp_path):
    import timm
    from safetensors.torch import save_file

    from sparse_mim.convert import ConversionError
    from sparse_mim.finetune import compose_finetune_config, finetune

    weights = tmp_path / "encoder_resnet18.safetensors"
    state = timm.create_model("resnet18", num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"arch": "resnet18"})
    out = tmp_path / "run"
    cfg = compose_finetune_config([f"data.path={_labelled(tmp_path / 'labelled')}", "model=resnet50",
                                   f"weights={weights}", f"output_dir={out}"])
    with pytest.raises(ConversionError, match="pass model=resnet18") as e:
        finetune(cfg)
    assert "--arch" not in str(e.value)
    assert not out.exists()


# -- Ctrl-C during start-up ----------------------------------------------------------------------
def _wait_for_torch(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the process has begun importing torch (its library is mapped): start-up, not training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                return
        except OSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"exited early: {proc.communicate()}")
        time.sleep(0.005)
    pytest.fail("torch was never imported")


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc to see the start-up")
def test_ctrl_c_during_start_up_is_one_line_exit_130_and_leaves_nothing(images, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sparse_mim", "pretrain", *TINY, f"data.path={images}",
                             f"output_dir={out}"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_torch(proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr == "sparse-mim pretrain: error: interrupted during start-up (Ctrl-C); nothing was written\n"
    assert not out.exists()


# -- start-up time -------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["pretrain", "finetune", "bench"])
def test_help_and_config_errors_answer_before_torch_is_imported(command):
    code = (f"import sys; from sparse_mim.cli import main; main([{command!r}, '--help']); "
            f"main([{command!r}, 'no_such_key=1']); "
            f"print('heavy:', sorted(m for m in ('torch', 'timm', 'huggingface_hub') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert "unknown setting" in proc.stderr
    assert proc.stdout.splitlines()[-1] == "heavy: []"


def test_a_finetune_split_without_a_readable_image_is_refused_before_the_run_folder_exists(tmp_path, capsys):
    data = _labelled(tmp_path / "labelled")
    for path in (data / "val").rglob("*.png"):
        path.write_text("not an image")
    out = tmp_path / "run"
    assert main(["finetune", f"data.path={data}", "train.epochs=1", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "no readable image in 2 validation images" in err and str(data / "val" / "a") in err
    assert not out.exists()
