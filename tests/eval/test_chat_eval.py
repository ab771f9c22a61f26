"""Chat evals: `--apply-chat-template` sends each prompt as one user turn of the checkpoint's template, token
for token what transformers' `apply_chat_template` gives; `--endpoint-api chat` asks /v1/chat/completions of
our own server, which applies the same template and so answers as the local chat-template run."""

import json
import shutil

import pytest

from longreach.cli import main
from longreach.eval.backends import LocalBackend
from longreach.eval.chat import ChatTemplateTokenizer
from longreach.eval.runner import run_grid
from tests.eval.conftest import make_hf_model

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</|{{ m['role'] }}|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_checkpoint(hf_tokenizer, tmp_path_factory):
    """A tiny random Llama over the 600-token BPE, its tokenizer_config.json carrying a chat template."""
    path = tmp_path_factory.mktemp("chat-ckpt")
    make_hf_model(
        vocab_size=600, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1
    ).save_pretrained(path)
    shutil.copy(hf_tokenizer.directory / "tokenizer.json", path / "tokenizer.json")
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_chat_template_prompts_equal_transformers(chat_checkpoint, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import longreach.engine.llm as llm_module

    sent_ids, real_generate = [], llm_module.LLM.generate

    def recording_generate(self, prompts, *args, **kwargs):
        sent_ids.extend(list(p) for p in prompts)
        return real_generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(llm_module.LLM, "generate", recording_generate)
    backend = LocalBackend(chat_checkpoint, device="cpu", dtype="fp32", apply_chat_template=True)
    raw_prompts, real_complete = [], backend.complete
    backend.complete = lambda prompts, max_tokens: (
        raw_prompts.extend(prompts) or real_complete(prompts, max_tokens)
    )
    result = run_grid(backend, "passkey", [512, 768], depths=[0, 100], max_new_tokens=4, progress=False)

    reference = transformers.PreTrainedTokenizerFast.from_pretrained(chat_checkpoint)
    assert len(sent_ids) == len(raw_prompts) == 4
    for raw, ids, sample in zip(raw_prompts, sent_ids, result.samples):
        messages = [{"role": "user", "content": raw}]
        text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected = reference(text, add_special_tokens=False)["input_ids"]
        assert ids == expected  # what transformers' apply_chat_template(..., tokenize=True) tokenizes
        assert text.startswith("<s><|user|>\n") and text.endswith("</|user|>\n<|assistant|>\n")
        assert sample.num_prompt_tokens == len(ids) <= sample.length - 4  # the template's tokens counted


def test_chat_template_needs_a_template(byte_checkpoint):
    class NoTemplate:
        def apply_chat_template(self, messages, add_generation_prompt=True):
            raise ValueError("no chat template")

    with pytest.raises(ValueError, match="--apply-chat-template: the checkpoint's chat template fails"):
        ChatTemplateTokenizer(NoTemplate())
    with pytest.raises(ValueError, match="has no chat template"):
        ChatTemplateTokenizer(object())


def test_chat_endpoint_answers_as_the_local_chat_run(byte_checkpoint, tmp_path):
    from tests.serve.conftest import make_engine, run_server

    grid = ["--lengths", "512", "--depths", "0,100", "--samples", "1", "--max-tokens", "6", "--no-progress"]
    grid += ["--no-plot"]
    local_out, served_out, implied_out = tmp_path / "local", tmp_path / "served", tmp_path / "implied"
    local = ["eval", "passkey", "--model", str(byte_checkpoint), "--device", "cpu", "--apply-chat-template"]
    assert main(local + grid + ["--out", str(local_out)]) == 0
    with run_server(make_engine(byte_checkpoint, max_model_len=1024)) as server:
        endpoint = ["eval", "passkey", "--endpoint", server.url, "--tokenizer", str(byte_checkpoint)]
        assert main(endpoint + ["--endpoint-api", "chat", *grid, "--out", str(served_out)]) == 0
        assert main(endpoint + ["--apply-chat-template", *grid, "--out", str(implied_out)]) == 0
    local_result = json.loads((local_out / "results.json").read_text())
    for out in (served_out, implied_out):
        served = json.loads((out / "results.json").read_text())
        assert served["run"]["endpoint_api"] == "chat" and served["run"]["endpoint"] == server.url
        assert [s["got"] for s in served["samples"]] == [s["got"] for s in local_result["samples"]]
        assert [s["num_prompt_tokens"] for s in served["samples"]] == [
            s["num_prompt_tokens"] for s in local_result["samples"]
        ]
        assert all(s["error"] is None for s in served["samples"])
    assert local_result["run"]["apply_chat_template"] is True
