"""Issue 11, generative task kinds and the eval/generate commands: causal-LM instruction tuning with
the loss on the response tokens only (chat template or plain format), exact match of final answers,
seq2seq on a tiny T5 directory, and ``peftlab eval`` / ``peftlab generate`` run as real processes on
adapters trained in the test (MiniLM on SST-2, SmolLM2 on Alpaca-format data). Real models: few
steps, short sequences."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import peftlab
from peftlab.cli import main
from peftlab.train.answers import GSM8K_ANSWER_REGEX, exact_match, extract_answer, normalise_answer
from peftlab.train.data import find_data_dir
from peftlab.train.examples import Examples
from peftlab.train.generative_data import IGNORE_INDEX, encode_generative, prompt_ids
from peftlab.train.generation import generate_continuations
from peftlab.train.prompts import PLAIN_TEMPLATE, choose_format
from conftest import one_thread
from tiny_dirs import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(find_data_dir() is None, reason="benchmark data (shared/data) not found")


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _peftlab(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m peftlab ARGS`` as a real process (one thread), checked for exit status 0."""
    run = subprocess.run([sys.executable, "-m", "peftlab", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def _examples(kind: str, pairs: list[tuple[str, str]]) -> Examples:
    return Examples(texts=[(p,) for p, _ in pairs], labels=[r for _, r in pairs], label_names=[], kind=kind,
                    metrics=["loss"])


# -- final answers ---------------------------------------------------------------------------------

def test_answers_extracted_normalised_and_matched_by_hand() -> None:
    assert extract_answer("so 3 + 4 = 7\n#### 7", GSM8K_ANSWER_REGEX) == "7"
    assert extract_answer("#### 1,234.50.", GSM8K_ANSWER_REGEX) == "1234.5"  # commas, trailing dot, float form
    assert extract_answer("#### 5 then #### 6", GSM8K_ANSWER_REGEX) == "6"  # the last match is the final answer
    assert extract_answer("no answer line", GSM8K_ANSWER_REGEX) is None
    assert extract_answer("answer: yes", r"answer: \w+") == "answer: yes"  # no group: the whole match
    assert normalise_answer(" $72.0 ") == "72" and normalise_answer("-3") == "-3" and normalise_answer("abc") == "abc"
    generations = ["... #### 18", "#### 3.0", "I think 100", "#### 7"]
    references = ["#### 18", "#### 3", "#### 100", "#### 8"]
    assert exact_match(generations, references, GSM8K_ANSWER_REGEX) == (0.5, 1)  # hits 1, 2; row 3 has no answer
    with pytest.raises(ValueError, match="not a regular expression"):
        exact_match(["x"], ["y"], "(")


# -- the loss only on the response ------------------------------------------------------------------

def test_plain_format_masks_the_prompt_and_ends_with_eos(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir(tmp_path, "llama", "causal-lm"))
    assert choose_format(tok, "causal-lm") == "plain"
    data = encode_generative(_examples("causal-lm", [("one two", "good movie"), ("the plot", "bad")]), tok, 64, "plain")
    for feature, prompt, response in zip(data.features, ["one two", "the plot"], ["good movie", "bad"]):
        n = len(tok(PLAIN_TEMPLATE.format(prompt=prompt))["input_ids"])
        target = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert feature["labels"] == [IGNORE_INDEX] * n + target  # loss on the response and its end only
        assert feature["input_ids"][n:] == target and len(feature["attention_mask"]) == len(feature["input_ids"])
    first = data.features[0]["input_ids"]
    assert data.prompt_ids[0] == prompt_ids(tok, "one two", "plain") == first[:len(data.prompt_ids[0])]


def test_smollm2_chat_template_masks_the_prompt() -> None:
    from transformers import AutoTokenizer

    from peftlab.zoo.smollm2 import ensure_cache

    tok = AutoTokenizer.from_pretrained(str(ensure_cache()[0]))
    assert choose_format(tok, "causal-lm") == "chat"
    data = encode_generative(_examples("causal-lm", [("Name a colour.", "Blue.")]), tok, 128, "chat")
    feature = data.features[0]
    n = feature["labels"].count(IGNORE_INDEX)
    assert tok.decode(feature["input_ids"][:n]).endswith("<|im_start|>user\nName a colour.<|im_end|>\n"
                                                          "<|im_start|>assistant\n")
    assert tok.decode(feature["labels"][n:]) == "Blue.<|im_end|>\n"  # what the template closes the turn with
    assert feature["input_ids"][n:] == feature["labels"][n:] and data.prompt_ids[0] == feature["input_ids"][:n]


# -- seq2seq on a tiny T5 ---------------------------------------------------------------------------

def test_seq2seq_t5_trains_evaluates_and_generates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model_dir(tmp_path, "t5", "seq2seq")
    rows = [("good movie", "good movie"), ("bad plot", "bad plot"), ("one two", "one two"), ("the movie", "the movie")]
    data = tmp_path / "copy.csv"
    data.write_text("source,target\n" + "".join(f"{s},{t}\n" for s, t in rows * 4))
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), "--prompt-col",
                 "source", "--response-col", "target", "--method", "lora[r=4,targets=all-linear]", "--lr", "0.02",
                 "--max-steps", "40", "--batch-size", "8", "--max-length", "16", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "seq2seq" and report["prompt_format"] == "seq2seq"
    assert report["metric_names"] == ["loss", "perplexity"] and report["head_modules"] == []
    assert report["metrics_after"]["loss"] < 0.25 * report["metrics_before"]["loss"]  # it learns to copy
    assert report["metrics_after"]["perplexity"] == pytest.approx(2.718281828 ** report["metrics_after"]["loss"])
    assert report["metrics_after"]["tokens"] == 16 * 3  # two words and </s> per target, every one scored
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "good movie", "--max-new-tokens", "4", "--no-progress",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "good movie"  # the decoder's text, </s> and the start token removed
    for extra, name in (([], "eval.json"), (["--base"], "base.json")):  # peftlab eval on the same file
        assert main(["eval", str(out), "--data", str(data), "--prompt-col", "source", "--response-col", "target",
                     "--answer-regex", r"\w+ (\w+)", "--json", str(tmp_path / name), "--device", "cpu", *extra]) == 0
    scored, base = (json.loads((tmp_path / n).read_text()) for n in ("eval.json", "base.json"))
    assert scored["kind"] == "seq2seq" and scored["metric"] == "exact_match" and base["adapter"] is None
    assert scored["metrics"]["loss"] == pytest.approx(report["metrics_after"]["loss"], rel=1e-5)
    assert base["metrics"]["loss"] == pytest.approx(report["metrics_before"]["loss"], rel=1e-5)  # LoRA starts at 0
    assert scored["metrics"]["exact_match"] == 1.0 and scored["metrics"]["no_answer"] == 0  # it copies every row


# -- peftlab eval as a real process: MiniLM on SST-2 --------------------------------------------------

@pytest.mark.real
@needs_data
def test_eval_subprocess_gives_the_training_runs_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sst2"
    assert main(["train", "--model", "minilm", "--task", "sst2", "--method", "lora[r=4]", "--max-steps", "2",
                 "--train-limit", "32", "--eval-limit", "24", "--batch-size", "16", "--max-length", "32",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    result_file = tmp_path / "eval.json"
    run = _peftlab("eval", str(out), "--eval-limit", "24", "--json", str(result_file), "--device", "cpu")
    result = json.loads(result_file.read_text())
    assert result["data"] == "glue_sst2" and result["model"] == "minilm" and result["kind"] == "classification"
    # A fresh process, a fresh base and the saved adapter (its head included) score what training scored.
    assert result["metrics"]["accuracy"] == report["metric_after"]
    assert result["metrics"]["loss"] == pytest.approx(report["metrics_after"]["loss"], abs=1e-4)
    assert result["baseline"] == report["baseline"] and result["baseline"]["kind"] == "majority class"
    assert re.search(rf"accuracy +{report['metric_after']:.4f}\n", run.stdout)
    assert "majority class: always" in run.stdout


# -- instruction tuning SmolLM2, exact match, and peftlab generate as a real process --------------------

@pytest.mark.real
def test_smollm2_instruction_tuning_exact_match_and_generate(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    facts = [("What is 2 plus 3?", "2 plus 3 is 5. #### 5"), ("What is 4 plus 4?", "4 plus 4 is 8. #### 8"),
             ("What is 6 minus 1?", "6 minus 1 is 5. #### 5"), ("What is 3 times 3?", "3 times 3 is 9. #### 9"),
             ("What is 10 minus 7?", "10 minus 7 is 3. #### 3"), ("What is 1 plus 1?", "1 plus 1 is 2. #### 2")]
    rows = [{"instruction": q, "input": "", "output": a} for q, a in facts]
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    out = tmp_path / "run"
    assert main(["train", "--model", "smollm2", "--data", str(train), "--eval-data", str(dev),  # Alpaca fields: found
                 "--answer-regex", GSM8K_ANSWER_REGEX, "--max-new-tokens", "8", "--method", "lora[r=4]",
                 "--lr", "2e-3", "--max-steps", "3", "--batch-size", "6", "--max-length", "64",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "causal-lm" and report["prompt_format"] == "chat" and report["head_modules"] == []
    assert report["metric"] == "exact_match" and report["answer_regex"] == GSM8K_ANSWER_REGEX
    before, after = report["metrics_before"], report["metrics_after"]
    assert after["loss"] < before["loss"]  # held-out loss over response tokens, on examples it trained on
    for scores in (before, after):  # exact match is the share of the (3) samples whose answers agree
        hits = [s["answer"] is not None and s["answer"] == s["reference_answer"] for s in scores["samples"]]
        assert scores["exact_match"] == pytest.approx(sum(hits) / 3)
        assert scores["no_answer"] == sum(s["answer"] is None for s in scores["samples"])
    assert "exact_match" in printed and "no answer found" in printed and "perplexity" in printed
    # peftlab generate in its own process: the adapter over SmolLM2, greedy, equals the same call here.
    run = _peftlab("generate", str(out), "--prompt", facts[0][0], "--max-new-tokens", "6", "--no-progress",
                   "--device", "cpu")
    base, tok = peftlab.zoo.load("smollm2")
    pm = peftlab.load(base, out)
    expected = generate_continuations(pm, tok, [prompt_ids(tok, facts[0][0], "chat")], 6)[0]
    assert run.stdout.strip() == expected.strip() and expected.strip()
