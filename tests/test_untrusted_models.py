"""Model directories are untrusted input (docs/files.md): nothing in one is ever executed, a Hugging
Face checkpoint is refused until it is converted, and malformed or hostile files end in one line
naming the file and the field, with exit status 1, no traceback and every file untouched.

The code-execution cases run the CLI as a user would, in a subprocess whose stdin answers 'y':
transformers asks "Do you wish to run the custom code? [y/N]" on stdin whenever
trust_remote_code is left unset, and a piped chat's first line would answer it. The code a
directory carries writes a marker file outside it; the marker must never appear.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import mlx_sleep
from mlx_sleep import loading
from mlx_sleep.config import ConfigError
from mlx_sleep.io import parse_json, read_json
from tests.reliability import assert_one_clear_line, cli, snapshot
from tests.tiny_models import FIXTURES, make_model_dir, write_tokenizer

CLI = [sys.executable, "-m", "mlx_sleep.cli"]
GSM = str(FIXTURES / "gsm-infinite" / "medium_0.jsonl")
PROMPT_TEXT = "Do you wish to run the custom code"


def evil_code(marker) -> str:
    """A module that leaves `marker` behind when imported, with the classes transformers looks
    for (so that, were it run, loading would go on)."""
    return (
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast, PretrainedConfig\n"
        "class Evil(PreTrainedTokenizerFast):\n    pass\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )


def edit_json(path, edit):
    with open(path) as f:
        obj = json.load(f)
    edit(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny converted model with a tokenizer (copied per test before it is changed)."""
    return make_model_dir(tmp_path_factory.mktemp("untrusted") / "m", "hybrid", window=16)


@pytest.fixture
def work(tmp_path):
    """tmp_path/work: everything a test makes and checks; tmp_path/home: the CLI's homes."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def copy_model(tiny, work, name="m"):
    return shutil.copytree(tiny, work / name)


def with_code(tiny, work, where):
    """A converted model whose tokenizer_config.json ("tokenizer") or config.json ("config")
    has an auto_map pointing at evil.py in the directory."""
    path = copy_model(tiny, work)
    (path / "evil.py").write_text(evil_code(work.parent / "marker"))
    if where == "tokenizer":
        edit_json(
            path / "tokenizer_config.json",
            lambda c: c.update(
                auto_map={"AutoTokenizer": ["evil.Evil", "evil.Evil"]}, tokenizer_class="Evil"
            ),
        )
    else:
        edit_json(
            path / "config.json", lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig"})
        )
    return str(path)


def hf_checkpoint(work, name="hf"):
    """An unconverted Hugging Face checkpoint (the tiny Jet-Nemotron fixture) with a tokenizer
    and the remote code its config.json's auto_map names, which here leaves the marker."""
    path = shutil.copytree(FIXTURES / "jet-nemotron-tiny", work / name)
    write_tokenizer(path)
    for module in ("configuration_jet_nemotron", "modeling_jet_nemotron"):
        (path / f"{module}.py").write_text(evil_code(work.parent / "marker"))
    return str(path)


def run(work, *args, stdin="y\ny\ny\n", timeout=120):
    home = work.parent / "home"
    env = {
        **os.environ,
        "HOME": str(home),
        "MLX_SLEEP_HOME": str(home / "mlx-sleep"),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    r = subprocess.run(
        CLI + [str(a) for a in args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=timeout,
    )
    return r.returncode, r.stdout + r.stderr


def assert_refused(work, code, output, expect, before):
    assert_one_clear_line(code, output, expect)
    assert PROMPT_TEXT not in output, output
    assert not (work.parent / "marker").exists(), "code from the model directory ran"
    assert snapshot(work) == before


COMMANDS = {
    "generate": lambda m, w: ["generate", "--model", m, "-p", "hi", "-m", "2"],
    "chat": lambda m, w: ["chat", "--model", m, "-s", "x", "-m", "2"],
    "finetune": lambda m, w: [
        "finetune",
        "--model",
        m,
        "--data",
        GSM,
        "--out",
        w / "ft",
        "--steps",
        "1",
    ],
    "eval": lambda m, w: [
        "eval",
        "--model",
        m,
        "--task",
        "gsm-infinite",
        "--data",
        GSM,
        "--ops",
        "2",
        "--limit",
        "1",
        "--out",
        w / "o",
    ],
}


# -- (A) code in a model directory is never run --------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_a_tokenizer_auto_map_is_refused_and_never_run(tiny, work, command):
    model = with_code(tiny, work, "tokenizer")
    before = snapshot(work)
    code, output = run(work, *COMMANDS[command](model, work), stdin="y\nhello\ny\n")
    assert_refused(work, code, output, "tokenizer_config.json: auto_map names Python code", before)


def test_a_config_auto_map_is_refused_and_never_run(tiny, work):
    model = with_code(tiny, work, "config")
    before = snapshot(work)
    code, output = run(work, "generate", "--model", model, "-p", "hi")
    assert_refused(work, code, output, "config.json: auto_map names Python code", before)
    with pytest.raises(ConfigError, match="auto_map"):
        mlx_sleep.load_model(model)


@pytest.mark.parametrize("where", ["tokenizer", "config"])
def test_load_refuses_auto_map(tiny, work, where):
    model = with_code(tiny, work, where)
    before = snapshot(work)
    with pytest.raises(ConfigError, match="auto_map names Python code to run"):
        mlx_sleep.load(model)
    assert not (work.parent / "marker").exists()
    assert snapshot(work) == before


def test_transformers_is_told_never_to_run_code(tiny, work, monkeypatch):
    """Even past our auto_map check, transformers gets trust_remote_code=False: it refuses the
    custom class (an error, in one line) instead of asking on stdin or importing it."""
    monkeypatch.setattr(loading, "refuse_code", lambda config, where: None)
    model = with_code(tiny, work, "tokenizer")
    with pytest.raises(ConfigError, match="tokenizer files could not be loaded"):
        mlx_sleep.load(model)
    assert not (work.parent / "marker").exists()
    with pytest.raises(ConfigError, match="trust_remote_code"):
        mlx_sleep.load(model, tokenizer_config={"trust_remote_code": True})


def test_convert_refuses_a_tokenizer_auto_map(work):
    src = hf_checkpoint(work)
    (work / "hf" / "evil.py").write_text(evil_code(work.parent / "marker"))
    edit_json(
        work / "hf" / "tokenizer_config.json",
        lambda c: c.update(auto_map={"AutoTokenizer": ["evil.Evil", None]}, tokenizer_class="Evil"),
    )
    before = snapshot(work)
    code, output = run(work, "convert", "--hf-path", src, "--out", work / "out")
    assert_refused(work, code, output, "tokenizer_config.json: auto_map names Python code", before)


def test_convert_never_runs_the_checkpoint_code_and_its_output_loads(work):
    """A Jet-Nemotron checkpoint's config.json names its remote code (auto_map); convert reads
    it as JSON only, writes no auto_map, and the converted model loads without it."""
    src = hf_checkpoint(work)
    code, output = run(work, "convert", "--hf-path", src, "--out", work / "out", stdin="y\n")
    assert code == 0, output
    assert "auto_map" not in read_json(str(work / "out" / "config.json"))
    model, tokenizer = mlx_sleep.load(str(work / "out"))
    assert tokenizer.encode("hi") and not (work.parent / "marker").exists()


# -- (B) an unconverted checkpoint: convert it first -------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unconverted_checkpoint_needs_convert_first(work, command):
    src = hf_checkpoint(work)
    before = snapshot(work)
    code, output = run(work, *COMMANDS[command](src, work), stdin="y\nhello\ny\n")
    assert_refused(work, code, output, "is a Hugging Face checkpoint", before)
    assert "mlx-sleep convert --hf-path" in output


def test_load_and_load_model_refuse_an_unconverted_checkpoint(work):
    src = hf_checkpoint(work)
    for fn in (mlx_sleep.load, mlx_sleep.load_model):
        with pytest.raises(ConfigError, match="is a Hugging Face checkpoint.*convert it first"):
            fn(src)
    assert not (work.parent / "marker").exists()


def test_a_hub_checkpoint_is_refused_before_its_weights_are_fetched(work, monkeypatch):
    """A Hub id: its config.json alone is fetched and checked first (no network here: the
    download functions are stand-ins)."""
    import huggingface_hub

    cache = shutil.copytree(FIXTURES / "jet-nemotron-tiny", work / "cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(cache / name))

    def snapshot_download(*args, **kwargs):
        raise AssertionError("the weights were fetched")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for fn in (mlx_sleep.load, mlx_sleep.load_model):
        with pytest.raises(
            ConfigError,
            match="^jet-ai/Jet-Nemotron-2B is a Hugging Face "
            "checkpoint.*--hf-path jet-ai/Jet-Nemotron-2B",
        ):
            fn("jet-ai/Jet-Nemotron-2B")


def test_a_pickle_checkpoint_is_refused_before_it_is_opened(work):
    """load_model on a directory holding a pickle .bin: the convert-first line, not an error
    from deep inside torch; convert reads it with weights_only=True, which refuses the pickle."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(work.parent / "marker"), "w"))

    src = shutil.copytree(FIXTURES / "jet-nemotron-tiny", work / "bin")
    os.remove(src / "model.safetensors")
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    before = snapshot(work)
    with pytest.raises(ConfigError, match="convert it first") as e:
        mlx_sleep.load_model(str(src))
    assert "\n" not in str(e.value)
    assert_one_clear_line(*cli("convert", "--hf-path", src, "--out", work / "out"))
    assert not (work.parent / "marker").exists() and snapshot(work) == before


def test_a_directory_that_is_not_a_model(work):
    (work / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        mlx_sleep.load_model(str(work / "d"))
    (work / "d" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no 'model' and 'sleep' settings"):
        mlx_sleep.load_model(str(work / "d"))


# -- (C) hostile or malformed files -------------------------------------------------------------

BOMB = "[" * 100_000 + "]" * 100_000


def test_parse_json_limits_depth_and_names_the_source():
    assert parse_json('{"a": [[1]]}', "x") == {"a": [[1]]}
    assert parse_json("[" * 64 + "]" * 64, "x")
    for text in (BOMB, "[" * 65 + "]" * 65, '{"a": ' * 200 + "1" + "}" * 200):
        with pytest.raises(ConfigError, match="x nests deeper than 64 levels"):
            parse_json(text, "x")
    with pytest.raises(ConfigError, match="x is not valid JSON"):
        parse_json("1" * 5000, "x")


def test_read_json_refuses_a_huge_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[" + "0," * 1000 + "0]")
    with pytest.raises(ConfigError, match="c.json is 2,003 bytes, more than the 1,000"):
        read_json(str(path), max_bytes=1000)


def test_convert_refuses_a_json_bomb_config(work):
    src = shutil.copytree(FIXTURES / "jet-nemotron-tiny", work / "src")
    (src / "config.json").write_text(BOMB)
    before = snapshot(work)
    assert_one_clear_line(
        *cli("convert", "--hf-path", src, "--out", work / "m"),
        "config.json nests deeper than 64 levels",
    )
    assert snapshot(work) == before


@pytest.mark.parametrize(
    "name", ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
)
def test_generate_refuses_a_json_bomb(tiny, work, name):
    model = copy_model(tiny, work)
    (model / name).write_text(BOMB)
    before = snapshot(work)
    assert_one_clear_line(
        *cli("generate", "--model", model, "-p", "hi", "-m", "1"),
        f"{name} nests deeper than 64 levels",
    )
    assert snapshot(work) == before


def test_a_json_bomb_in_a_safetensors_header_or_shard_index(tiny, work):
    model = copy_model(tiny, work)
    header = BOMB.encode()
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="model.safetensors is corrupt: its header nests deeper"):
        mlx_sleep.load_model(str(model))
    (model / "model.safetensors.index.json").write_text(BOMB)
    with pytest.raises(ValueError, match="not a valid shard index"):
        mlx_sleep.load_model(str(model))


QUANTIZATION = [
    ({"bits": 4}, "quantization has no group_size"),
    ({"group_size": 64}, "quantization has no bits"),
    ("4bit", "quantization must be an object"),
    ({"group_size": "64", "bits": 4}, "quantization.group_size must be one of 32, 64, 128"),
    ({"group_size": 64, "bits": 7}, "quantization.bits must be one of 2, 3, 4, 5, 6, 8"),
    ({"group_size": 64, "bits": True}, "quantization.bits must be one of"),
    ({"group_size": 64, "bits": 4, "mode": "int4"}, "quantization.mode must be one of"),
    (
        {"group_size": 64, "bits": 4, "layers.0.mlp": {"bits": 4}},
        "quantization['layers.0.mlp'] has no group_size",
    ),
    (
        {"group_size": 64, "bits": 3},
        "quantization says 3-bit affine but the weights hold no quantization scales",
    ),
]


@pytest.mark.parametrize("quantization,message", QUANTIZATION)
def test_a_bad_quantization_setting(tiny, work, quantization, message):
    model = copy_model(tiny, work)
    edit_json(model / "config.json", lambda c: c.update(quantization=quantization))
    before = snapshot(work)
    code, output = cli("generate", "--model", model, "-p", "hi", "-m", "1")
    assert_one_clear_line(code, output, f"{model}/config.json: {message}")
    assert snapshot(work) == before


def test_quantization_bits_that_disagree_with_the_weights(work):
    model = make_model_dir(work / "q", "jet_nemotron", quantize=True, q_bits=8)
    edit_json(os.path.join(model, "config.json"), lambda c: c["quantization"].update(bits=4))
    before = snapshot(work)
    assert_one_clear_line(
        *cli("generate", "--model", model, "-p", "hi", "-m", "1"),
        "the weights do not match config.json",
    )
    assert snapshot(work) == before


def test_tie_word_embeddings_a_string_is_refused_by_convert(work):
    src = shutil.copytree(FIXTURES / "jet-nemotron-tiny", work / "src")
    edit_json(src / "config.json", lambda c: c.update(tie_word_embeddings="false"))
    before = snapshot(work)
    assert_one_clear_line(
        *cli("convert", "--hf-path", src, "--out", work / "m"),
        f"{src}/config.json: tie_word_embeddings must be true or false (got 'false')",
    )
    assert snapshot(work) == before


@pytest.mark.parametrize(
    "kind,edit,message",
    [
        (
            "qwen3_5",
            lambda m: m["args"].update(tie_word_embeddings="false"),
            "tie_word_embeddings must be true or false (got 'false')",
        ),
        ("qwen3_5", lambda m: m["args"].update(hidden_size="32"), "hidden_size must be an integer"),
        (
            "hybrid",
            lambda m: m.update(tie_embeddings="yes"),
            "tie_embeddings must be true or false",
        ),
    ],
)
def test_a_converted_model_setting_of_the_wrong_type(work, kind, edit, message):
    model = make_model_dir(work / "m", kind)
    edit_json(os.path.join(model, "config.json"), lambda c: edit(c["model"]))
    before = snapshot(work)
    code, output = cli("generate", "--model", model, "-p", "hi", "-m", "1")
    assert_one_clear_line(code, output, message)
    assert f"{model}/config.json" in output
    assert snapshot(work) == before


@pytest.mark.parametrize(
    "name",
    [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "additional_chat_templates/tools.jinja",
        "notes.txt",
    ],
)
def test_a_fifo_where_a_file_is_read_is_refused_not_opened(tiny, work, name):
    model = copy_model(tiny, work)
    os.makedirs(os.path.dirname(model / name), exist_ok=True)
    if os.path.lexists(model / name):
        os.remove(model / name)
    os.mkfifo(model / name)
    before = snapshot(work)
    t0 = time.perf_counter()
    code, output = run(work, "generate", "--model", model, "-p", "hi", "-m", "1", timeout=60)
    assert_one_clear_line(code, output, f"{name} is a FIFO, not a regular file")
    assert time.perf_counter() - t0 < 60
    assert snapshot(work) == before


def test_convert_refuses_a_fifo_tokenizer_file(work):
    src = hf_checkpoint(work, "src")
    os.remove(os.path.join(src, "tokenizer.json"))
    os.mkfifo(os.path.join(src, "tokenizer.json"))
    before = snapshot(work)
    code, output = run(work, "convert", "--hf-path", src, "--out", work / "m", timeout=60)
    assert_one_clear_line(code, output, "tokenizer.json is a FIFO, not a regular file")
    assert snapshot(work) == before


@pytest.mark.parametrize(
    "value,message",
    [
        ("../../os", "chat_template_type '../../os' is not one of mlx-lm's"),
        ("no_such_template", "chat_template_type 'no_such_template' is not one of mlx-lm's"),
    ],
)
def test_tokenizer_config_names_an_mlx_lm_module(tiny, work, value, message):
    model = copy_model(tiny, work)
    edit_json(model / "tokenizer_config.json", lambda c: c.update(chat_template_type=value))
    assert_one_clear_line(*cli("generate", "--model", model, "-p", "hi", "-m", "1"), message)
