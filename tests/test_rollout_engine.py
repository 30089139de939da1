"""TransformersEngine and sequence_logprobs on real (tiny, random) transformers Llama models."""

import pytest
import torch
from model_helpers import tiny_model
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from unigrad.rollout.base import RolloutEngine, SamplingParams
from unigrad.rollout.logprobs import sequence_logprobs
from unigrad.rollout.transformers_engine import TransformersEngine

PAD, EOS, VOCAB = 0, 1, 100
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]  # different lengths: left padding is exercised


def tiny_llama(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    return tiny_model(VOCAB, seed=seed, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2,
                      tie_word_embeddings=tied).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


def naive_logprobs(model, rollout, temperature=1.0):
    """Full (N, L + T, V) log_softmax over a plain forward pass: the reference sequence_logprobs must equal."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1).long()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    plen, tlen = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, plen - 1 : plen - 1 + tlen].float() / temperature, -1)
    return logp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1) * rollout.completion_mask


def test_engine_satisfies_protocol(model):
    assert isinstance(TransformersEngine(model, PAD, EOS), RolloutEngine)


@pytest.mark.parametrize("decoder", ["static", "transformers"])
def test_infer_logprobs_equal_teacher_forced_fp32(model, decoder):
    engine = TransformersEngine(model, PAD, EOS, decoder=decoder)
    assert engine.shares_learner_module and engine.decoder == decoder
    r = engine.generate(PROMPTS, 4, SamplingParams(temperature=1.0, max_new_tokens=12, seed=3))
    assert r.num_sequences == 12 and not r.prompt_mask.all()
    assert r.infer_logprobs.dtype == torch.float32
    learner = sequence_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    assert (learner - r.infer_logprobs).abs().max().item() < 1e-4
    assert (r.infer_logprobs[~r.completion_mask] == 0).all() and (learner[~r.completion_mask] == 0).all()
    assert (r.infer_logprobs[r.completion_mask] < 0).all()
    # Rollout tensors are ordinary tensors (not inference-mode ones): the learner can backprop through them.
    learner.sum().backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("top_k,top_p", [(20, 1.0), (0, 0.8), (20, 0.8)])
def test_filtered_logprobs_equal_independent_computation(model, top_k, top_p):
    engine = TransformersEngine(model, PAD, EOS)
    temperature = 0.7
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=10, seed=11)
    r = engine.generate(PROMPTS, 3, sampling)
    # Reference: teacher-forced logits, then transformers' own warpers, renormalised by log_softmax.
    with torch.no_grad():
        ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
        mask = torch.cat([r.prompt_mask, r.completion_mask], 1).long()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    plen, tlen = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    scores = logits[:, plen - 1 : plen - 1 + tlen].float().reshape(-1, VOCAB)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    for warp in warpers:
        scores = warp(None, scores)
    ref = torch.log_softmax(scores, -1).gather(-1, r.completion_ids.reshape(-1, 1)).reshape(r.completion_ids.shape)
    m = r.completion_mask
    assert torch.isfinite(ref[m]).all()  # every sampled token lies inside the filtered support
    assert (ref[m] - r.infer_logprobs[m]).abs().max().item() < 1e-4
    # Filtering + renormalisation really changed the numbers relative to the plain tempered softmax.
    plain = sequence_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, m, temperature=temperature)
    assert (r.infer_logprobs[m] - plain.detach()[m]).max().item() > 1e-3


@pytest.mark.parametrize("decoder", ["static", "transformers"])
def test_greedy_equals_transformers_generate(model, decoder):
    engine = TransformersEngine(model, PAD, EOS, decoder=decoder)
    r = engine.generate(PROMPTS, 2, SamplingParams(temperature=0.0, max_new_tokens=10))
    assert torch.equal(r.completion_ids[0::2], r.completion_ids[1::2])  # greedy: all n samples identical
    first = slice(0, None, 2)
    hf = model.generate(
        input_ids=r.prompt_ids[first],
        attention_mask=r.prompt_mask[first].long(),
        do_sample=False,
        max_new_tokens=10,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )[:, r.prompt_ids.shape[1] :]
    assert torch.equal(hf, r.completion_ids[first])
    # Greedy log-probs are those of the temperature-1 softmax.
    learner = sequence_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    assert (learner - r.infer_logprobs).abs().max().item() < 1e-4


def test_seed_reproducibility(model):
    engine = TransformersEngine(model, PAD, EOS)
    a, b, c = (engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=8, seed=s)) for s in (5, 5, 6))
    for name in ("completion_ids", "completion_mask", "infer_logprobs", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not (a.completion_ids.shape == c.completion_ids.shape and torch.equal(a.completion_ids, c.completion_ids))


def test_eos_stops_rows_and_is_inside_the_mask(model):
    stop = list(range(1, 21))  # 20 of 100 tokens end a sequence: some rows stop, some hit max_new_tokens
    engine = TransformersEngine(model, PAD, stop)
    r = engine.generate(PROMPTS, 8, SamplingParams(max_new_tokens=6, seed=0))
    assert r.truncated.any() and (~r.truncated).any()
    lengths = r.completion_mask.sum(1)
    for row in range(r.num_sequences):
        k = int(lengths[row])
        assert r.completion_mask[row, :k].all() and not r.completion_mask[row, k:].any()  # one contiguous prefix
        assert (r.completion_ids[row, k:] == PAD).all() and (r.infer_logprobs[row, k:] == 0).all()
        is_stop = [int(t) in stop for t in r.completion_ids[row, :k]]
        if r.truncated[row]:
            assert k == 6 and not any(is_stop)
        else:
            assert is_stop[-1] and not any(is_stop[:-1])  # the EOS is included and is the first one
    learner = sequence_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    assert (learner - r.infer_logprobs).abs().max().item() < 1e-4


def test_loop_stops_when_all_rows_are_done(model):
    engine = TransformersEngine(model, PAD, list(range(VOCAB)))  # every token is an EOS
    r = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=10, seed=0))
    assert r.completion_ids.shape == (6, 1) and r.completion_mask.all() and not r.truncated.any()


def test_zero_new_tokens(model):
    r = TransformersEngine(model, PAD, EOS).generate(PROMPTS, 2, SamplingParams(max_new_tokens=0))
    assert r.completion_ids.shape == (6, 0) and r.infer_logprobs.shape == (6, 0) and r.truncated.all()


def test_group_layout_and_prompts(model):
    prompts = [[30, 31, 32], [40], [30, 31, 32]]  # a repeated prompt shares its prefill with the first
    engine = TransformersEngine(model, PAD, EOS)
    r = engine.generate(prompts, 3, SamplingParams(max_new_tokens=8, seed=2))
    assert r.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for row in range(9):
        p = prompts[row // 3]
        assert r.prompt_ids[row][r.prompt_mask[row]].tolist() == p
        assert not r.prompt_mask[row, : 3 - len(p)].any()  # left padded
        assert (r.prompt_ids[row, : 3 - len(p)] == PAD).all()
    learner = sequence_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    assert (learner - r.infer_logprobs).abs().max().item() < 1e-4


def test_train_mode_is_restored():
    learner = tiny_llama().train()
    TransformersEngine(learner, PAD, EOS).generate(PROMPTS, 2, SamplingParams(max_new_tokens=3, seed=0))
    assert learner.training


def test_bf16_engine_mismatch_and_load_weights():
    learner = tiny_llama()
    engine = TransformersEngine(learner, PAD, EOS, dtype=torch.bfloat16)
    assert not engine.shares_learner_module and engine.model is not learner
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert next(learner.parameters()).dtype == torch.float32  # the learner is untouched
    sampling = SamplingParams(max_new_tokens=12, seed=4)

    r = engine.generate(PROMPTS, 4, sampling)
    with torch.no_grad():
        fp32 = sequence_logprobs(learner, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    gap = (fp32 - r.infer_logprobs).abs()[r.completion_mask]
    assert 1e-4 < gap.max().item() < 0.1  # a small but real train-inference mismatch
    assert gap.mean().item() > 1e-4

    # Change the learner; the engine does not see it until load_weights, which copies in place.
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert torch.equal(engine.generate(PROMPTS, 4, sampling).infer_logprobs, r.infer_logprobs)
    pointers = [p.data_ptr() for p in engine.model.parameters()]
    engine.load_weights(learner.state_dict())
    assert [p.data_ptr() for p in engine.model.parameters()] == pointers
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())

    r2 = engine.generate(PROMPTS, 4, sampling)
    with torch.no_grad():
        new = sequence_logprobs(learner, r2.prompt_ids, r2.prompt_mask, r2.completion_ids, r2.completion_mask)
        stale = sequence_logprobs(engine.model, r2.prompt_ids, r2.prompt_mask, r2.completion_ids, r2.completion_mask)
    m = r2.completion_mask
    assert (new - r2.infer_logprobs).abs()[m].max().item() < 0.1
    # Against the old weights the rollout would be far off; stale = engine's own teacher-forced bf16 pass agrees.
    assert (stale.float() - r2.infer_logprobs).abs()[m].max().item() < 0.1
    old = tiny_llama()
    with torch.no_grad():
        before = sequence_logprobs(old, r2.prompt_ids, r2.prompt_mask, r2.completion_ids, m)
    assert (before - new).abs()[m].max().item() > 0.1


def test_shared_module_load_weights():
    learner = tiny_llama(seed=0, tied=True)
    engine = TransformersEngine(learner, PAD, EOS)
    sampling = SamplingParams(max_new_tokens=8, seed=9)
    a = engine.generate(PROMPTS, 2, sampling)
    engine.load_weights(learner.state_dict())  # no-op: the very same tensors
    assert torch.equal(engine.generate(PROMPTS, 2, sampling).infer_logprobs, a.infer_logprobs)
    other = tiny_llama(seed=1, tied=True)
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()
    state = {k: v for k, v in other.state_dict().items() if k != "lm_head.weight"}  # tied: one key suffices
    engine.load_weights(state)
    b = engine.generate(PROMPTS, 2, sampling)
    ref = TransformersEngine(other, PAD, EOS).generate(PROMPTS, 2, sampling)
    assert torch.equal(b.completion_ids, ref.completion_ids)
    assert torch.allclose(b.infer_logprobs, ref.infer_logprobs)
    with pytest.raises(KeyError):
        engine.load_weights({"nope": torch.zeros(1)})


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_sequence_logprobs_chunked_equals_naive(model, temperature):
    r = TransformersEngine(model, PAD, EOS).generate(PROMPTS, 3, SamplingParams(max_new_tokens=9, seed=7))
    naive = naive_logprobs(model, r, temperature)
    (g_naive,) = torch.autograd.grad(naive.sum(), model.lm_head.weight)
    chunked = sequence_logprobs(
        model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, temperature, chunk_tokens=5
    )
    assert (chunked - naive).abs().max().item() < 1e-5
    (g_chunked,) = torch.autograd.grad(chunked.sum(), model.lm_head.weight)  # through the recomputed chunks
    assert torch.allclose(g_chunked, g_naive, atol=1e-5)


def test_sequence_logprobs_entropy(model):
    r = TransformersEngine(model, PAD, EOS).generate(PROMPTS, 3, SamplingParams(max_new_tokens=9, seed=7))
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1).long()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    plen, tlen = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    logp_full = torch.log_softmax(logits[:, plen - 1 : plen - 1 + tlen] / 0.9, -1)
    naive = -(logp_full.exp() * logp_full).sum(-1) * r.completion_mask
    (g_naive,) = torch.autograd.grad(naive.sum(), model.lm_head.weight)
    for chunk in (None, 4):
        logp, entropy = sequence_logprobs(
            model,
            r.prompt_ids,
            r.prompt_mask,
            r.completion_ids,
            r.completion_mask,
            0.9,
            chunk_tokens=chunk,
            return_entropy=True,
        )
        assert (entropy - naive).abs().max().item() < 1e-5
        assert torch.equal(
            logp,
            sequence_logprobs(
                model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.9, chunk_tokens=chunk
            ),
        )
        (g,) = torch.autograd.grad(entropy.sum(), model.lm_head.weight)
        assert torch.allclose(g, g_naive, atol=1e-5)


def test_sequence_logprobs_fallback_uses_the_models_own_logits():
    """A model whose forward rescales lm_head output (Cohere's logit_scale) goes through logits_to_keep."""
    cohere = tiny_model(VOCAB, "cohere", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        logit_scale=0.5, pad_token_id=PAD, eos_token_id=EOS).eval()
    r = TransformersEngine(cohere, PAD, EOS).generate(PROMPTS, 2, SamplingParams(max_new_tokens=6, seed=1))
    with torch.no_grad():
        got = sequence_logprobs(cohere, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        ref = naive_logprobs(cohere, r)
    assert (got - ref).abs().max().item() < 1e-5
    assert (got - r.infer_logprobs).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------- shared prompt pass in the learner


def test_shared_prompt_pass_equals_flat_forward_with_gradients(model):
    """Rows sharing a prompt (non-adjacent, different prompt lengths, ragged completions) run the prompt once;
    log-probs, entropies and parameter gradients equal the flat forward over [prompt; completion]."""
    engine = TransformersEngine(model, PAD, list(range(1, 15)))
    r = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]], 3,
                        SamplingParams(temperature=1.0, max_new_tokens=10, seed=1))
    order = torch.randperm(r.num_sequences, generator=torch.Generator().manual_seed(0))  # groups interleaved
    batch = [t[order] for t in (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)]
    assert not batch[3].all() and not batch[1].all()
    results = []
    model.train()
    try:
        for share in (True, False):
            model.zero_grad()
            logp, entropy = sequence_logprobs(model, *batch, temperature=0.7, return_entropy=True,
                                              share_prompts=share)
            (logp.sum() + 0.3 * entropy.sum()).backward()
            results.append((logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    finally:
        model.eval()
        model.zero_grad()
    (lp_s, ent_s, g_s), (lp_f, ent_f, g_f) = results
    torch.testing.assert_close(lp_s, lp_f, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_s, ent_f, atol=1e-5, rtol=0)
    assert (lp_s[~batch[3]] == 0).all()
    for a, b in zip(g_s, g_f, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(lp_f, naive_logprobs(model, r.__class__(
        prompt_ids=batch[0], prompt_mask=batch[1], completion_ids=batch[2], completion_mask=batch[3],
        infer_logprobs=r.infer_logprobs[order], group_ids=r.group_ids[order], truncated=r.truncated[order]),
        temperature=0.7).detach(), atol=1e-5, rtol=0)


def test_micro_batches_keep_a_prompts_rows_together():
    from unigrad.train.learning.batching import SequenceBatch, length_grouped_micro_batches

    lengths = [5, 1, 3, 2, 9, 4, 1, 1]
    groups = torch.tensor([0, 1, 0, 1, 2, 2, 1, 0])
    mask = torch.tensor([[i < n for i in range(9)] for n in lengths])
    batch = SequenceBatch(torch.ones(8, 2, dtype=torch.long), torch.ones(8, 2, dtype=torch.bool),
                          torch.ones(8, 9, dtype=torch.long), mask)
    order = torch.cat(length_grouped_micro_batches(batch, 3, groups=groups)).tolist()
    # Groups by their longest row (1: 2, 0: 5, 2: 9), each group's rows contiguous and sorted by length.
    assert order == [1, 6, 3, 7, 2, 0, 5, 4]
    assert sorted(order) == list(range(8))
