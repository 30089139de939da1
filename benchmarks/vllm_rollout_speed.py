"""Rollout tokens per second of VLLMEngine against TransformersEngine, at two shapes, in one process.

    python benchmarks/vllm_rollout_speed.py [--repeats 5] [--warmup 1] [--threads N] [--shape both|default|qwen2-25m]
                                            [--device cpu|cuda] [--json PATH]

Needs vLLM (on a CPU its CPU build, the README's "vLLM on CPU": run it from `.venv-vllm`); without it the script says
so and exits with status 2.

Shapes (random weights, float32 in both engines, no EOS: every row makes max_new_tokens tokens, and the tokens
counted are the completion mask's, i.e. the real ones):
- `default`: examples/default.yaml's rollout: the unigrad-tiny architecture (Llama, hidden 128, 4 layers, 4 heads of
  32, vocabulary 102, tied embeddings), 16 prompts x 8 samples x 40 new tokens, temperature 0.8, top-p 1, top-k 0.
- `qwen2-25m`: a Qwen2 of about 25 M parameters (hidden 512, 7 layers, 8 heads of 64, 2 KV heads, intermediate 1536,
  vocabulary 8192, tied embeddings) saved with save_pretrained to a temporary directory; 8 prompts x 8 samples x
  256 new tokens, temperature 1.

Each engine is built once (its build time is printed apart), then runs `--warmup` untimed calls, then `--repeats`
timed calls interleaved with the other engine's (vLLM, transformers, vLLM, ...), so drift in machine load hits both
alike; the medians are compared. Both run in this process with the same number of threads: OMP_NUM_THREADS and
torch.set_num_threads are set to `--threads` before either engine is built, and VLLM_CPU_OMP_THREADS_BIND=nobind
keeps vLLM's CPU build from rebinding OpenMP threads (it also turns torch.set_num_threads into a no-op once built,
which is why the count is fixed first); the threads each engine actually ran with are printed.

Each timed call is also printed to stderr as it ends; vLLM's own log is kept to errors (VLLM_LOGGING_LEVEL=ERROR
unless set). `--device cuda` runs both engines on the GPU (vLLM's CUDA build; the model is moved there first and
the transformers engine shares it). `--json PATH` writes the settings, every timed call and the ratios there.
The last line is `vllm_rollout_speedup=<vLLM tokens/s / transformers tokens/s at qwen2-25m>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def vllm_missing_message() -> str | None:
    """Why this benchmark cannot run here (None if vLLM is importable)."""
    if importlib.util.find_spec("vllm") is None:
        return ("vllm_rollout_speed: vLLM is not installed in this environment, so there is nothing to compare. "
                "On a CPU, build the environment of the README's 'vLLM on CPU' section and run it from there "
                "(`. .venv-vllm/bin/activate && python benchmarks/vllm_rollout_speed.py`); on a GPU, "
                "`pip install \"unigrad[vllm]\"`.")
    return None


@dataclass
class Shape:
    name: str
    description: str
    model: object  # a transformers causal LM, eval mode
    prompts: list[list[int]]
    n: int
    sampling: object  # unigrad.rollout.base.SamplingParams
    pad_token_id: int


def default_shape() -> Shape:
    """examples/default.yaml's rollout on the unigrad-tiny architecture (random weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from unigrad.models.tiny import TinyRecipe, tiny_config
    from unigrad.rollout.base import SamplingParams

    torch.manual_seed(0)
    config = tiny_config(TinyRecipe())
    config.eos_token_id = None
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(12, 40, (16,), generator=gen).tolist()  # the default tasks' prompts are 10-60 chars
    prompts = [torch.randint(3, config.vocab_size, (k,), generator=gen).tolist() for k in lengths]
    sampling = SamplingParams(temperature=0.8, top_p=1.0, top_k=0, max_new_tokens=40, seed=0)
    return Shape("default", "unigrad-tiny architecture, 16 prompts x 8 samples x 40 tokens, temperature 0.8",
                 model, prompts, 8, sampling, config.pad_token_id)


def qwen2_25m_shape() -> Shape:
    """A ~25 M-parameter Qwen2 (head dim 64), 8 prompts x 8 samples x 256 tokens."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from unigrad.rollout.base import SamplingParams

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=7,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (32,), generator=gen).tolist() for _ in range(8)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=256, seed=0)
    return Shape("qwen2-25m", "Qwen2 hidden 512, 7 layers, 8 heads of 64, 8 prompts x 8 samples x 256 tokens",
                 model, prompts, 8, sampling, 0)


def build_engines(shape: Shape, save_dir: str, device: str) -> tuple[dict[str, object], dict[str, float]]:
    """The two engines on `shape`'s model, and the seconds each took to build.

    vLLM starts from the model saved with save_pretrained (as `VLLMEngine` does for a model without a local
    directory), so the save is part of its build time.
    """
    import torch

    from unigrad.rollout.transformers_engine import TransformersEngine
    from unigrad.rollout.vllm_engine import VLLMEngine

    model = shape.model.to(device)
    longest = max(map(len, shape.prompts)) + shape.sampling.max_new_tokens
    start = time.perf_counter()
    transformers_engine = TransformersEngine(model, shape.pad_token_id, None, device=device)
    t_build = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(save_dir)
    model.name_or_path = save_dir
    vllm_engine = VLLMEngine(model, shape.pad_token_id, None, dtype=torch.float32, max_model_len=longest, seed=0)
    v_build = time.perf_counter() - start
    return {"vllm": vllm_engine, "transformers": transformers_engine}, {"vllm": v_build, "transformers": t_build}


def time_interleaved(runners: dict[str, Callable[[], int]], repeats: int,
                     warmup: int) -> dict[str, list[tuple[float, int]]]:
    """(seconds, tokens) of each runner's timed calls, the runners taking turns; `warmup` untimed calls first."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in runners}
    for i in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            tokens = run()
            results[name].append((time.perf_counter() - start, tokens))
            print(f"  call {i + 1}/{repeats} {name}: {results[name][-1][0]:.3f} s, {tokens} tokens", file=sys.stderr,
                  flush=True)
    return results


def measure(shape: Shape, repeats: int, warmup: int, device: str) -> dict:
    """Print one shape's build times and rollout speeds; its record, with `ratio`: vLLM tokens/s over transformers
    tokens/s (medians)."""
    import torch

    n_params = sum(p.numel() for p in shape.model.parameters())
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as save_dir:
        engines, build = build_engines(shape, save_dir, device)
        threads_after_build = torch.get_num_threads()

        def runner(engine) -> Callable[[], int]:
            def run() -> int:
                rollout = engine.generate(shape.prompts, shape.n, shape.sampling)
                return int(rollout.completion_mask.sum())
            return run

        results = time_interleaved({name: runner(e) for name, e in engines.items()}, repeats, warmup)
    print(f"[{shape.name}] {shape.description}; {n_params / 1e6:.2f} M parameters, float32")
    print(f"  build: vllm {build['vllm']:.1f} s (save_pretrained + LLM + weight load), "
          f"transformers {build['transformers']:.3f} s; torch threads after both builds: {threads_after_build}")
    rate = {}
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        tokens = statistics.median(k for _, k in runs)
        rate[name] = tokens / seconds
        print(f"  {name:<12} median {seconds:8.3f} s for {tokens:.0f} tokens = {rate[name]:9.0f} tokens/s "
              f"(min {min(s for s, _ in runs):.3f} s, max {max(s for s, _ in runs):.3f} s)")
    ratio = rate["vllm"] / rate["transformers"]
    print(f"  [{shape.name}] vllm / transformers tokens per second: {ratio:.3f}", flush=True)
    return {"parameters": n_params, "build_s": build, "calls": results, "tokens_per_s": rate, "ratio": ratio}


def configure(threads: int) -> None:
    """The same thread count for both engines, fixed before vLLM is imported (see the module docstring); vLLM's
    log kept to errors."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import torch

    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per engine and shape (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per engine first (default 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of both engines "
                        "(default: every core)")
    parser.add_argument("--shape", choices=("both", "default", "qwen2-25m"), default="both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="write the settings, every timed call and the ratios here")
    args = parser.parse_args()
    if (message := vllm_missing_message()) is not None:
        print(message, file=sys.stderr)
        raise SystemExit(2)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1, --warmup at least 0")
    configure(args.threads)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("vllm_rollout_speed: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        raise SystemExit(2)
    import vllm

    load_before = os.getloadavg()
    print(f"vllm {vllm.__version__}, torch {torch.__version__}, device {args.device}, {args.threads} threads "
          f"(VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']}), {os.cpu_count()} cores; "
          f"{args.warmup} warm-up call(s) per engine excluded, {args.repeats} timed calls each, interleaved; "
          f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    shapes = {"default": default_shape, "qwen2-25m": qwen2_25m_shape}
    records = {}
    for name, build in shapes.items():
        if args.shape in ("both", name):
            records[name] = measure(build(), args.repeats, args.warmup, args.device)
    ratios = {name: record["ratio"] for name, record in records.items()}
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "vllm": vllm.__version__,
                                               "torch": torch.__version__, "load_before": load_before,
                                               "load_after": load_after, "shapes": records}, indent=1) + "\n")
    if "default" in ratios:
        print(f"vllm_rollout_speedup_default={ratios['default']:.3f}")
    if "qwen2-25m" in ratios:
        print(f"vllm_rollout_speedup={ratios['qwen2-25m']:.3f}")


if __name__ == "__main__":
    main()
