"""The same two-turn episodes played by the built-in runner and by an agent through the endpoint: what the endpoint
costs.

Task: draft and revise on `arithmetic`. The model answers the prompt, is told FEEDBACK ("Check your work and give
the final answer.") and answers again; the revision is scored. (a) The built-in runner: `run_episodes` over a
two-turn environment defined here (its second turn's observation is FEEDBACK as a user message). (b) An agent:
examples/agents/draft_revise.py, the same two calls with the same messages, through `run_agent_episodes` (the
in-process OpenAI-compatible endpoint, the real `openai` client, a thread per episode). Both: `--episodes` episodes
at once (`--prompts` prompts x the rest as samples), the same TransformersEngine on unigrad-tiny, the same sampling
(temperature 1, `--max-new-tokens`). Repeats are paired and interleaved (built-in, agent, built-in, ...) so drift
hits both alike; medians are printed, with each path's time inside `engine.generate` (calls, rows) so that what
the endpoint adds (server start and stop, batching window, HTTP, JSON, rendering, trajectory) is total minus engine.

    python benchmarks/agent_throughput.py [--repeats 7] [--episodes 64] [--prompts 16] [--max-new-tokens 24]
                                          [--model unigrad-tiny]

The endpoint's cost is close to a fixed time per model call (printed as "endpoint cost per call"), so the ratio
falls as the engine's time per call grows: a larger model (`--model unigrad-chat`) or longer completions.

Last line: `agent_endpoint_overhead=<the median of the paired ratios agent time / built-in time>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unigrad.agents.runner import AgentBatch, AgentSettings, run_agent_episodes
from unigrad.environments.base import StepResult
from unigrad.models.loading import load_model_and_tokenizer
from unigrad.rollout.base import SamplingParams
from unigrad.rollout.episodes import EpisodeBatch, encode_messages, run_episodes
from unigrad.rollout.transformers_engine import TransformersEngine
from unigrad.serve import serving
from unigrad.serve.service import context_length_of
from unigrad.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "examples" / "agents" / "draft_revise.py"
FEEDBACK = "Check your work and give the final answer."


class DraftRevise:
    """Two turns: the answer, FEEDBACK, the revision (scored by the task's verifier)."""

    def __init__(self, task):
        self.task, self.example, self.turns = task, None, 0

    def reset(self, example):
        self.example, self.turns = example, 0
        return [{"role": "user", "content": example.prompt}]

    def step(self, turn: str) -> StepResult:
        self.turns += 1
        if self.turns == 1:
            return StepResult(observation=[{"role": "user", "content": FEEDBACK}])
        return StepResult(reward=float(self.task.verify([turn], [self.example])[0]), done=True)


@dataclass
class CountingEngine:
    """An engine that counts its `generate` calls, their rows and the time spent in them."""

    engine: TransformersEngine
    calls: int = 0
    rows: int = 0
    seconds: float = 0.0
    call_rows: list[int] = field(default_factory=list)
    model: torch.nn.Module | None = field(default=None)

    def generate(self, prompts, n, sampling):
        start = time.perf_counter()
        out = self.engine.generate(prompts, n, sampling)
        self.seconds += time.perf_counter() - start
        self.calls, self.rows = self.calls + 1, self.rows + len(prompts) * n
        self.call_rows.append(len(prompts) * n)
        return out

    def __getattr__(self, name):
        return getattr(self.engine, name)


def built_in(engine, tok, examples, n: int, sampling: SamplingParams):
    task = get_task("arithmetic")
    environments = []
    for example in examples:
        for _ in range(n):
            env = DraftRevise(task)
            env.reset(example)
            environments.append(env)
    prompts = [encode_messages(tok, [{"role": "user", "content": e.prompt}]) for e in examples]
    batch = EpisodeBatch(prompts, environments, n, [2] * len(examples))
    return run_episodes(engine, tok, batch, sampling, [tok.eos_token_id], context_length_of(tok, engine.model))


def through_agent(engine, tok, examples, n: int, sampling: SamplingParams, model_name: str):
    task = get_task(f"agent:{AGENT}:solve@arithmetic")
    fallback = [tok(e.prompt)["input_ids"] for e in examples]
    batch = AgentBatch([task] * len(examples), examples, fallback, n, tuple(range(len(examples))))
    settings = AgentSettings(model_name, 120.0, context_length_of(tok, engine.model))
    return run_agent_episodes(engine, tok, batch, sampling, settings)


def timed(play, engine: CountingEngine, *args) -> dict:
    engine.calls, engine.rows, engine.seconds, engine.call_rows = 0, 0, 0.0, []
    start = time.perf_counter()
    rows, episodes = play(engine, *args)
    total = time.perf_counter() - start
    tokens = int(rows.completion_mask.sum())
    return {"total": total, "engine": engine.seconds, "calls": engine.calls, "rows": engine.rows, "tokens": tokens,
            "turns": float(episodes.turns.float().mean()), "reward": float(episodes.rewards.nanmean())}


def endpoint_start_stop(engine, tok) -> float:
    """Seconds to start and stop the in-process server with no request (median of 5)."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        with serving(engine, tok, "served"):
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def summary(name: str, runs: list[dict]) -> str:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return (f"{name:9s} total {med['total']:.3f} s  in engine.generate {med['engine']:.3f} s "
            f"({med['calls']:.0f} calls, {med['rows']:.0f} rows)  other {med['total'] - med['engine']:.3f} s  "
            f"turns/episode {med['turns']:.2f}  completion tokens {med['tokens']:.0f}  reward {med['reward']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--model", default="unigrad-tiny", help="a model name or path (default unigrad-tiny)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model)
    engine = CountingEngine(TransformersEngine(model.eval(), tok.pad_token_id, tok.eos_token_id), model=model)
    examples = get_task("arithmetic").examples("train", args.prompts, seed=0)
    n = args.episodes // args.prompts
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    agent = (engine, tok, examples, n, sampling, args.model)
    timed(built_in, engine, tok, examples, n, sampling), timed(through_agent, *agent)
    runs = {"built-in": [], "agent": []}
    for _ in range(args.repeats):
        runs["built-in"].append(timed(built_in, engine, tok, examples, n, sampling))
        runs["agent"].append(timed(through_agent, *agent))
    print(f"{args.model}: {len(examples)} prompts x {n} = {len(examples) * n} episodes, 2 turns, max_new_tokens "
          f"{args.max_new_tokens}, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, "
          f"{args.repeats} paired repeats (after one warm-up each); medians:")
    for name, results in runs.items():
        print(summary(name, results))
    ratios = [a["total"] / b["total"] for a, b in zip(runs["agent"], runs["built-in"], strict=True)]
    print(f"rows per engine call, last agent repeat: {engine.call_rows}")
    print(f"endpoint start and stop alone: {endpoint_start_stop(engine, tok):.3f} s")
    other = {name: statistics.median(r["total"] - r["engine"] for r in results) for name, results in runs.items()}
    calls = statistics.median(r["turns"] for r in runs["agent"]) * len(examples) * n
    print(f"endpoint cost per call (agent's time outside the engine less the built-in runner's, over {calls:.0f} "
          f"calls): {1000 * (other['agent'] - other['built-in']) / calls:.2f} ms")
    print(f"paired ratios: {' '.join(f'{r:.2f}' for r in ratios)}")
    base = statistics.median(r["total"] for r in runs["built-in"])
    print(f"ratio of the medians: {statistics.median(r['total'] for r in runs['agent']) / base:.3f}")
    print(f"agent_endpoint_overhead={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
