"""lm-evaluation-harness as the peer: its `local-completions` model against our server and its own Hugging Face
model on the same checkpoint (fp32, CPU) score the repo's two offline tasks (benchmarks/lm_eval_tasks: a
multiple-choice log-likelihood task and a generate_until task) alike, sample by sample.

The log-likelihood task goes through /v1/completions with `echo` + `logprobs` (prompt logprobs); generate_until
through plain greedy completions with stop strings. lm_eval runs in one subprocess (its import and setup take most
of the time) through its Python API, both models one after the other, against a server started in this process
(the app `longreach serve` runs); the CLI form of the same runs is in docs/serving.md."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model.conftest import make_hf_model
from tests.serve.conftest import make_engine, run_server

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "benchmarks" / "lm_eval_tasks"
MC_TOL = 1e-4  # per-choice log-likelihood sums, fp32 on both sides

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in ("lm_eval", "tenacity", "accelerate")),
        reason="needs lm-eval[api] (the dev extra)",
    ),
]


def _docs() -> list[dict]:
    return [json.loads(line) for f in sorted(TASKS.glob("*.jsonl")) for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama with a real (Metaspace BPE) tokenizer trained on the tasks' text, which both
    transformers' AutoTokenizer (lm-eval's side) and ours load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("lm-eval-ckpt")
    texts = [
        f"Question: {d['question']}\nAnswer: " + " ".join(d["choices"])
        if "question" in d
        else f"{d['context']} The pass key is {d['answer']}.\n"
        for d in _docs()
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(texts * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}
    config.update(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    model = make_hf_model(
        "llama", vocab_size=tok.get_vocab_size(), max_position_embeddings=512, bos_token_id=0, eos_token_id=1
    )
    model.save_pretrained(path)
    return path


# lm_eval's CLI indexes its thousands of built-in task files first (~8 s of CPU); its Python API can skip them
_RUN = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

tasks, out = sys.argv[1], sys.argv[2]
runs = {}
for name, model, model_args, device in json.loads(sys.argv[3]):
    tm = TaskManager(include_path=tasks, include_defaults=False)
    res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["longreach_mc", "longreach_gen"],
                                  task_manager=tm, batch_size=8, device=device, log_samples=True)
    samples = {t: sorted(([s["doc_id"], s["filtered_resps"]] for s in v), key=lambda s: s[0])
               for t, v in res["samples"].items()}
    runs[name] = {"results": res["results"], "samples": samples}
json.dump(runs, open(out, "w"), default=str)
"""


def _lm_eval(runs: list[tuple[str, str, str, str | None]], tmp: Path) -> dict:
    """Run lm_eval.simple_evaluate for each (name, model, model_args, device) in one subprocess, offline."""
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf-home"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    out = tmp / "runs.json"
    cmd = [sys.executable, "-c", _RUN, str(TASKS.relative_to(ROOT)), str(out), json.dumps(runs)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"lm_eval failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_lm_eval_scores_our_server_as_its_hf_model(checkpoint, tmp_path):
    engine = make_engine(checkpoint, max_model_len=512, num_kv_blocks=512, block_size=16)
    with run_server(engine, model_name="tiny") as server:
        ours_args = (
            f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={checkpoint},num_concurrent=1,max_retries=1"
        )
        runs = _lm_eval(
            [
                ("ours", "local-completions", ours_args, None),
                ("hf", "hf", f"pretrained={checkpoint},dtype=float32", "cpu"),
            ],
            tmp_path,
        )
    ours, hf = runs["ours"], runs["hf"]
    for task, metric in (
        ("longreach_mc", "acc,none"),
        ("longreach_mc", "acc_norm,none"),
        ("longreach_gen", "exact_match,none"),
    ):
        assert ours["results"][task][metric] == hf["results"][task][metric], (task, metric)
    assert len(ours["samples"]["longreach_mc"]) == 16 and len(ours["samples"]["longreach_gen"]) == 16
    for (doc, choices), (hf_doc, hf_choices) in zip(
        ours["samples"]["longreach_mc"], hf["samples"]["longreach_mc"]
    ):
        assert doc == hf_doc and len(choices) == len(hf_choices) == 4
        for (lp, _), (hf_lp, _) in zip(choices, hf_choices):
            assert abs(float(lp) - float(hf_lp)) <= MC_TOL, (doc, lp, hf_lp)
    assert ours["samples"]["longreach_gen"] == hf["samples"]["longreach_gen"]
