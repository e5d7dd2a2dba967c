"""GSM-Infinite: the official scorers reproduce every verdict of the reference cases, the
leaderboard AUC is the official formula, the paper protocol's prompt and chunking, and both
protocols end to end (sweep over N, results, resume, re-scoring) on a tiny converted model."""

import json
import os

import mlx.core as mx
import pytest
from click.testing import CliRunner

import mlx_sleep
from mlx_sleep import SleepConfig, SleepEngine, sleep_forward
from mlx_sleep.cli import main
from mlx_sleep import gsm_infinite as gi
from mlx_sleep.io import read_jsonl
from mlx_sleep.sleep import chunk_bounds

from .numerics import assert_close
from .tiny_models import make_model_dir

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "gsm-infinite")


def fixture(name):
    """The records of a fixture: GSM-Infinite problems checked as every data file is; the
    scoring cases (not problems) as plain JSONL."""
    path = os.path.join(FIX, name)
    if name.endswith("_cases.jsonl"):
        return [r for _, r in read_jsonl(path)]
    return gi.read_problems(path)


# -- scoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", fixture("scoring_cases.jsonl"), ids=lambda c: str(c["case_id"]))
def test_keyword_rule_reproduces_every_official_verdict(case):
    assert gi.realistic_correct(case["solution"], case["model_reply"]) == case["expected_correct"]


def test_scoring_cases_cover_both_verdicts():
    verdicts = [c["expected_correct"] for c in fixture("scoring_cases.jsonl")]
    assert len(verdicts) == 40 and sum(verdicts) == 23


def test_keyword_rule_details():
    assert gi.realistic_answer("So the result is \\text{Answer: } 30") == 30  # upstream raises here
    assert gi.realistic_answer("no number at all") is None
    assert gi.gold_answer({"solution": "Define x; so x = 3. Answer: 3."}) == 3


@pytest.mark.parametrize(
    "case", fixture("symbolic_judge_cases.jsonl"), ids=lambda c: str(c["case_id"])
)
def test_symbolic_judge_step_reproduces_every_official_verdict(case):
    """The judge prompt is upstream's get_prompt byte for byte; a judge answering with the
    recorded judge output gives upstream's extracted variables and verdict."""
    assert gi.judge_prompt(case["model_reply"], case["answer_q"]) == case["judge_prompt"]
    record = {"answer_list": case["answer_list"], "answer_q": case["answer_q"]}
    asked = []

    def judge(prompt):
        asked.append(prompt)
        return case["judge_output"]

    correct, found, out = gi.symbolic_correct(record, case["model_reply"], judge)
    assert asked == [case["judge_prompt"]] and out == case["judge_output"]
    assert correct == case["expected_correct"]
    assert found == sorted(set(case["extracted_variables"]))


def test_symbolic_regex_fallback():
    gold = {"answer_list": ["V1", "V22"], "answer_q": 3}
    ok = lambda reply: gi.symbolic_correct(gold, reply)[0]  # noqa: E731
    assert ok("V5 = V1 + 2 = 3, so V22 = 3.\nAnswer: V22, V1")
    assert not ok("V5 = V1 + 2 = 3.\nAnswer: V22")
    assert ok("<think>Answer: V9</think>\nV1, V22")  # reasoning is dropped first
    assert not ok("I cannot tell.")
    assert gi.score({**gold, "op": 2}, "Answer: V1, V22", "official")["scorer"] == "regex-fallback"


def test_paper_answers_are_exact():
    medium = fixture("medium_0.jsonl")[0]
    gold = gi.gold_answer(medium)
    assert gi.score(medium, f" {gold}\nmore", "paper")["correct"]
    assert not gi.score(medium, f"{gold + 1}", "paper")["correct"]
    assert not gi.score(medium, f"so {gold}", "paper")["correct"]  # the number only
    symbolic = fixture("symbolic_0.jsonl")[6]
    assert gi.score(symbolic, ", ".join(reversed(symbolic["answer_list"])), "paper")["correct"]
    assert not gi.score(symbolic, symbolic["answer_list"][0] + ", V0", "paper")["correct"]


# -- results ----------------------------------------------------------------------------------


def test_auc_is_the_leaderboards_formula():
    acc = {8: 0.25, 2: 0.9, 4: 0.5, 6: 0.5}  # unsorted on purpose
    by_hand = 100 * sum((b - a) * (acc[a] + acc[b]) / 2 for a, b in [(2, 4), (4, 6), (6, 8)])
    assert_close(gi.leaderboard_auc(acc), by_hand, rtol=1e-12, what="AUC")
    assert_close(by_hand, 315.0, rtol=1e-12, what="AUC by hand")


def test_summary_counts_and_wilson_interval():
    preds = (
        [{"loops": 2, "op": 4, "correct": i < 8} for i in range(10)]
        + [{"loops": 2, "op": 2, "correct": True}] * 5
        + [{"loops": 1, "op": 2, "correct": False}]
    )
    s = gi.summarize(preds)
    assert list(s) == ["N = 1", "N = 2"]
    op4 = s["N = 2"]["ops"][4]
    assert (op4["n"], op4["correct"], op4["accuracy"]) == (10, 8, 0.8)
    assert_close(
        op4["ci95"], [0.4902, 0.9433], rtol=0, atol=1e-4, what="Wilson, z = 1.96"
    )  # 4 digits
    assert_close(s["N = 2"]["auc"], 100 * 2 * (1.0 + 0.8) / 2, rtol=1e-12, what="AUC")
    assert s["N = 1"]["auc"] is None  # one op count: no area
    table = gi.markdown_table(s)
    assert "| 4 | - | 0.800 [0.49, 0.94] (n=10) |" in table and "| AUC | - | 180.0 |" in table


# -- data and prompts -------------------------------------------------------------------------


def test_paper_prompt_puts_the_question_before_the_context():
    for record in fixture("medium_0.jsonl") + fixture("symbolic_0.jsonl"):
        ex = gi.paper_example(record)
        prompt = ex["prompt"]
        assert prompt.index(record["question"].strip()) < prompt.index(record["problem"].strip())
        gold = gi.gold_answer(record)
        text = ", ".join(gold) if isinstance(gold, list) else str(gold)
        assert ex["answer"] == "Answer: " + text
        assert "Answer" not in prompt.split("Context:")[0].replace(record["question"], "")


def test_selection_by_op_and_limit():
    by_op = gi.select(fixture("medium_0.jsonl"), [8, 2], 4)
    assert list(by_op) == [2, 8] and [len(v) for v in by_op.values()] == [4, 4]
    with pytest.raises(ValueError, match=r"no records with op 3 \(ops present: 2, 4, 6, 8\)"):
        gi.select(fixture("medium_0.jsonl"), [2, 3])
    assert gi.parse_ops("2-8:2") == [2, 4, 6, 8] and gi.parse_ops("1,3-4") == [1, 3, 4]


def test_official_filter_and_hub_split_files():
    split = [
        {"template": t, "mode": m, "i": i}
        for i in range(30)
        for t in gi.OFFICIAL_FILTER
        for m in ("normalforward", "forwardreverse")
    ]
    rows = gi.official_filter(split, 40)  # of 40: 16 crazy_zootopia and 2 of each other per mode
    count = lambda t, m: sum(r["template"] == t and r["mode"] == m for r in rows)  # noqa: E731
    assert count("crazy_zootopia", "forwardreverse") == 16
    assert count("teachers_in_school", "normalforward") == 2
    assert len(rows) == 40
    files = [
        "README.md",
        "data/ops_2-00000-of-00001.parquet",
        "data/ops_20-00000-of-00001.parquet",
        "data/ops_2-00001-of-00002.parquet",
        "ops_3.parquet",
    ]
    assert gi.split_files(files, 2) == [
        "data/ops_2-00000-of-00001.parquet",
        "data/ops_2-00001-of-00002.parquet",
    ]
    assert gi.split_files(files, 3) == ["ops_3.parquet"]


def test_bad_data_files_give_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"problem": "x", "question": "y", "op": 2, "solution": "Answer: 3."}\nnot json\n'
    )
    with pytest.raises(ValueError, match="bad.jsonl line 2 is not valid JSON"):
        gi.read_problems(str(bad))
    bad.write_text('{"problem": "x"}\n')
    with pytest.raises(ValueError, match='line 1: "question" must be a string'):
        gi.read_problems(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gi.read_problems(str(tmp_path / "missing.jsonl"))


# -- running a model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm")
    return str(make_model_dir(root / "hybrid", "hybrid", loops=1, window=48))


class RecordingEngine(SleepEngine):
    """Notes, at every feed, what the model can still see."""

    def feed(self, ids, logits="all", sampled=False):
        kv = [s["keys"].shape[2] for s in self.state if "keys" in s]
        self.seen.append((self.offset, self.window_len, sum(kv), ids.shape[-1]))
        return super().feed(ids, logits, sampled)


def test_paper_protocol_evicts_the_question_before_the_answer(tiny):
    model, tokenizer = mlx_sleep.load(tiny)
    record = fixture("medium_0.jsonl")[5]
    L = 48
    engine = RecordingEngine(model, SleepConfig(loops=2, window=L))
    engine.seen = []
    gi.paper_generate(engine, tokenizer, record, max_tokens=3)
    n_prompt = len(tokenizer.encode(gi.paper_example(record)["prompt"]))
    assert engine.seen[0] == (0, 0, 0, n_prompt)
    # the cue continues the live window: the prompt's last, partial window; every window before
    # it (the question's among them) was consolidated and evicted
    tail = n_prompt % L
    assert engine.seen[1][:2] == (n_prompt, tail) and engine.seen[1][2] > 0
    assert engine.sleeps >= n_prompt // L and n_prompt > 2 * L


@pytest.mark.parametrize("add_bos", [False, True], ids=["no BOS", "BOS"])
def test_a_record_is_the_same_ids_in_finetune_eval_and_data(tmp_path, add_bos):
    """tokens.py: the paper protocol feeds the prompt and the cue, and fine-tuning trains on
    those very ids followed by the answer, whether it reads the record itself or the file `data
    gsm-infinite` wrote; BOS where the tokenizer adds one, once, at the start (so every window
    boundary falls on the same token in training and evaluation)."""
    from mlx_sleep.finetune.data import load_examples, tokenize_record
    from mlx_sleep.generate import prompt_ids

    from .tiny_models import BOS, write_tokenizer

    path = make_model_dir(tmp_path / "m", "hybrid", window=48)
    bos = write_tokenizer(path, add_bos=add_bos)[BOS]
    model, tokenizer = mlx_sleep.load(path)
    record = fixture("medium_0.jsonl")[3]
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(record) + "\n")
    written = tmp_path / "train.jsonl"
    args = ["--data", one, "--ops", record["op"], "--out", written]
    assert invoke("data", "gsm-infinite", *args).exit_code == 0
    [(from_file, scored)] = load_examples(str(written), tokenizer, model.vocab_size)
    ids, _ = tokenize_record(gi.paper_example(record), tokenizer)
    assert from_file.tolist() == ids

    class FedEngine(SleepEngine):
        def feed(self, x, logits="all", sampled=False):
            self.fed.append(x.reshape(-1).tolist())
            return super().feed(x, logits, sampled)

    engine = FedEngine(model, SleepConfig(loops=2, window=48))
    engine.fed = []
    gi.paper_generate(engine, tokenizer, record, max_tokens=2)
    context = engine.fed[0] + engine.fed[1]  # the prompt, then the cue
    assert ids[: len(context)] == context and not any(scored[: len(engine.fed[0]) - 1])
    assert (ids[0] == bos) == add_bos and bos not in ids[1:]
    raw = prompt_ids(tokenizer, "hello", chat_template=False)  # generate --no-chat-template
    assert (raw[0] == bos) == add_bos and len(raw) == 5 + add_bos
    assert bos not in prompt_ids(tokenizer, "hello")  # the template writes what it wants


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("prompt_len", ["L - 1", "L", "L + 1", "2L"])
def test_training_and_the_protocol_see_the_same_passes_at_window_edges(tiny, prompt_len, eviction):
    """One rule for where the answer begins: the prompt's last token predicts the answer's
    first. A record's answer logits under finetune's batch and chunk plan equal, position by
    position, what the protocol's decoder computes (the prompt fed, begin_answer(), the answer
    fed token by token): the window holding the prompt's last token takes one pass in both,
    also when the prompt fills it exactly (L, 2L)."""
    import numpy as np

    from mlx_sleep.finetune.data import make_batch
    from mlx_sleep.sleep import plan_chunks

    model, _ = mlx_sleep.load(tiny)
    L = 8
    sleep = SleepConfig(loops=3, window=L, eviction=eviction)
    P = {"L - 1": L - 1, "L": L, "L + 1": L + 1, "2L": 2 * L}[prompt_len]
    rng = np.random.default_rng(P)
    prompt, answer = rng.integers(0, 200, P).tolist(), rng.integers(0, 200, 5).tolist()
    ids = np.array(prompt + answer, dtype=np.int32)
    scored = np.array([False] * P + [True] * len(answer))
    inputs, _, mask = make_batch([(ids, scored)], pad_id=0)
    answers, _ = sleep_forward(model, mx.array(inputs), None, sleep, plan=plan_chunks(mask, L))
    trained = mx.concatenate([logits for _, _, logits in answers], axis=1)[0]
    first = answers[0][0]  # positions of the answer chunks, from the first one's start
    engine = SleepEngine(model, sleep)
    decoded = [engine.feed(mx.array(prompt), logits="last")[0, -1]]
    engine.begin_answer()
    for token in answer[:-1]:
        decoded.append(engine.feed(mx.array([token]), logits="last")[0, -1])
    for i, logits in enumerate(decoded):
        assert_close(logits, trained[P - 1 + i - first], rtol=1e-5, what=f"answer logits {i}")


def reference_paper_output(model, tokenizer, record, sleep, max_tokens):
    """Algorithm 1 written out: prompt + cue + answer so far split into windows of L from the
    start; windows without a scored position (the prompt's last token predicts the cue's
    first, so it counts) get N passes and are evicted, the others one pass."""
    prompt = tokenizer.encode(gi.paper_example(record)["prompt"])
    answer = tokenizer.encode(gi.ANSWER_CUE, add_special_tokens=False)
    generated = []
    for _ in range(max_tokens):
        seq = prompt + answer + generated
        bounds = chunk_bounds(len(seq), sleep.window)
        # an answer chunk holds a scored position: the prompt's last (it predicts the cue) on
        plan = (bounds, [b >= len(prompt) for _, b in bounds])
        answers, _ = sleep_forward(model, mx.array([seq]), None, sleep, plan=plan)
        token = int(mx.argmax(answers[-1][2][0, -1]))
        if token in tokenizer.eos_token_ids:
            break
        generated.append(token)
        if "\n" in tokenizer.decode(generated).strip():
            break
    return tokenizer.decode(generated).strip()


@pytest.mark.parametrize("loops,eviction", [(1, "hard"), (3, "hard"), (2, "sliding")])
def test_paper_protocol_is_algorithm_1(tiny, loops, eviction):
    model, tokenizer = mlx_sleep.load(tiny)
    sleep = SleepConfig(loops=loops, window=40, eviction=eviction)
    for record in fixture("medium_0.jsonl")[:2]:
        got = gi.paper_generate(SleepEngine(model, sleep), tokenizer, record, max_tokens=5)
        assert got == reference_paper_output(model, tokenizer, record, sleep, 5)


def test_paper_protocol_on_attention_only_model_sees_only_the_live_window(tmp_path):
    """Hard eviction, no fast weights: the answer depends on the prompt's last, partial window
    alone (the same tail gives the same answer), so the question, evicted, cannot reach it."""
    from mlx_sleep import HybridLM, ModelConfig

    mx.random.seed(1)
    model = HybridLM(ModelConfig(vocab_size=512, hidden_size=32, num_heads=2, layers="attn,attn"))
    _, tokenizer = mlx_sleep.load(make_model_dir(tmp_path / "m", "hybrid"))
    record = fixture("medium_0.jsonl")[0]
    L = 32
    prompt = tokenizer.encode(gi.paper_example(record)["prompt"])
    out = gi.paper_generate(SleepEngine(model, SleepConfig(window=L)), tokenizer, record, 4)
    # another question, same length, same context: only the evicted first window differs
    other = dict(record, question="Z" * len(record["question"]))
    assert len(tokenizer.encode(gi.paper_example(other)["prompt"])) == len(prompt) > 2 * L
    assert gi.paper_generate(SleepEngine(model, SleepConfig(window=L)), tokenizer, other, 4) == out
    # with fast weights the question does reach the answer window, through S
    hybrid, _ = mlx_sleep.load(make_model_dir(tmp_path / "h", "hybrid"))
    fast = []
    for r in (record, other):
        engine = SleepEngine(hybrid, SleepConfig(window=L))
        gi.paper_generate(engine, tokenizer, r, 1)
        fast.append([s["S"] for s in engine.state if "S" in s])
    assert max(float(mx.abs(x - y).max()) for x, y in zip(*fast)) > 1e-4


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_sweep_end_to_end_with_resume_and_rescoring(tiny, tmp_path):
    out = tmp_path / "run"
    base = [
        "eval",
        "--model",
        tiny,
        "--task",
        "gsm-infinite",
        "--data",
        os.path.join(FIX, "medium_0.jsonl"),
        "--ops",
        "2,4",
        "--limit",
        "2",
        "--out",
        out,
    ]
    r = invoke(*base, "--loops", "1,2")
    assert r.exit_code == 0, r.output
    assert "| op | N = 1 | N = 2 |" in r.output and "| AUC |" in r.output
    results = json.load(open(out / "results.json"))
    assert results["settings"]["protocol"] == "paper" and results["settings"]["loops"] == [1, 2]
    assert len(results["settings"]["model_digest"]) == 64
    assert set(results["results"]) == {"N = 1", "N = 2"}
    assert all(r["ops"][op]["n"] == 2 for r in results["results"].values() for op in ("2", "4"))
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "results.md").exists()
    lines = (out / "predictions.jsonl").read_text().splitlines()
    preds = [json.loads(line) for line in lines]
    assert len(preds) == 8 and {p["loops"] for p in preds} == {1, 2}
    assert all({"problem", "question", "solution", "output", "correct"} <= set(p) for p in preds)
    for p in preds:  # each verdict is the rule applied to the stored output
        assert p["correct"] == (gi.paper_answer(p, p["output"]) == gi.gold_answer(p))

    # interrupted: the last prediction half written, one missing; the rerun recomputes exactly those
    (out / "predictions.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:40])
    r = invoke(*base, "--loops", "1,2")
    assert r.exit_code == 0, r.output
    again = (out / "predictions.jsonl").read_text().splitlines()
    assert again[:6] == lines[:6] and len(again) == 8
    assert [json.loads(x)["output"] for x in again[6:]] == [p["output"] for p in preds[6:]]
    # N = 4 added to the same run: only its problems run, all three N reported
    r = invoke(*base, "--loops", "4")
    assert r.exit_code == 0 and "| op | N = 1 | N = 2 | N = 4 |" in r.output
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 12
    assert json.load(open(out / "run.json"))["loops"] == [1, 2, 4]
    # other settings into the same directory: refused
    r = CliRunner().invoke(main, [str(a) for a in base] + ["--protocol", "official"])
    assert r.exit_code == 1 and "holds a run with other settings (protocol: " in r.output

    # --score: the stored outputs under the official keyword rule, no model
    r = invoke(
        "eval",
        "--score",
        out / "predictions.jsonl",
        "--protocol",
        "official",
        "--out",
        tmp_path / "rescored",
    )
    assert r.exit_code == 0, r.output
    rescored = [json.loads(x) for x in open(tmp_path / "rescored" / "predictions.jsonl")]
    assert [p["correct"] for p in rescored] == [
        gi.realistic_correct(p["solution"], p["output"]) for p in rescored
    ]
    summary = json.load(open(tmp_path / "rescored" / "results.json"))["results"]
    assert summary["N = 4"]["ops"]["2"]["n"] == 2


def test_official_protocol_end_to_end(tiny, tmp_path):
    r = invoke(
        "eval",
        "--model",
        tiny,
        "--task",
        "gsm-infinite",
        "--protocol",
        "official",
        "--data",
        os.path.join(FIX, "medium_0.jsonl"),
        "--ops",
        "2",
        "--limit",
        "2",
        "--max-tokens",
        "6",
        "--window",
        "64",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 0, r.output
    preds = [json.loads(x) for x in open(tmp_path / "o" / "predictions.jsonl")]
    assert len(preds) == 2 and all(p["scorer"] == "keyword" for p in preds)
    # the reply is greedy generation from the chat template of the record's messages
    model, tokenizer = mlx_sleep.load(tiny)
    engine = SleepEngine(model, SleepConfig(loops=1, window=64))
    from mlx_sleep.generate import generate

    prompt = tokenizer.apply_chat_template(preds[0]["messages"], add_generation_prompt=True)
    assert preds[0]["output"] == generate(engine, tokenizer, prompt, 6).strip()
    assert json.load(open(tmp_path / "o" / "results.json"))["settings"]["window"] == 64


def test_symbolic_official_with_a_judge_model_and_without(tiny, tmp_path):
    common = [
        "eval",
        "--model",
        tiny,
        "--task",
        "gsm-infinite",
        "--protocol",
        "official",
        "--subset",
        "symbolic",
        "--data",
        os.path.join(FIX, "symbolic_0.jsonl"),
        "--ops",
        "1",
        "--limit",
        "1",
        "--max-tokens",
        "4",
    ]
    r = invoke(*common, "--out", tmp_path / "a")
    assert r.exit_code == 0 and "regex fallback" in r.output
    r = invoke(*common, "--judge-model", tiny, "--judge-max-tokens", "8", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    pred = json.loads(open(tmp_path / "b" / "predictions.jsonl").readline())
    assert pred["scorer"] == "judge" and isinstance(pred["judge_output"], str)
    assert json.load(open(tmp_path / "b" / "results.json"))["settings"]["judge"] == "hybrid"


def test_data_command_writes_the_paper_format(tmp_path):
    out = tmp_path / "train.jsonl"
    r = invoke(
        "data",
        "gsm-infinite",
        "--data",
        os.path.join(FIX, "medium_0.jsonl"),
        "--ops",
        "2,4,6,8",
        "--out",
        out,
    )
    assert r.exit_code == 0 and "wrote 24 examples" in r.output
    rows = [json.loads(x) for x in open(out)]
    assert rows[0].pop("written_by") == "mlx-sleep data gsm-infinite"  # the owner mark
    records = fixture("medium_0.jsonl")
    by_op = gi.select(records, [2, 4, 6, 8])
    assert rows == [{**gi.paper_example(r), "op": op} for op, rs in by_op.items() for r in rs]
    r = invoke(
        "data",
        "gsm-infinite",
        "--data",
        os.path.join(FIX, "medium_0.jsonl"),
        "--ops",
        "4,8",
        "--skip",
        "2",
        "--limit",
        "3",
        "--out",
        tmp_path / "held_out.jsonl",
    )
    assert r.exit_code == 0 and "wrote 6 examples" in r.output
    rows = [json.loads(x) for x in open(tmp_path / "held_out.jsonl")]
    rows[0].pop("written_by")
    assert rows == [{**gi.paper_example(r), "op": op} for op in (4, 8) for r in by_op[op][2:5]]
    r = CliRunner().invoke(
        main,
        ["data", "gsm-infinite", "--data", os.path.join(FIX, "medium_0.jsonl"), "--out", str(out)],
    )
    assert r.exit_code == 1 and "exists; pass --force to replace it" in r.output
    r = CliRunner().invoke(
        main,
        [
            "data",
            "gsm-infinite",
            "--data",
            os.path.join(FIX, "medium_0.jsonl"),
            "--ops",
            "2,4",
            "--out",
            str(out),
            "--force",
        ],
    )
    assert r.exit_code == 0, r.output  # ours: --force replaces it
    every = tmp_path / "every.jsonl"  # no --ops: every op the file has (2, 4, 6, 8 here)
    r = invoke(
        "data", "gsm-infinite", "--data", os.path.join(FIX, "medium_8k.jsonl"), "--out", every
    )
    assert (
        r.exit_code == 0 and "wrote 8 examples (op 2: 2, op 4: 2, op 6: 2, op 8: 2) to" in r.output
    )
    empty = tmp_path / "empty.jsonl"
    r = invoke(
        "data",
        "gsm-infinite",
        "--data",
        os.path.join(FIX, "medium_0.jsonl"),
        "--ops",
        "2",
        "--skip",
        "200",
        "--out",
        empty,
    )
    assert r.exit_code == 1 and "no problems left after skipping the first 200" in r.output
    assert not empty.exists()  # an empty training file is not written


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--ops", "two"], "--ops 'two': expected op counts"),
        (["--loops", "0,2"], "'0,2' is not a list of loop counts in 1..1024"),
        (["--data", "/nonexistent.jsonl"], "does not exist"),
        (["--ops", "3"], "no records with op 3"),
        (["--judge-model", "x"], None),
    ],
)
def test_bad_options_give_one_line(tiny, tmp_path, extra, message):
    args = [
        "eval",
        "--model",
        tiny,
        "--task",
        "gsm-infinite",
        "--data",
        os.path.join(FIX, "medium_0.jsonl"),
        "--out",
        str(tmp_path / "o"),
        *extra,
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "Traceback" not in r.output
    if message:
        assert message in r.output, r.output


def test_a_model_without_tokenizer_gives_one_line(tmp_path):
    from mlx_sleep.convert import convert

    fixture_dir = convert(
        os.path.join(os.path.dirname(__file__), "fixtures", "jet-nemotron-tiny"),
        str(tmp_path / "m"),
    )  # converted, without tokenizer files
    r = CliRunner().invoke(
        main,
        ["eval", "--model", fixture_dir, "--task", "gsm-infinite", "--out", str(tmp_path / "o")],
    )
    assert r.exit_code == 1 and "has no tokenizer files" in r.output


def test_hub_needs_pyarrow_or_says_so(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ValueError, match="needs pyarrow: pip install pyarrow"):
        gi.hub_records("medium", "8k", [2])


def test_out_must_be_a_run_directory(tiny, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    r = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            tiny,
            "--task",
            "gsm-infinite",
            "--data",
            os.path.join(FIX, "medium_0.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 1 and "is not a GSM-Infinite run directory" in r.output
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


def test_adapter_is_applied(tiny, tmp_path):
    """--adapter takes mlx-lm's adapter layout (adapter_config.json + adapters.safetensors)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    lora = {"rank": 2, "scale": 10.0, "dropout": 0.0}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora})
    )
    model, tokenizer = mlx_sleep.load(tiny)
    linear_to_lora_layers(model, 2, lora)
    weights = {
        k: mx.full(v.shape, 0.1) if k.endswith("lora_b") else v
        for k, v in tree_flatten(model.parameters())
        if "lora" in k
    }
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
    model.load_weights(list(weights.items()), strict=False)
    ids = mx.array([[5, 6, 7]])
    base = mlx_sleep.load(tiny)[0]
    adapted = gi.load_adapter(mlx_sleep.load(tiny)[0], str(adapter))
    assert float(mx.abs(adapted(ids) - base(ids)).max()) > 1e-2
    assert_close(adapted(ids), model(ids), rtol=1e-5, what="adapter logits")

    r = invoke(
        "eval",
        "--model",
        tiny,
        "--task",
        "gsm-infinite",
        "--adapter",
        adapter,
        "--data",
        os.path.join(FIX, "medium_0.jsonl"),
        "--ops",
        "2",
        "--limit",
        "1",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 0, r.output
    settings = json.load(open(tmp_path / "o" / "results.json"))["settings"]
    assert settings["adapter"] == "adapter" and len(settings["adapter_digest"]) == 64
    pred = json.loads(open(tmp_path / "o" / "predictions.jsonl").readline())
    assert pred["output"] == gi.paper_generate(SleepEngine(model), tokenizer, pred)
    r = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            tiny,
            "--task",
            "gsm-infinite",
            "--adapter",
            str(tmp_path),
            "--out",
            str(tmp_path / "p"),
        ],
    )
    assert r.exit_code == 1 and "has no adapter_config.json" in r.output


def test_hub_path_with_a_fake_hub(monkeypatch):
    """The Hub glue without a network: the repository name, the split files per op, the
    official selection for medium (per template and mode) and the first K for symbolic."""
    import sys
    import types

    import huggingface_hub

    rows = {
        f"data/ops_{op}-00000-of-00001.parquet": [
            {
                "problem": f"p{op}-{i}",
                "question": "q",
                "op": op,
                "template": t,
                "mode": m,
                "solution": f"Answer: {i}.",
            }
            for i in range(30)
            for t in gi.OFFICIAL_FILTER
            for m in ("normalforward", "forwardreverse")
        ]
        for op in (2, 3)
    }
    asked = []

    class Api:
        def list_repo_files(self, repo, repo_type):
            asked.append((repo, repo_type))
            return ["README.md", *rows]

    parquet = types.ModuleType("pyarrow.parquet")
    parquet.read_table = lambda path: types.SimpleNamespace(to_pylist=lambda: rows[path])
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, repo_type: name)

    split2, split3 = rows.values()
    by_op = gi.load_records("medium", "16k", [3], limit=40, official=True)
    assert asked == [("InfiniAILab/gsm_infinite_medium_16k", "dataset")]
    assert list(by_op) == [3] and by_op[3] == gi.official_filter(split3, 40)
    assert len(by_op[3]) == 40
    assert gi.load_records("symbolic", "0", [2], limit=5)[2] == split2[:5]
    with pytest.raises(ValueError, match="has no split ops_4"):
        gi.load_records("medium", "16k", [4])
    with pytest.raises(
        ValueError, match="selects no problem for op 3 with --limit 1: .* 20 or more"
    ):
        gi.load_records("medium", "16k", [3], limit=1, official=True)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("a line without loops", 'line 1: "loops" must be an integer (got None)'),
        ("loops a string", "line 1: \"loops\" must be an integer (got '1')"),
        ("binary", "line 1 is not UTF-8 text"),
        ("run.json a list", "run.json holds a JSON list, not an object"),
        ("a FIFO", "predictions.jsonl is a FIFO, not a regular file"),
        ("a symlink to the user's file", "predictions.jsonl is a symlink, not a regular file"),
    ],
)
def test_a_damaged_run_is_refused_before_anything_is_written(tiny, tmp_path, damage, message):
    """Resuming reads predictions.jsonl and run.json before writing either: a damaged one
    is one line, and every file (run.json included, and the user's file a link points at)
    stays byte for byte as it was."""
    from tests.reliability import snapshot

    data = tmp_path / "d.jsonl"
    data.write_text(open(os.path.join(FIX, "medium_0.jsonl")).readline())
    args = ["eval", "--model", tiny, "--task", "gsm-infinite", "--data", data, "--ops", "2"]
    run = tmp_path / "run"
    assert invoke(*args, "--out", run).exit_code == 0
    predictions, user = run / "predictions.jsonl", tmp_path / "notes.txt"
    user.write_text("the user's")
    first = json.loads(predictions.read_text().splitlines()[0])
    if damage == "a line without loops":
        predictions.write_text(json.dumps({k: v for k, v in first.items() if k != "loops"}) + "\n")
    elif damage == "loops a string":
        predictions.write_text(json.dumps(dict(first, loops="1")) + "\n")
    elif damage == "binary":
        predictions.write_bytes(b"\xff\xfe not text\n")
    elif damage == "run.json a list":
        (run / "run.json").write_text("[]")
    elif damage == "a FIFO":
        predictions.unlink()
        os.mkfifo(predictions)
    else:
        predictions.unlink()
        os.symlink(user, predictions)
    before = snapshot(tmp_path)
    r = CliRunner().invoke(main, [str(a) for a in args + ["--out", run, "--loops", "1,2"]])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert message in r.output, r.output
    assert snapshot(tmp_path) == before
