"""What the tools do to a user's files (docs/files.md): never write into a directory they did not
create unless told (and then never replace a file there), never delete what is not their own
output, replace only regular files, follow the umask, one training per directory, clean resume
logs and leftovers. Every destructive case runs in a temporary directory."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from mlx_sleep import io
from mlx_sleep.config import ConfigError
from tests.reliability import (
    TINY_TRAIN,
    assert_one_clear_line,
    cli,
    copy_run,
    make_hf_checkpoint,
    snapshot,
    train_tiny_run,
)
from tests.tiny_models import make_model_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory, "runs")


# -- 1. data loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["converted model", "hf checkpoint", "unrelated files"])
def test_train_refuses_a_directory_it_did_not_create(tmp_path, kind):
    out = tmp_path / "d"
    if kind == "converted model":
        make_model_dir(out, "hybrid")
    elif kind == "hf checkpoint":
        make_hf_checkpoint(out)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, output = cli("train", *TINY_TRAIN, "--out", out)
    assert_one_clear_line(
        code, output, "use another directory" if kind == "converted model" else "did not create"
    )
    assert snapshot(out) == before


def test_train_into_the_current_project_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "config.json").write_text('{"mine": true}')
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, output = cli("train", *TINY_TRAIN, "--out", ".")
    assert_one_clear_line(code, output, "did not create")
    assert snapshot(tmp_path) == before


def test_train_force_writes_next_to_foreign_files_but_never_replaces_them(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, output = cli("train", *TINY_TRAIN, "--out", out, "--force")
    assert code == 0, output
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint").is_dir()
    make_hf_checkpoint(tmp_path / "hf")
    before = snapshot(tmp_path / "hf")
    code, output = cli("train", *TINY_TRAIN, "--out", tmp_path / "hf", "--force")
    assert_one_clear_line(code, output, "config.json")
    assert snapshot(tmp_path / "hf") == before


@pytest.mark.parametrize(
    "change",
    [["--lr", "0.01"], ["--batch-size", "8"], ["--seed", "3"], ["--steps", "1"], ["--loops", "2"]],
)
def test_rerunning_a_run_with_other_settings_is_refused_naming_them(tmp_path, run_dir, change):
    out = copy_run(run_dir, tmp_path / "run")
    before = snapshot(out)
    code, output = cli("train", *TINY_TRAIN, "--out", out, *change)
    key = {
        "--lr": "train.lr",
        "--batch-size": "train.batch_size",
        "--seed": "train.seed",
        "--steps": "pass --steps 2 or more",
        "--loops": "sleep.loops",
    }[change[0]]
    assert_one_clear_line(code, output, key)
    assert snapshot(out) == before


def test_a_larger_steps_extends_a_finished_run(tmp_path, run_dir):
    out = copy_run(run_dir, tmp_path / "run")
    code, output = cli("train", *TINY_TRAIN, "--out", out, "--steps", "3")
    assert code == 0, output
    meta = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert (
        meta["step"] == 3 and json.loads((out / "config.json").read_text())["train"]["steps"] == 3
    )
    steps = [
        json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps)  # no step logged twice


def test_rerunning_a_finished_run_with_the_same_settings_changes_nothing_it_keeps(
    tmp_path, run_dir
):
    out = copy_run(run_dir, tmp_path / "run")
    weights = (out / "checkpoint" / "model.safetensors").read_bytes()
    code, output = cli("train", *TINY_TRAIN, "--out", out)
    assert code == 0, output
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == weights


def test_a_run_from_before_a_training_setting_existed_still_resumes(tmp_path, run_dir):
    out = copy_run(run_dir, tmp_path / "run")
    config = json.loads((out / "config.json").read_text())
    del config["train"]["random_chunks"]  # recorded by an older version: its default applies
    (out / "config.json").write_text(json.dumps(config))
    code, output = cli("train", *TINY_TRAIN, "--out", out)
    assert code == 0, output
    code, output = cli("train", *TINY_TRAIN, "--out", out, "--random-chunks")
    assert_one_clear_line(code, output, "train.random_chunks: false -> true")


def convert(src, out, *extra):
    return cli("convert", "--hf-path", src, "--out", out, *extra)


def test_convert_force_never_deletes_the_source_or_its_parents(tmp_path, monkeypatch):
    src = make_hf_checkpoint(tmp_path / "proj" / "ckpt")
    (tmp_path / "proj" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for out in (src, tmp_path / "proj", tmp_path):
        assert_one_clear_line(*convert(src, out, "--force"), "never replaced")
    monkeypatch.chdir(tmp_path / "proj")
    assert_one_clear_line(*convert(src, ".", "--force"), "never replaced")
    assert_one_clear_line(*convert(src, "..", "--force"), "never replaced")
    assert snapshot(tmp_path) == before


def test_convert_force_replaces_only_its_own_output(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ckpt")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("mine")
    before = snapshot(folder)
    assert_one_clear_line(*convert(src, folder, "--force"), "not a converted model")
    assert snapshot(folder) == before
    out = tmp_path / "model"
    assert convert(src, out)[0] == 0
    assert_one_clear_line(*convert(src, out), "--force")  # exists: refused without --force
    code, output = convert(src, out, "--loops", "2", "--force")  # ours: replaced
    assert code == 0, output
    assert json.loads((out / "config.json").read_text())["sleep"]["loops"] == 2
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []  # no leftovers


def test_convert_to_a_symlink_or_a_file_is_refused(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ckpt")
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", tmp_path / "link")
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    assert_one_clear_line(*convert(src, tmp_path / "link", "--force"), "symlink")
    assert_one_clear_line(*convert(src, tmp_path / "file", "--force"))
    assert snapshot(tmp_path) == before


# -- 2. special files -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symlink", "fifo", "device", "directory"])
@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_eval_never_replaces_a_special_file(tmp_path, run_dir, kind, flag):
    target = tmp_path / "real.json"
    target.write_text("keep")
    path = tmp_path / "out"
    if kind == "symlink":
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path = "/dev/null"
    before = snapshot(tmp_path)
    null_before = os.stat("/dev/null")
    code, output = cli("eval", "--checkpoint", run_dir, "--samples", "2", flag, path)
    assert_one_clear_line(
        code, output, "is a directory" if kind == "directory" else "only replaces regular files"
    )
    assert snapshot(tmp_path) == before and target.read_text() == "keep"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert os.stat("/dev/null").st_ino == null_before.st_ino


def test_stdout_is_written_through(capfd):
    io.write_json("/dev/stdout", {"a": 1})
    io.write_text("-", "hello\n")
    out = capfd.readouterr().out
    assert json.loads(out.split("hello")[0]) == {"a": 1} and "hello" in out
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_eval_outputs_replace_only_their_own_files(tmp_path, run_dir):
    """--json and --plot write new files and replace files eval wrote (their mark inside:
    a "written_by" key, a PNG Software chunk); a user's file of that name is left alone."""
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    code, output = cli(
        "eval", "--checkpoint", run_dir, "--samples", "2", "--json", js, "--plot", png
    )
    assert code == 0, output
    assert json.loads(js.read_text())["written_by"] == "mlx-sleep eval"
    assert io.written_by(str(js)) and io.written_by(str(png))
    code, output = cli(
        "eval", "--checkpoint", run_dir, "--samples", "2", "--json", js, "--plot", png
    )
    assert code == 0, output  # eval's own files: replaced
    for path in (js, png):
        path.write_text("the user's notes")
        before = snapshot(tmp_path)
        flag = "--json" if path == js else "--plot"
        assert_one_clear_line(
            *cli("eval", "--checkpoint", run_dir, "--samples", "2", flag, path),
            "was not written by mlx-sleep",
        )
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "inside", ["config.json", "checkpoint/model.safetensors", "checkpoint/trainer.json", "new.json"]
)
def test_eval_never_writes_into_a_run(tmp_path, run_dir, inside):
    """The issue's data loss: `--json run/checkpoint/model.safetensors` replaced the weights."""
    run = copy_run(run_dir, tmp_path / "run")
    before = snapshot(tmp_path)
    for flag in ("--json", "--plot"):
        assert_one_clear_line(
            *cli("eval", "--checkpoint", run, flag, run / inside),
            "a training run (mlx-sleep train): its files are its own",
        )
    assert snapshot(tmp_path) == before


def test_data_never_replaces_its_input_or_a_model(tmp_path):
    """`data gsm-infinite --out g.jsonl --force` with g.jsonl the input once replaced the input."""
    data = tmp_path / "g.jsonl"
    shutil.copy(
        os.path.join(os.path.dirname(__file__), "fixtures", "gsm-infinite", "medium_0.jsonl"), data
    )
    model = make_model_dir(tmp_path / "m")
    before = snapshot(tmp_path)
    base = ["data", "gsm-infinite", "--data", data, "--force", "--out"]
    assert_one_clear_line(*cli(*base, data), "is this command's input")
    assert_one_clear_line(
        *cli(*base, os.path.join(model, "config.json")),
        "a converted model (mlx-sleep convert): its files are its own",
    )
    assert snapshot(tmp_path) == before


def test_eval_refuses_a_special_file_before_the_work(tmp_path, run_dir, monkeypatch):
    import mlx_sleep.eval

    monkeypatch.setattr(mlx_sleep.eval, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    os.mkfifo(tmp_path / "fifo")
    assert_one_clear_line(*cli("eval", "--checkpoint", run_dir, "--json", tmp_path / "fifo"))


# -- 4. work lost -----------------------------------------------------------------------------


def test_a_symlinked_checkpoint_is_refused_before_training(tmp_path, run_dir):
    out = copy_run(run_dir, tmp_path / "run")
    os.rename(out / "checkpoint", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", out / "checkpoint")
    before = snapshot(tmp_path)
    code, output = cli("train", *TINY_TRAIN, "--out", out)
    assert_one_clear_line(code, output, "not a plain directory")
    assert snapshot(tmp_path) == before


def test_two_trainings_into_one_directory(tmp_path):
    from tests.test_train import trainer

    first = trainer(tmp_path, steps=2)
    with pytest.raises(ConfigError, match="in use by a training"):
        trainer(tmp_path, steps=2)
    first.run()  # the first is unharmed and finishes
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()
    trainer(tmp_path, steps=2).close()  # released at the end of run()


def test_two_training_processes_into_one_directory(tmp_path):
    """A second process gets one line while the first holds the directory."""
    out = tmp_path / "run"
    io.claim_dir(str(out), "run")
    fd = io.acquire_lock(str(out))
    try:
        r = subprocess.run(
            [sys.executable, "-m", "mlx_sleep.cli", "train", *TINY_TRAIN, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.close(fd)
    assert r.returncode == 1 and "in use by a training" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temporary_directories_are_cleaned_on_the_next_run(tmp_path, run_dir):
    out = copy_run(run_dir, tmp_path / "run")
    stale = out / f"{io.TMP_PREFIX}{dead_pid()}-checkpoint-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    stale_file = out / f"{io.TMP_PREFIX}{dead_pid()}-xyz.json"
    stale_file.write_text("{")
    alive = out / f"{io.TMP_PREFIX}{os.getppid()}-checkpoint-live"  # a live writer's: kept
    alive.mkdir()
    foreign = out / ".tmp-checkpoint-user"  # not our pattern: kept
    foreign.mkdir()
    code, output = cli("train", *TINY_TRAIN, "--out", out)
    assert code == 0, output
    assert not stale.exists() and not stale_file.exists()
    assert alive.exists() and foreign.exists()


def test_metrics_do_not_repeat_steps_after_a_resume(tmp_path):
    from tests.test_train import trainer

    half = trainer(tmp_path, steps=6)
    half.cfg.steps = 3
    half.run()  # checkpoint at step 3
    with open(tmp_path / "metrics.jsonl", "a") as f:  # steps 4, 5 logged, then killed
        for step in (4, 5):
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
        f.write('{"step": 6, "lo')  # a line cut by the kill
    resumed = trainer(tmp_path, steps=6)
    assert resumed.step == 3
    resumed.run()
    steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
    assert steps == [1, 2, 3, 4, 5, 6]


# -- 7. permissions ---------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_everything_written_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        code, output = cli("train", *TINY_TRAIN, "--out", tmp_path / "run")
        assert code == 0, output
        code, output = convert(make_hf_checkpoint(tmp_path / "ckpt"), tmp_path / "model")
        assert code == 0, output
    finally:
        os.umask(old)
    for root in (tmp_path / "run", tmp_path / "model"):
        for rel, (kind, _, mode) in snapshot(root).items():
            want = (0o777 if kind == "dir" else 0o666) & ~umask
            assert mode == want, (rel, oct(mode), oct(want))
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o777 & ~umask


def test_claim_dir_api_for_sessions(tmp_path):
    """The policy other writers (chat sessions) use: a marker names the owner."""
    path = str(tmp_path / "s")
    io.claim_dir(path, "session")
    assert io.owner_of(path) == "session"
    io.claim_dir(path, "session")  # ours: fine again
    with pytest.raises(io.OutputError, match="chat session"):
        io.claim_dir(path, "run")
    with io.lock_dir(path, "a chat session"):
        with pytest.raises(io.OutputError, match="in use by a chat session"):
            io.acquire_lock(path, "a chat session")


def test_demo_refuses_a_directory_of_other_files(tmp_path):
    (tmp_path / "results.md").write_text("my results")
    before = snapshot(tmp_path)
    assert_one_clear_line(*cli("demo", "--out", tmp_path, "--steps", "1"), "did not create")
    assert_one_clear_line(
        *cli("demo", "--out", tmp_path, "--steps", "1", "--force"), "results.md"
    )  # --force never replaces a file it did not write
    assert snapshot(tmp_path) == before
