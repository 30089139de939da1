"""`rollout.engine=auto`: the rule that picks the rollout engine (unigrad/rollout/engine_choice.py), and its wiring
to a run's config and model. The rule is a pure function, tested branch by branch and at its thresholds; the
wiring runs on a real (small) transformers model, in this environment (without vLLM) and, where vLLM's CPU build is
installed, with it."""

from __future__ import annotations

import importlib.util

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from unigrad.config import validate_config
from unigrad.rollout import engine_choice
from unigrad.rollout.engine_choice import EngineSituation, choose_rollout_engine
from unigrad.train.lifecycle.engine_selection import resolve_engine, vllm_refusals

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def situation(**changes) -> EngineSituation:
    base = {"vllm_unavailable": None, "device_type": "cuda", "parameters": 25_000_000, "max_new_tokens": 256,
            "vllm_refusals": ()}
    return EngineSituation(**{**base, **changes})


def test_vllm_on_a_cuda_gpu_where_it_can_run():
    choice = choose_rollout_engine(situation())
    assert choice.engine == "vllm"
    assert "CUDA" in choice.reason


def test_transformers_where_vllm_cannot_run_whatever_the_device_or_size():
    for device in ("cuda", "cpu"):
        choice = choose_rollout_engine(situation(vllm_unavailable="vLLM is not installed (x)", device_type=device,
                                                 parameters=10**10, max_new_tokens=4096))
        assert choice.engine == "transformers"
        assert "vLLM is not installed (x)" in choice.reason


def test_transformers_where_the_runs_settings_rule_vllm_out():
    choice = choose_rollout_engine(situation(vllm_refusals=("rollout.num_engines > 1 needs transformers",)))
    assert choice.engine == "transformers"
    assert "rollout.num_engines > 1 needs transformers" in choice.reason


def test_transformers_on_other_devices(monkeypatch):
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_PARAMETERS", 1)  # even where the CPU rule would pick vLLM
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_NEW_TOKENS", 1)
    choice = choose_rollout_engine(situation(device_type="mps"))
    assert choice.engine == "transformers" and "'mps'" in choice.reason


def test_on_a_cpu_without_measured_thresholds_always_transformers(monkeypatch):
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_PARAMETERS", None)
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_NEW_TOKENS", None)
    for params, tokens in ((10**6, 16), (10**10, 10**5)):
        assert choose_rollout_engine(situation(device_type="cpu", parameters=params,
                                               max_new_tokens=tokens)).engine == "transformers"


def test_on_a_cpu_vllm_from_both_thresholds_on(monkeypatch):
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_PARAMETERS", 20_000_000)
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_NEW_TOKENS", 128)
    expected = {(20_000_000, 128): "vllm", (19_999_999, 128): "transformers", (20_000_000, 127): "transformers",
                (10**9, 10**4): "vllm", (10**9, 16): "transformers", (10**6, 10**4): "transformers"}
    for (params, tokens), engine in expected.items():
        got = choose_rollout_engine(situation(device_type="cpu", parameters=params, max_new_tokens=tokens))
        assert got.engine == engine, (params, tokens, got)


def test_the_shipped_thresholds_follow_the_measurements():
    """examples/default.yaml on unigrad-tiny (1.06 M parameters, 40 tokens) is where vLLM's CPU build lost."""
    assert choose_rollout_engine(situation(device_type="cpu", parameters=1_060_000,
                                           max_new_tokens=40)).engine == "transformers"
    # and the measured winning point (benchmarks/vllm_rollout_speed.py's qwen2-25m shape) on vLLM
    assert choose_rollout_engine(situation(device_type="cpu", parameters=25_310_000,
                                           max_new_tokens=256)).engine == "vllm"


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        choose_rollout_engine(situation(parameters=0))
    with pytest.raises(ValueError, match="at least 1"):
        choose_rollout_engine(situation(max_new_tokens=0))


def test_vllm_refusals_are_the_configs_own_checks_with_the_engine_set_to_vllm():
    assert vllm_refusals(validate_config({"rollout": {"engine": "auto"}})) == ()
    refused = vllm_refusals(validate_config({"rollout": {"engine": "auto", "num_engines": 2}}))
    assert len(refused) == 1 and "num_engines" in refused[0]
    refused = vllm_refusals(validate_config({"rollout": {"engine": "auto", "temperature": 3.0}}))
    assert len(refused) == 1 and "temperature" in refused[0]


def small_llama(head_dim: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=50, hidden_size=2 * head_dim, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def test_an_explicit_engine_is_left_as_it_is():
    for engine in ("transformers", "vllm"):
        cfg = validate_config({"rollout": {"engine": engine}})
        resolved, choice = resolve_engine(cfg, small_llama(32), "cpu")
        assert resolved is cfg and choice is None


@pytest.mark.skipif(VLLM_INSTALLED, reason="checks the environment without vLLM")
def test_auto_without_vllm_runs_the_transformers_engine():
    cfg = validate_config({"rollout": {"engine": "auto", "max_new_tokens": 7}})
    for device in ("cpu", "cuda"):
        resolved, choice = resolve_engine(cfg, small_llama(32), device)
        assert resolved.rollout.engine == "transformers" and choice.engine == "transformers"
        assert "not installed" in choice.reason
        assert resolved.rollout.max_new_tokens == 7  # the rest of the config is kept
    assert cfg.rollout.engine == "auto"  # the given config is not changed


@pytest.mark.skipif(not VLLM_INSTALLED, reason="needs vLLM's CPU build (the README's 'vLLM on CPU')")
def test_auto_with_vllms_cpu_build_follows_the_cpu_rule(monkeypatch):
    from unigrad.rollout.vllm_engine import vllm_on_cpu

    if not vllm_on_cpu():
        pytest.skip("vLLM here is the CUDA build")
    cfg = validate_config({"rollout": {"engine": "auto", "max_new_tokens": 256}})
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_PARAMETERS", 1)
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_NEW_TOKENS", 1)
    resolved, choice = resolve_engine(cfg, small_llama(32), "cpu")
    assert (resolved.rollout.engine, choice.engine) == ("vllm", "vllm")
    resolved, choice = resolve_engine(cfg, small_llama(16), "cpu")  # a head size the CPU build does not run
    assert choice.engine == "transformers" and "head size" in choice.reason
    mixtral = MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=64, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                               num_local_experts=4, num_experts_per_tok=2))
    resolved, choice = resolve_engine(cfg, mixtral, "cpu")  # the CPU build refuses mixture-of-experts models
    assert choice.engine == "transformers" and "mixture-of-experts" in choice.reason
