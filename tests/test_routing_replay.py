"""MoE routing instruments on a real (small, random) Mixtral: router and logit noise in the engine, the engine's
routing record, rollout routing replay in the learner (arXiv 2510.11370), and the routing agreement metric."""

import json

import pytest
import torch
from test_end_to_end import cli
from transformers import MixtralConfig, MixtralForCausalLM

from unigrad.config import TrainConfig
from unigrad.diagnostics.mismatch import mismatch_metrics
from unigrad.diagnostics.routing import routing_agreement
from unigrad.models.moe_routing import RoutingControl, controlled_routing, gating_weights, moe_routers
from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.rollout.base import Rollout, SamplingParams, merge_rollouts
from unigrad.rollout.engine_instruments import EngineInstruments
from unigrad.rollout.logprobs import ScoringOptions, TokenSequences, score_sequences, sequence_logprobs
from unigrad.rollout.transformers_engine import TransformersEngine
from unigrad.train.learning.batching import SequenceBatch

PROMPTS = [[3, 4, 5, 6, 7], [8, 9], [3, 4, 5, 6, 7], [10, 11, 12]]
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)


def small_mixtral(seed: int = 0, vocab: int = 40, **ids) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    ids = ids or {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256, **ids)
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return small_mixtral()


def engine(model, **instruments) -> TransformersEngine:
    return TransformersEngine(model, 0, 1, instruments=EngineInstruments(**instruments))


def learner_logprobs(model, ro: Rollout, replay: bool, share: bool | None = None) -> torch.Tensor:
    return sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                             routing=ro.routing if replay else None, share_prompts=share)


def test_gating_weights_are_the_softmax_over_the_chosen_experts_and_its_jacobian():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    experts = torch.tensor([[0, 2], [3, 1], [1, 0], [2, 3], [0, 3]])
    w = gating_weights(logits, experts)
    chosen = logits.detach().gather(-1, experts)
    expected = chosen.exp() / chosen.exp().sum(-1, keepdim=True)  # softmax restricted to the chosen experts
    torch.testing.assert_close(w.double(), expected, atol=1e-6, rtol=1e-6)
    # dw_i/dz_j = w_i (1[i=j] - w_j) for chosen j, 0 for the others
    jac = torch.autograd.functional.jacobian(lambda z: gating_weights(z, experts).double(), logits.detach())
    for t in range(5):
        for i in range(2):
            for j in range(4):
                slot = (experts[t] == j).nonzero()
                s = int(slot) if len(slot) else None
                want = 0.0 if s is None else float(expected[t, i] * (float(i == s) - expected[t, s]))
                assert abs(float(jac[t, i, t, j]) - want) < 1e-6


def test_the_record_leaves_sampling_bit_identical_and_covers_every_real_token(model):
    plain = engine(model, record_routing=False).generate(PROMPTS, 3, SAMPLING)
    recorded = engine(model).generate(PROMPTS, 3, SAMPLING)  # MoE: recorded by default
    assert plain.routing is None and recorded.routing is not None
    assert torch.equal(plain.completion_ids, recorded.completion_ids)
    assert torch.equal(plain.infer_logprobs, recorded.infer_logprobs)
    n, p_len, t_len = recorded.num_sequences, recorded.prompt_ids.shape[1], recorded.completion_ids.shape[1]
    assert recorded.routing.shape == (n, p_len + t_len, 2, 2)
    real = torch.cat([recorded.prompt_mask, recorded.completion_mask], 1)
    real[torch.arange(n), p_len + recorded.completion_mask.sum(-1) - 1] = False  # the last token is never fed
    seen = (recorded.routing != -1).all(-1).all(-1)
    prompt_padding = ~torch.cat([recorded.prompt_mask, torch.ones_like(recorded.completion_mask)], 1)
    assert torch.equal(seen & real, real) and not seen[prompt_padding].any()
    # the engine's recorded choice is the learner's own choice on the same tokens (same weights, no noise)
    own = score_sequences(model, TokenSequences(recorded.prompt_ids, recorded.prompt_mask, recorded.completion_ids,
                                                recorded.completion_mask), ScoringOptions(record_routing=True)).routing
    equal, overlap, pairs = routing_agreement(recorded.routing, own, real)
    assert pairs > 100 and equal == 1.0 and overlap == 1.0


def test_router_noise_is_seeded_and_zero_noise_changes_nothing(model):
    base = engine(model, record_routing=False).generate(PROMPTS, 3, SAMPLING)
    zero = engine(model, router_noise=0.0, logit_noise=0.0, record_routing=False).generate(PROMPTS, 3, SAMPLING)
    assert torch.equal(base.completion_ids, zero.completion_ids) and torch.equal(base.infer_logprobs,
                                                                                  zero.infer_logprobs)
    a = engine(model, router_noise=1.0).generate(PROMPTS, 3, SAMPLING)
    b = engine(model, router_noise=1.0).generate(PROMPTS, 3, SAMPLING)
    c = engine(model, router_noise=1.0).generate(PROMPTS, 3, SamplingParams(temperature=1.0, max_new_tokens=12,
                                                                           seed=6))
    assert torch.equal(a.routing, b.routing) and torch.equal(a.infer_logprobs, b.infer_logprobs)
    assert not torch.equal(a.routing[:, : a.prompt_ids.shape[1]], c.routing[:, : c.prompt_ids.shape[1]])


def test_replay_makes_the_learner_score_what_the_noisy_engine_sampled(model):
    """Router noise moves the engine's expert choice; without replay the learner's log-probs differ from the
    engine's, with replay they are equal in float32 (the noise never touches the gating weights), with or without
    the shared prompt pass."""
    ro = engine(model, router_noise=2.0).generate(PROMPTS, 3, SAMPLING)
    mask = ro.completion_mask
    for share in (False, True):
        with torch.no_grad():
            own = learner_logprobs(model, ro, replay=False, share=share)
            replayed = learner_logprobs(model, ro, replay=True, share=share)
        assert (own - ro.infer_logprobs)[mask].abs().max() > 1e-3
        torch.testing.assert_close(replayed[mask], ro.infer_logprobs[mask], atol=2e-5, rtol=0)
    assert mismatch_metrics(own, ro.infer_logprobs, mask)["mismatch/kl_k3"] > 1e-5


def test_replay_follows_the_engine_when_the_learner_has_moved(model):
    """A learner whose routers changed since sampling (perturbed router weights) picks other experts; with replay
    its choice is overridden by the engine's on every recorded token, so only the gating weights differ."""
    ro = engine(model).generate(PROMPTS, 3, SAMPLING)
    moved = small_mixtral()
    with torch.no_grad():
        for router in moe_routers(moved):
            router.weight.add_(torch.randn_like(router.weight) * 0.5)
    seqs = TokenSequences(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    own = score_sequences(moved, seqs, ScoringOptions(record_routing=True)).routing
    real = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
    assert routing_agreement(ro.routing, own, real)[0] < 0.95
    used = {}
    control = RoutingControl(replay=ro.routing.long().flatten(0, 1))
    routers = moe_routers(moved)
    for layer, router in enumerate(routers):
        router.register_forward_hook(lambda m, i, out, layer=layer: used.__setitem__(layer, out[2]))
    with controlled_routing(moved, control), torch.no_grad():
        moved(input_ids=torch.cat([ro.prompt_ids, ro.completion_ids], 1))
    for layer in range(2):
        chosen = used[layer].view(ro.num_sequences, -1, 2)
        recorded = (ro.routing[:, :, layer] != -1).all(-1)
        assert torch.equal(chosen[recorded], ro.routing[:, :, layer][recorded].long())


def test_replay_gradient_reaches_the_router_and_only_the_replayed_experts(model):
    """Every token replays experts {0, 1} in layer 0 and {2, 3} in layer 1 (a choice the learner would not make
    itself): layer 0's experts 2, 3 and layer 1's experts 0, 1 get no gradient, the others and both routers do."""
    learner = small_mixtral()
    learner.train()
    prompt = torch.tensor([[3, 4, 5, 6]] * 2)
    completion = torch.tensor([[7, 8, 9], [9, 8, 7]])
    width = prompt.shape[1] + completion.shape[1]
    routing = torch.empty(2, width, 2, 2, dtype=torch.long)
    routing[:, :, 0] = torch.tensor([0, 1])
    routing[:, :, 1] = torch.tensor([2, 3])
    logp = sequence_logprobs(learner, prompt, torch.ones_like(prompt, dtype=torch.bool), completion,
                             torch.ones_like(completion, dtype=torch.bool), routing=routing)
    logp.sum().backward()
    layers = learner.model.layers
    for layer, (used, unused) in enumerate((([0, 1], [2, 3]), ([2, 3], [0, 1]))):
        experts = layers[layer].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            grad = getattr(experts, name).grad
            assert all(grad[e].abs().sum() > 0 for e in used), (layer, name)
            assert all(grad[e].abs().sum() == 0 for e in unused), (layer, name)
        router_grad = layers[layer].mlp.gate.weight.grad
        # unreplayed experts' router rows: zero in exact arithmetic (renormalising cancels them), rounding here
        assert router_grad[used].abs().sum() > 0
        assert router_grad[unused].abs().sum() < 1e-6 * router_grad[used].abs().sum()
    # and the gradient equals the one through the same routing built by hand (a fixed two-expert model)
    learner.zero_grad()
    with torch.no_grad():
        for layer, keep in enumerate(([0, 1], [2, 3])):
            router = layers[layer].mlp.gate
            for e in range(4):
                if e not in keep:
                    router.weight[e] = 0
    _check_two_expert_gradient(learner, prompt, completion, routing)


def _check_two_expert_gradient(learner, prompt, completion, routing):
    """With replay, the router's gradient equals the one of an independent forward where each layer's MoE output is
    formed by hand: sum over the replayed experts of softmax(logits over them) * expert(x)."""
    seq = torch.cat([prompt, completion], 1)
    mask = torch.ones_like(completion, dtype=torch.bool)
    logp = sequence_logprobs(learner, prompt, torch.ones_like(prompt, dtype=torch.bool), completion, mask,
                             routing=routing)
    logp.sum().backward()
    got = [layer.mlp.gate.weight.grad.clone() for layer in learner.model.layers]
    learner.zero_grad()
    blocks = [layer.mlp for layer in learner.model.layers]
    originals = [b.forward for b in blocks]

    def manual(block, keep, hidden):
        b, t, h = hidden.shape
        x = hidden.reshape(-1, h)
        logits = x @ block.gate.weight.t()
        w = torch.softmax(logits[:, keep], dim=-1)
        out = 0
        for slot, e in enumerate(keep):
            gate, up = (x @ block.experts.gate_up_proj[e].t()).chunk(2, dim=-1)
            out = out + w[:, slot:slot + 1] * ((torch.nn.functional.silu(gate) * up) @ block.experts.down_proj[e].t())
        return out.reshape(b, t, h)

    try:
        for block, keep in zip(blocks, ([0, 1], [2, 3]), strict=True):
            block.forward = lambda hidden, block=block, keep=keep: manual(block, keep, hidden)
        logits = learner(input_ids=seq).logits[:, prompt.shape[1] - 1 : -1].float()
        ref = logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(logp.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
        ref.sum().backward()
    finally:
        for block, forward in zip(blocks, originals, strict=True):
            block.forward = forward
    for layer, g in zip(learner.model.layers, got, strict=True):
        torch.testing.assert_close(g, layer.mlp.gate.weight.grad, atol=1e-5, rtol=1e-4)


def test_logit_noise_creates_mismatch_that_grows_with_sigma():
    dense_like = small_mixtral(seed=1)
    kls = []
    for sigma in (0.0, 0.1, 0.5):
        ro = engine(dense_like, logit_noise=sigma, record_routing=False).generate(PROMPTS, 4, SAMPLING)
        with torch.no_grad():
            train = learner_logprobs(dense_like, ro, replay=False)
        kls.append(mismatch_metrics(train, ro.infer_logprobs, ro.completion_mask)["mismatch/kl_k3"])
    assert kls[0] < 1e-9 and 1e-4 < kls[1] < kls[2]


def test_router_noise_and_replay_refuse_a_dense_model_and_bad_sigma():
    from step_helpers import small_char_llama

    dense = small_char_llama(build_char_tokenizer(model_max_length=256))
    with pytest.raises(ValueError, match="rollout.router_noise needs a mixture-of-experts"):
        TransformersEngine(dense, 0, 1, instruments=EngineInstruments(router_noise=0.5))
    with pytest.raises(ValueError, match="rollout.routing_replay needs a mixture-of-experts"):
        TransformersEngine(dense, 0, 1, instruments=EngineInstruments(record_routing=True))
    assert TransformersEngine(dense, 0, 1).instruments.record_routing is False  # auto: off for a dense model
    TransformersEngine(dense, 0, 1, instruments=EngineInstruments(logit_noise=0.5))  # logit noise: any model
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="logit_noise must be a finite number"):
            EngineInstruments(logit_noise=bad)
    with pytest.raises(ValueError, match="routing must be"):
        sequence_logprobs(small_mixtral(), torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.bool),
                          torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.bool),
                          routing=torch.zeros(1, 2, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("overrides, what", [
    (["rollout.engine=vllm"], "rollout.engine=vllm"),
    (["rollout.num_engines=2"], "rollout.num_engines > 1"),
    (["rollout.max_staleness=1"], "rollout.max_staleness > 0"),
])
def test_config_refuses_instruments_where_the_engine_cannot_apply_them(overrides, what):
    from unigrad.config import load_config

    for key in ("rollout.router_noise=0.5", "rollout.logit_noise=0.5", "rollout.routing_replay=true"):
        with pytest.raises(ValueError, match=what.replace(">", ".").replace("(", ".")):
            load_config(None, [key, *overrides])
    with pytest.raises(ValueError):
        load_config(None, ["rollout.router_noise=-1"])
    assert TrainConfig().rollout.router_noise == 0 and not TrainConfig().rollout.routing_replay


def test_routing_survives_merge_rows_and_trimming(model):
    ro = engine(model).generate(PROMPTS[:2], 2, SAMPLING)
    other = engine(model).generate([[13, 14, 15, 16, 17, 18, 19]], 2, SamplingParams(temperature=1.0,
                                                                                      max_new_tokens=3, seed=1))
    merged = merge_rollouts([ro, other], 0)
    p_len, t_len = merged.prompt_ids.shape[1], merged.completion_ids.shape[1]
    assert merged.routing.shape[:2] == (6, p_len + t_len)
    first_p = ro.prompt_ids.shape[1]
    # row 0's record moved right by the prompt widening, -1 in the new columns on both sides
    assert torch.equal(merged.routing[0, p_len - first_p : p_len + ro.completion_ids.shape[1]], ro.routing[0])
    assert (merged.routing[0, : p_len - first_p] == -1).all()
    assert (merged.routing[0, p_len + ro.completion_ids.shape[1]:] == -1).all()
    batch = SequenceBatch(merged.prompt_ids, merged.prompt_mask, merged.completion_ids, merged.completion_mask,
                          merged.observation_mask, merged.routing).rows(torch.tensor([0, 1])).trimmed()
    # trimmed rows keep the columns of their tokens: replaying them scores what the full-width replay scores
    with torch.no_grad():
        full = sequence_logprobs(model, merged.prompt_ids[:2], merged.prompt_mask[:2], merged.completion_ids[:2],
                                 merged.completion_mask[:2], routing=merged.routing[:2])
        cut = sequence_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                batch.completion_mask, routing=batch.routing)
    width = batch.completion_ids.shape[1]
    torch.testing.assert_close(cut, full[:, :width], atol=1e-5, rtol=0)
    assert batch.routing.shape[1] == batch.prompt_ids.shape[1] + width


def test_routing_agreement_counts_sets_by_hand():
    engine_choice = torch.tensor([[[[0, 1]], [[2, 3]], [[1, 2]], [[-1, -1]]]])  # (1, 4 tokens, 1 layer, k=2)
    learner_choice = torch.tensor([[[[1, 0]], [[2, 0]], [[0, 3]], [[0, 1]]]])
    valid = torch.tensor([[True, True, True, True]])
    equal, overlap, pairs = routing_agreement(engine_choice, learner_choice, valid)
    assert pairs == 3  # the unrecorded token is left out
    assert equal == pytest.approx(1 / 3) and overlap == pytest.approx((1 + 0.5 + 0) / 3)
    equal, _, pairs = routing_agreement(engine_choice, learner_choice, torch.tensor([[False, True, True, True]]))
    assert pairs == 2 and equal == 0.0


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    tok = build_char_tokenizer(model_max_length=256)
    path = tmp_path_factory.mktemp("moe_model")
    model = small_mixtral(seed=2, vocab=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id)
    model.config.tie_word_embeddings = True
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("replay", [False, True])
def test_cli_router_noise_with_and_without_replay(moe_model_dir, tmp_path, replay):
    """The real CLI on a small Mixtral with router noise: routing agreement below 1 every step; the mismatch KL is
    large without replay and float32 rounding with it."""
    out = tmp_path / "run"
    res = cli("train", f"model.name={moe_model_dir}", "max_steps=2", "tasks=[arithmetic]", "prompts_per_step=2",
              "rollout.num_generations=4", "rollout.max_new_tokens=8", "train_pool_size=20", "eval.before_after=false",
              "save_every=0", "threads=1", "seed=3", "rollout.router_noise=2.0",
              f"rollout.routing_replay={str(replay).lower()}", "--output-dir", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert 0 < row["routing/agreement"] < 1 and row["routing/agreement"] <= row["routing/overlap"] <= 1
        if replay:
            assert row["mismatch/kl_k3"] < 1e-8
        else:
            assert row["mismatch/kl_k3"] > 1e-5
