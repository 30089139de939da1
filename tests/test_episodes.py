"""Multi-turn episodes: token in, token out; observations in the context but out of the loss; the episode's reward on
every assistant turn; max_turns; per-turn seeds. A scripted environment with known transitions, a real engine on a
random char-level Llama."""

import dataclasses

import pytest
import torch
from step_helpers import step_context, turn_ending_llama

from unigrad.environments.base import StepResult
from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.objective import LossInputs, compute_advantages, policy_loss, resolve_objective
from unigrad.rollout.base import SamplingParams
from unigrad.rollout.episodes import EpisodeBatch, observation_ids, run_episodes, turn_index
from unigrad.rollout.logprobs import sequence_logprobs
from unigrad.rollout.transformers_engine import TransformersEngine
from unigrad.tasks.base import Example
from unigrad.train.learning.batching import encode_prompt
from unigrad.train.producing.produce import produce


class Scripted:
    """Observation "seen k" after turn k; reward 0.25 on turn 2 and 1 when it ends on turn `done_at`."""

    def __init__(self, done_at: int = 99, tool_role: bool = False):
        self.done_at, self.turn, self.tool_role, self.seen = done_at, 0, tool_role, []

    def reset(self, example: Example) -> list[dict]:
        return [{"role": "user", "content": example.prompt}]

    def step(self, turn: str) -> StepResult:
        self.turn += 1
        self.seen.append(turn)
        done = self.turn >= self.done_at
        role = {"role": "tool", "name": "t"} if self.tool_role else {"role": "user"}
        return StepResult([{**role, "content": f"seen {self.turn}"}], reward=1.0 if done else
                          0.25 if self.turn == 2 else None, done=done, tool_calls=1, tool_errors=int(self.turn == 1))


class ScriptedTask:
    name, multi_turn, tools, description = "scripted", True, (), "a scripted environment"

    def __init__(self, max_turns: int = 3, done_at: int = 99):
        self.max_turns, self.done_at = max_turns, done_at

    def examples(self, split, n, seed=0):
        return [Example(f"q{seed}-{i}", "", None, self.name) for i in range(n)]

    def environment(self, tool_style: str = "plain"):
        return Scripted(self.done_at)

    def tool_schemas(self):
        return []


class Recorder:
    """An engine that records every call's prompts and sampled rows."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, n, sampling):
        ro = self.engine.generate(prompts, n, sampling)
        self.calls.append((prompts, n, sampling, ro))
        return ro

    def load_weights(self, state_dict):
        self.engine.load_weights(state_dict)


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer(model_max_length=256)
    return tok, turn_ending_llama(tok)


def _episodes(tok, model, max_turns=(3, 3), done_at=99, n=2, max_new=5, context=None):
    engine = Recorder(TransformersEngine(model, tok.pad_token_id, tok.eos_token_id))
    prompts = [encode_prompt(tok, "q0"), encode_prompt(tok, "a longer q1")]
    envs = [Scripted(done_at) for _ in range(len(prompts) * n)]
    ro, ep = run_episodes(engine, tok, EpisodeBatch(prompts, envs, n, list(max_turns)),
                          SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=7), [tok.eos_token_id], context)
    return engine, envs, ro, ep, prompts


def test_trained_ids_are_the_sampled_ids_and_each_turn_sees_exactly_them(setup):
    tok, model = setup
    engine, envs, ro, ep, prompts = _episodes(tok, model)
    n = 2
    # Rebuild every row from the engine's own calls: turn 1 from the first call, turn k from call k's row.
    rows = {r: [] for r in range(ro.num_sequences)}
    trained = {r: [] for r in range(ro.num_sequences)}
    live = list(range(ro.num_sequences))
    for k, (call_prompts, _, _, out) in enumerate(engine.calls):
        if k > 0:  # the context of turn k + 1 is the prompt and every id so far, untouched
            assert call_prompts == [prompts[r // n] + rows[r] for r in live]
        for j, r in enumerate(live):
            sampled = out.completion_ids[j][out.completion_mask[j]].tolist()
            rows[r] += sampled
            trained[r] += sampled
            if not bool(out.truncated[j]) and len(trained[r]) and ep.turns[r] > k + 1:
                rows[r] += observation_ids(tok, [{"role": "user", "content": f"seen {k + 1}"}], [tok.eos_token_id])
        live = [r for r in live if ep.turns[r] > k + 1]
    for r in range(ro.num_sequences):
        got = ro.completion_ids[r][ro.context_mask[r]].tolist()
        assert got == rows[r]
        assert ro.completion_ids[r][ro.completion_mask[r]].tolist() == trained[r]
        # the environment read each turn's own text
        turns = [tok.decode(t, skip_special_tokens=True) for t in _split_turns(ro, r)]
        assert envs[r].seen == turns


def _split_turns(ro, r):
    index = turn_index(ro.completion_mask, ro.observation_mask)[r]
    return [ro.completion_ids[r][index == k].tolist() for k in range(int(index.max()) + 1)]


def test_observation_tokens_are_the_templates_user_turn(setup):
    tok, _ = setup
    ids = observation_ids(tok, [{"role": "user", "content": "seen 1"}], [tok.eos_token_id])
    assert tok.decode(ids) == "<|user|>seen 1<|assistant|>"
    # a tool result on a template without a tool role is shown as a user message
    assert observation_ids(tok, [{"role": "tool", "name": "t", "content": "seen 1"}], [tok.eos_token_id]) == ids


def test_max_turns_and_done_and_rewards(setup):
    tok, model = setup
    _, envs, ro, ep, _ = _episodes(tok, model, max_turns=(3, 2), max_new=4)
    untruncated = ~ro.truncated
    # prompt 0 may write 3 turns, prompt 1 two; a turn cut by max_new_tokens ends its episode early
    assert (ep.turns[:2] <= 3).all() and (ep.turns[2:] <= 2).all()
    assert (ep.turns[:2][untruncated[:2]] == 3).all() and (ep.turns[2:][untruncated[2:]] == 2).all()
    expected = torch.tensor([0.25 if t >= 2 else 0.0 for t in ep.turns.tolist()])
    assert torch.equal(ep.rewards, expected)
    assert torch.equal(ep.tool_calls, ep.turns) and torch.equal(ep.tool_errors, torch.ones(4, dtype=torch.long))
    _, _, ro2, ep2, _ = _episodes(tok, model, max_turns=(3, 3), done_at=1, max_new=4)
    assert (ep2.turns == 1).all() and torch.equal(ep2.rewards, torch.ones(4))
    assert not ro2.observation_mask.any()


def test_episodes_end_when_the_next_turn_would_not_fit(setup):
    tok, model = setup
    _, _, ro, ep, prompts = _episodes(tok, model, max_turns=(5, 5), max_new=3, context=40)
    for r in range(ro.num_sequences):
        assert len(prompts[r // 2]) + int(ro.context_mask[r].sum()) <= 40
    assert ep.turns.max() < 5 and ro.truncated.any()



def test_an_episode_whose_next_turn_exactly_fills_the_context_is_kept(setup):
    """The room check counts the prompt, the turns and observations so far, the next observation and a whole next
    turn of max_new_tokens: when that sum is the context length the next turn is played, one token less of context
    ends the episode after turn 1 (truncated)."""
    tok, model = setup
    engine = TransformersEngine(model, tok.pad_token_id, tok.eos_token_id)
    prompt, max_new = encode_prompt(tok, "q0"), 8

    def play(context):
        return run_episodes(engine, tok, EpisodeBatch([prompt], [Scripted()], 1, [2]),
                            SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=5), [tok.eos_token_id],
                            context)

    free, free_ep = play(None)
    assert int(free_ep.turns[0]) == 2, "turn 1 was cut by the budget in this draw: no second turn to make room for"
    turn1 = _split_turns(free, 0)[0]
    obs = observation_ids(tok, [{"role": "user", "content": "seen 1"}], [tok.eos_token_id])
    exact = len(prompt) + len(turn1) + len(obs) + max_new
    kept, kept_ep = play(exact)
    assert int(kept_ep.turns[0]) == 2 and bool(kept.truncated[0]) == bool(free.truncated[0])
    assert torch.equal(kept.completion_ids[0][kept.context_mask[0]], free.completion_ids[0][free.context_mask[0]])
    assert len(prompt) + int(kept.context_mask[0].sum()) <= exact
    cut, cut_ep = play(exact - 1)
    assert int(cut_ep.turns[0]) == 1 and bool(cut.truncated[0]) and not cut.observation_mask.any()
    assert cut.completion_ids[0][cut.completion_mask[0]].tolist() == turn1

def test_observation_tokens_are_context_and_get_no_loss(setup):
    """The learner's log-probs of the assistant tokens equal an independent full forward over every real token (so
    the observations are attended to), are 0 on observations, and the loss's gradient is that of the assistant
    tokens alone."""
    tok, model = setup
    _, _, ro, _, _ = _episodes(tok, model, max_turns=(3, 3), max_new=6)
    assert ro.observation_mask.any()
    model.zero_grad()
    logp = sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                             observation_mask=ro.observation_mask, share_prompts=False)
    assert (logp[ro.observation_mask] == 0).all()
    logp.sum().backward()
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    expected_sum = 0.0
    for r in range(ro.num_sequences):  # one row at a time, no padding: a plain causal forward
        prompt = ro.prompt_ids[r][ro.prompt_mask[r]]
        comp = ro.completion_ids[r][ro.context_mask[r]]
        trained = ro.completion_mask[r][ro.context_mask[r]]
        ids = torch.cat([prompt, comp]).unsqueeze(0)
        lp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
        token = lp.gather(-1, comp.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(token[trained], logp[r][ro.completion_mask[r]], atol=1e-5)
        expected_sum = expected_sum + token[trained].sum()
    expected_sum.backward()
    for g, p in zip(got, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-5, rtol=1e-4)
    # the bug this guards against: observations out of the attention as well as the loss
    wrong = sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                              share_prompts=False)
    later = ro.completion_mask & (turn_index(ro.completion_mask, ro.observation_mask) > 0)
    assert not torch.allclose(wrong[later], logp.detach()[later], atol=1e-3)


def test_the_episodes_advantage_reaches_every_assistant_turn_and_tokens_count_once(setup):
    """Through produce: the RL component trains every turn's tokens with the row's advantage; its token count is
    the assistant tokens only."""
    tok, _ = setup
    ctx = step_context(tasks=[ScriptedTask(max_turns=3)], pools=[ScriptedTask().examples("train", 20)],
                       sampling=SamplingParams(temperature=1.0, max_new_tokens=5))
    ctx.pool_prompt_ids = [[encode_prompt(tok, e.prompt) for e in ctx.pools[0]]]
    from unigrad.data.samplers import TaskSampler
    ctx.sampler = TaskSampler([20], seed=1, names=["scripted"])
    batch, produced = produce(ctx, step=1, policy_version=0)
    comp = batch.components[0]
    seqs = comp.sequences
    assert seqs.observation_mask.any()
    assert comp.normalisers.num_tokens == float(seqs.completion_mask.sum())
    assert torch.equal(produced.rewards, produced.episodes.rewards)
    # the loss's gradient w.r.t. each token's log-prob is -A_i / num_tokens on every trained token of every turn
    logp = torch.zeros(seqs.completion_ids.shape, requires_grad=True)
    out = policy_loss(LossInputs(logp, seqs.completion_mask, comp.advantages,
                                 num_tokens=comp.normalisers.num_tokens,
                                 num_sequences=comp.normalisers.num_sequences),
                      resolve_objective("grpo", aggregation="token_mean"))
    out.loss.backward()
    expected = -comp.advantages[:, None] / comp.normalisers.num_tokens * seqs.completion_mask
    assert torch.allclose(logp.grad, expected, atol=1e-7)
    turns = turn_index(seqs.completion_mask, seqs.observation_mask)
    moving = comp.advantages != 0
    assert moving.any()
    for r in torch.nonzero(moving).flatten().tolist():  # every turn of a row with an advantage gets gradient
        for k in range(int(turns[r].max()) + 1):
            assert (logp.grad[r][turns[r] == k] != 0).all()



def scripted_context(tok, model=None, max_turns: int = 3, max_new: int = 4, single_turn: tuple[str, ...] = (),
                     **fields):
    """`step_context` over a `ScriptedTask` of `max_turns` turns (task 0) and the built-in `single_turn` tasks,
    sampling from `model` where given."""
    from unigrad.data.samplers import TaskSampler
    from unigrad.tasks import get_tasks

    tasks = [ScriptedTask(max_turns=max_turns), *(get_tasks(name)[0] for name in single_turn)]
    pools = [t.examples("train", 20, seed=k) for k, t in enumerate(tasks)]
    ctx = step_context(tasks=tasks, pools=pools, sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new),
                       **fields)
    ctx.pool_prompt_ids = [[encode_prompt(tok, e.prompt) for e in pool] for pool in pools]
    ctx.sampler = TaskSampler([20] * len(tasks), seed=1, names=[t.name for t in tasks])
    if model is not None:
        ctx.engine = TransformersEngine(model, tok.pad_token_id, tok.eos_token_id)
    return ctx


def test_l_max_of_multi_turn_rows_is_the_turn_budget_times_max_new_tokens(setup):
    """Dr. GRPO's constant covers every turn of the longest episodes: 3 turns of 4 tokens, or 2 under
    rollout.max_turns, beside single-turn rows of 4."""
    tok, _ = setup
    ctx = scripted_context(tok, single_turn=("arithmetic",))
    assert produce(ctx, step=1, policy_version=0)[0].max_length == 3 * 4
    ctx.config.rollout.max_turns = 2
    assert produce(ctx, step=1, policy_version=0)[0].max_length == 2 * 4


def test_overlong_shaping_measures_each_row_against_its_own_tasks_budget(setup):
    """DAPO's length penalty with L_max per row: 3 turns x 4 tokens for an episode of the scripted task, 4 tokens
    for a single-turn row; the buffer (3 tokens) before it."""
    tok, model = setup
    ctx = scripted_context(tok, model, single_turn=("arithmetic",), overlong_buffer=3)
    ctx.tasks[1].verify = lambda texts, examples: [1.0] * len(texts)
    _, produced = produce(ctx, step=1, policy_version=0)
    lengths = produced.rollout.completion_mask.sum(-1).float()
    episodic = produced.row_task == 0
    budget = torch.where(episodic, 12.0, 4.0)
    penalty = ((budget - 3 - lengths) / 3).clamp(max=0.0)
    assert (penalty[episodic] < 0).any() and (penalty[~episodic] < 0).any()
    assert (lengths[episodic] > 4).sum() > (penalty[episodic] < 0).sum()  # rows a one-turn L_max would penalise
    want = compute_advantages(produced.rewards + penalty, produced.rollout.group_ids, "grpo")
    torch.testing.assert_close(produced.all_advantages, want)

def test_later_turns_draw_from_their_own_streams(setup):
    """An episode's turns do not depend on which other episodes share the calls: the same prompt alone or beside
    another gives the same episode."""
    tok, model = setup
    engine = TransformersEngine(model, tok.pad_token_id, tok.eos_token_id)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, prompt_seeds=(11, 12))
    prompts = [encode_prompt(tok, "q0"), encode_prompt(tok, "other")]
    both, _ = run_episodes(engine, tok, EpisodeBatch(prompts, [Scripted() for _ in range(4)], 2, [3, 3]), sampling,
                           [tok.eos_token_id])
    alone, _ = run_episodes(engine, tok, EpisodeBatch(prompts[1:], [Scripted() for _ in range(2)], 2, [3]),
                            dataclasses.replace(sampling, prompt_seeds=(12,)), [tok.eos_token_id])
    assert both.observation_mask[2:].any()
    for r in range(2):
        assert both.completion_ids[2 + r][both.context_mask[2 + r]].tolist() == \
            alone.completion_ids[r][alone.context_mask[r]].tolist()


class Raising(Scripted):
    def step(self, turn):
        if self.turn == 1:
            raise KeyError("the environment's own bug")
        return super().step(turn)


def test_an_environment_that_raises_leaves_its_episode_unscorable(setup):
    tok, model = setup
    engine = TransformersEngine(model, tok.pad_token_id, tok.eos_token_id)
    ro, ep = run_episodes(engine, tok, EpisodeBatch([encode_prompt(tok, "q0")], [Raising(), Scripted()], 2, [3]),
                          SamplingParams(temperature=1.0, max_new_tokens=8, seed=5), [tok.eos_token_id])
    assert ep.turns[0] >= 2, "turn 1 was cut by the budget in this draw: the second step never came"
    assert torch.isnan(ep.rewards[0]) and not torch.isnan(ep.rewards[1])
    assert "KeyError" in ep.failures[0] and 1 not in ep.failures
    assert int(ep.turns[0]) == 2  # it ended where it raised
