"""The static-cache decode loop against transformers' own forward, on real (tiny, random) models of each family."""

import pytest
import torch
from model_helpers import tiny_model

from unigrad.rollout.base import SamplingParams
from unigrad.rollout.logprobs import sequence_logprobs
from unigrad.rollout.static_decoder import unsupported_reason
from unigrad.rollout.transformers_engine import TransformersEngine

PAD, VOCAB = 0, 60
STOP = [1, 2, 3, 4, 5]  # 5 of 60 tokens end a row: rows finish at different steps
PROMPTS = [[7, 8, 9, 10, 11, 12], [13, 14], [7, 8, 9, 10, 11, 12], [20, 21, 22]]  # a repeated prompt, left padding
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, pad_token_id=PAD, eos_token_id=1)


def build(family: str):
    if family == "llama_tied":
        return tiny_model(VOCAB, **COMMON, num_key_value_heads=4, tie_word_embeddings=True).eval()
    if family == "llama_gqa":
        return tiny_model(VOCAB, **COMMON, num_key_value_heads=2).eval()
    if family == "qwen2":  # biased q/k/v projections
        return tiny_model(VOCAB, "qwen2", **COMMON, num_key_value_heads=2).eval()
    if family == "mistral":
        return tiny_model(VOCAB, "mistral", **COMMON, num_key_value_heads=1, sliding_window=None).eval()
    raise ValueError(family)


@pytest.mark.parametrize("family", ["llama_tied", "llama_gqa", "qwen2", "mistral"])
def test_static_decoder_draws_what_transformers_draws(family):
    model = build(family)
    assert unsupported_reason(model) is None
    fast = TransformersEngine(model, PAD, STOP, decoder="static")
    slow = TransformersEngine(model, PAD, STOP, decoder="transformers")
    assert fast.decoder == "static" and slow.decoder == "transformers"
    sampling = SamplingParams(temperature=1.0, top_k=30, max_new_tokens=24, seed=11)
    a, b = fast.generate(PROMPTS, 5, sampling), slow.generate(PROMPTS, 5, sampling)
    assert a.truncated.any() and not a.truncated.all()  # some rows stopped early
    for name in ("completion_ids", "completion_mask", "truncated", "prompt_ids", "prompt_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.infer_logprobs, b.infer_logprobs, atol=1e-5, rtol=0)
    # Without top-k the recorded log-probs are the teacher-forced ones of the model itself.
    unfiltered = TransformersEngine(model, PAD, STOP, decoder="static").generate(
        PROMPTS, 3, SamplingParams(temperature=1.0, max_new_tokens=16, seed=4))
    teacher = sequence_logprobs(model, unfiltered.prompt_ids, unfiltered.prompt_mask, unfiltered.completion_ids,
                                unfiltered.completion_mask)
    assert (teacher - unfiltered.infer_logprobs).abs().max().item() < 1e-4


def test_static_decoder_in_bfloat16_makes_the_same_kind_of_error():
    model = build("llama_gqa")
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=2)
    a = TransformersEngine(model, PAD, STOP, dtype=torch.bfloat16, decoder="static").generate(PROMPTS, 4, sampling)
    b = TransformersEngine(model, PAD, STOP, dtype=torch.bfloat16, decoder="transformers").generate(
        PROMPTS, 4, sampling)
    assert torch.equal(a.completion_ids, b.completion_ids)
    fp32 = sequence_logprobs(model, a.prompt_ids, a.prompt_mask, a.completion_ids, a.completion_mask)
    err_static = (fp32 - a.infer_logprobs).abs()[a.completion_mask]
    err_hf = (fp32 - b.infer_logprobs).abs()[a.completion_mask]
    assert err_static.max() > 1e-4  # a real bf16 mismatch, not an fp32 computation in disguise
    assert (a.infer_logprobs - b.infer_logprobs).abs().max() < 0.1 * err_static.max()
    assert abs(err_static.mean() - err_hf.mean()) < 0.2 * err_hf.mean()  # the same size of error as transformers


@pytest.mark.parametrize("decoder", ["static", "transformers"])
def test_finished_rows_leaving_the_batch_change_nothing(decoder, monkeypatch):
    model = build("llama_gqa")
    sampling = SamplingParams(temperature=1.2, max_new_tokens=40, seed=5)
    keep = TransformersEngine(model, PAD, STOP, decoder=decoder)
    keep.compact_fraction = 0.0  # finished rows stay in the batch to the end
    compact = TransformersEngine(model, PAD, STOP, decoder=decoder)
    calls = []
    if decoder == "static":
        original = compact.static_decoder.keep_rows
        monkeypatch.setattr(compact.static_decoder, "keep_rows", lambda rows: (calls.append(len(rows)),
                                                                              original(rows)))
    a, b = keep.generate(PROMPTS, 6, sampling), compact.generate(PROMPTS, 6, sampling)
    if decoder == "static":
        assert calls and calls == sorted(calls, reverse=True)  # rows did leave, fewer each time
    assert a.truncated.float().mean() < 0.5
    for name in ("completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.infer_logprobs, b.infer_logprobs, atol=1e-5, rtol=0)


def test_unsupported_models_fall_back_to_transformers():
    moe = tiny_model(VOCAB, "mixtral", **COMMON, num_key_value_heads=2, num_local_experts=4,
                     num_experts_per_tok=2).eval()
    assert "mixtral" in unsupported_reason(moe)
    engine = TransformersEngine(moe, PAD, STOP)
    assert engine.decoder == "transformers" and "mixtral" in engine.decoder_fallback_reason
    with pytest.raises(ValueError, match="mixtral"):
        TransformersEngine(moe, PAD, STOP, decoder="static")
    with pytest.raises(ValueError, match="decoder must be one of"):
        TransformersEngine(build("llama_tied"), PAD, STOP, decoder="fast")
    windowed = tiny_model(VOCAB, "mistral", **COMMON, num_key_value_heads=2, sliding_window=8).eval()
    assert "sliding" in unsupported_reason(windowed)


def test_static_decoder_follows_weight_updates():
    """The fused projections are rebuilt every call: an in-place update of the shared module is seen."""
    model = build("llama_tied")
    engine = TransformersEngine(model, PAD, STOP, decoder="static")
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=9)
    before = engine.generate(PROMPTS, 2, sampling)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = engine.generate(PROMPTS, 2, sampling)
    reference = TransformersEngine(model, PAD, STOP, decoder="transformers").generate(PROMPTS, 2, sampling)
    assert not torch.equal(before.infer_logprobs, after.infer_logprobs)
    assert torch.equal(after.completion_ids, reference.completion_ids)
    torch.testing.assert_close(after.infer_logprobs, reference.infer_logprobs, atol=1e-5, rtol=0)


def test_a_prompts_samples_do_not_depend_on_the_other_prompts_in_the_call():
    """Each prompt has its own random stream: splitting a call (engine shards, processes) keeps every sample."""
    from unigrad.rollout.base import prompt_stream_seeds

    model = build("llama_gqa")
    engine = TransformersEngine(model, PAD, STOP)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=20, seed=7)
    whole = engine.generate(PROMPTS, 3, sampling)
    seeds = prompt_stream_seeds(7, len(PROMPTS))
    for lo, hi in ((0, 1), (1, 3), (3, 4)):
        part = engine.generate(PROMPTS[lo:hi], 3, SamplingParams(temperature=1.0, max_new_tokens=20,
                                                                 prompt_seeds=seeds[lo:hi]))
        rows = slice(lo * 3, hi * 3)
        width = part.completion_ids.shape[1]
        assert torch.equal(part.completion_ids, whole.completion_ids[rows, :width])
        assert not whole.completion_mask[rows, width:].any()
        torch.testing.assert_close(part.infer_logprobs, whole.infer_logprobs[rows, :width], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="prompt_seeds has 1 seeds for 4 prompts"):
        engine.generate(PROMPTS, 2, SamplingParams(prompt_seeds=(1,)))


def test_exponential_race_draws_from_the_filtered_distribution():
    from unigrad.rollout.sampling import filter_logits, select_next_tokens

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(40_000, 5)
    sampling = SamplingParams(temperature=0.7, top_k=4, max_new_tokens=1)
    noise = torch.empty(40_000, 5).exponential_(generator=torch.Generator().manual_seed(0))
    tokens, logp = select_next_tokens(logits, sampling, noise)
    expected = torch.softmax(filter_logits(logits[:1], 0.7, top_k=4), -1)[0]
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert freq[3] == 0  # filtered out by top-k
    assert (freq - expected).abs().max() < 0.01  # 4 sigma of a 40k-draw frequency is ~0.01
    torch.testing.assert_close(logp, expected.log()[tokens])
