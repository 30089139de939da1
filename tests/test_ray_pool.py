"""Ray rollout pool on a local Ray cluster (CPU): the same rollouts as one engine for the same seeds."""

import os

import pytest
import torch
from model_helpers import char_token_ids, tiny_model

from unigrad.rollout.base import RolloutEngine, SamplingParams, prompt_stream_seeds
from unigrad.rollout.transformers_engine import TransformersEngine

ray = pytest.importorskip("ray", reason="the Ray pool needs ray (pip install 'unigrad[ray]')")

PAD, STOP = 0, [1, 2, 3]
PROMPTS = [[7, 8, 9, 10], [11, 12], [7, 8, 9, 10], [20, 21, 22, 23, 24, 25], [30]]


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file written on a local test cluster
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def model(seed=0):
    return tiny_model(40, seed=seed, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=PAD,
                      eos_token_id=1).eval()


def assert_same(a, b):
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "group_ids", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.infer_logprobs, b.infer_logprobs, atol=1e-6, rtol=0)


@pytest.mark.slow  # 12 s, and 9 s to start Ray (timed at load average 5-9 on 2 cores)
def test_pool_equals_one_engine_and_follows_weights(cluster):
    from unigrad.rollout.ray_pool import RayRolloutPool

    m = model()
    pool = RayRolloutPool(m, PAD, STOP, num_engines=2)
    try:
        assert isinstance(pool, RolloutEngine) and pool.decoder == "static"
        one = TransformersEngine(m, PAD, STOP)
        sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=5)
        a, b = pool.generate(PROMPTS, 3, sampling), one.generate(PROMPTS, 3, sampling)
        assert a.truncated.any() and not a.truncated.all()
        assert_same(a, b)
        # New weights go through the object store; the pool then samples what the updated model samples.
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        pool.load_weights(m.state_dict())
        c, d = pool.generate(PROMPTS, 3, sampling), TransformersEngine(m, PAD, STOP).generate(PROMPTS, 3, sampling)
        assert_same(c, d)
        assert not torch.equal(c.infer_logprobs, a.infer_logprobs)
        # Greedy, and fewer prompts than engines.
        greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
        assert_same(pool.generate(PROMPTS[:1], 2, greedy), one.generate(PROMPTS[:1], 2, greedy))
        with pytest.raises(ValueError, match="prompt_seeds has 2 seeds for 5 prompts"):
            pool.generate(PROMPTS, 2, SamplingParams(prompt_seeds=(1, 2)))
    finally:
        pool.shutdown()


def test_merge_pads_like_one_engine():
    from unigrad.rollout.ray_pool import merge_rollouts

    m = model(1)
    engine = TransformersEngine(m, PAD, STOP)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=9)
    whole = engine.generate(PROMPTS, 2, sampling)
    seeds = prompt_stream_seeds(9, len(PROMPTS))
    parts = [engine.generate(PROMPTS[lo:hi], 2, SamplingParams(temperature=1.0, max_new_tokens=10,
                                                               prompt_seeds=seeds[lo:hi]))
             for lo, hi in ((0, 2), (2, 3), (3, 5))]
    assert_same(merge_rollouts(parts, PAD), whole)


@pytest.mark.slow  # 13 s (timed at load average 5-9 on 2 cores)
def test_training_step_with_a_pool_equals_one_engine(cluster, tmp_path):
    """`rollout.num_engines=2` through the real step: same samples, same loss, same gradient norm."""
    from unigrad.config import load_config
    from unigrad.models.tokenizer import build_char_tokenizer
    from unigrad.tasks import get_tasks
    from unigrad.train.lifecycle.build import build_step_context
    from unigrad.train.step import train_step

    tok = build_char_tokenizer(model_max_length=256)
    (tmp_path / "r.py").write_text("def r(completions, **kw):\n"
                                   "    return [sum(map(c.count, '02468')) / (1 + len(c)) for c in completions]\n")
    metrics = []
    for engines in (1, 2):
        m = tiny_model(len(tok), max_position_embeddings=256, **char_token_ids(tok))  # the same weights each time
        cfg = load_config(None, ["tasks=[arithmetic]", f"reward={tmp_path / 'r.py'}:r", "prompts_per_step=4",
                                 "rollout.num_generations=3", "rollout.max_new_tokens=8", "train_pool_size=30",
                                 f"rollout.num_engines={engines}", "micro_batch_size=6"])
        tasks = get_tasks("arithmetic", reward=cfg.reward)
        ctx, _, _ = build_step_context(cfg, m, tok, tasks)
        metrics.append([train_step(ctx, step)[0] for step in (1, 2)])
        if engines == 2:
            ctx.engine.shutdown()
    for a, b in zip(*metrics, strict=True):
        assert a["grad_norm"] > 0
        for key in ("loss", "grad_norm", "reward/mean", "response_length/mean", "mismatch/abs_logp_diff_max"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow  # 16 s (timed at load average 5-9 on 2 cores)
def test_episodes_through_the_pool_equal_those_of_one_engine(cluster):
    """The episode runner calls nothing but `generate`: multi-turn episodes on the Ray pool are those of one engine."""
    from step_helpers import turn_ending_llama

    from unigrad.environments.base import StepResult
    from unigrad.models.tokenizer import build_char_tokenizer
    from unigrad.rollout.episodes import EpisodeBatch, run_episodes
    from unigrad.rollout.ray_pool import RayRolloutPool
    from unigrad.train.learning.batching import encode_prompt

    class Feedback:
        def __init__(self):
            self.turn = 0

        def step(self, turn):
            self.turn += 1
            return StepResult([{"role": "user", "content": f"seen {self.turn}"}], reward=float(len(turn) % 2))

    tok = build_char_tokenizer(model_max_length=256)
    m = turn_ending_llama(tok)
    prompts = [encode_prompt(tok, "q0"), encode_prompt(tok, "q1 longer")]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    pool = RayRolloutPool(m, tok.pad_token_id, tok.eos_token_id, num_engines=2)
    try:
        a, ea = run_episodes(pool, tok, EpisodeBatch(prompts, [Feedback() for _ in range(6)], 3, [3, 3]), sampling,
                             [tok.eos_token_id])
    finally:
        pool.shutdown()
    b, eb = run_episodes(TransformersEngine(m, tok.pad_token_id, tok.eos_token_id), tok,
                         EpisodeBatch(prompts, [Feedback() for _ in range(6)], 3, [3, 3]), sampling, [tok.eos_token_id])
    assert a.observation_mask.any() and torch.equal(a.observation_mask, b.observation_mask)
    for name in ("prompt_ids", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # later turns' contexts are padded to other widths in the engines' shards: float rounding of the log-probs
    torch.testing.assert_close(a.infer_logprobs, b.infer_logprobs, atol=1e-5, rtol=0)
    assert torch.equal(ea.rewards, eb.rewards) and torch.equal(ea.turns, eb.turns)
