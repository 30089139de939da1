"""unigrad.models: char tokenizer, HF loading, LoRA, and the cached tiny model (with very small recipes)."""

from __future__ import annotations

import json
import string
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from unigrad.eval import tiny_heldout_accuracy
from unigrad.models import pretrain, tiny
from unigrad.models.build_evaluations import build_evaluation
from unigrad.models.loading import (
    DEFAULT_CHAT_TEMPLATE,
    LoraSettings,
    ModelNotFoundError,
    load_model_and_tokenizer,
    save_model,
)
from unigrad.models.tokenizer import (
    ASSISTANT_ID,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    USER_ID,
    VOCAB,
    build_char_tokenizer,
    completion_ids,
    prompt_ids,
)

SAMPLES = [
    "",
    " ",
    "  two  spaces  ",
    "line one\nline two\n\n",
    "\nleading newline",
    string.printable.replace("\t", "").replace("\r", "").replace("\x0b", "").replace("\x0c", ""),
    "def f(x):\n    return x * 2  # comment\n",
    "<bos> looks special but is text? no: <|user|> is a special token",
    "rev: 2021=40, 2022=55. rev change 2021->2022?",
]


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _micro_recipe(**changes) -> tiny.TinyRecipe:
    """A recipe that builds in well under a second: a 1-layer, 32-wide model, a handful of steps."""
    base = tiny.TinyRecipe(
        tasks=(("arithmetic", 1.0), ("countdown", 1.0)),
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        train_examples_per_task=64,
        max_length=128,
        steps=4,
        batch_size=8,
        micro_batch_size=4,
        warmup_steps=2,
        eval_examples=4,
        num_threads=1,  # a 1-layer model gains nothing from a second thread, and loses much when the CPU is shared
    )
    return base.replace(**changes)


@pytest.fixture(scope="module")
def char_tok() -> PreTrainedTokenizerFast:
    return build_char_tokenizer()


# ------------------------------------------------------------------------------------------- tokenizer


def test_vocab_layout(char_tok):
    assert VOCAB[:5] == ("<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>")
    assert (PAD_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID) == (0, 1, 2, 3, 4)
    assert len(char_tok) == len(VOCAB) == 5 + 95 + 1 + 1
    assert (char_tok.pad_token_id, char_tok.bos_token_id, char_tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert char_tok.unk_token_id == UNK_ID


@pytest.mark.parametrize("text", SAMPLES)
def test_char_roundtrip(char_tok, text):
    ids = char_tok(text)["input_ids"]
    assert char_tok.decode(ids, skip_special_tokens=False) == text
    if not any(t in text for t in VOCAB[:5]):
        assert len(ids) == len(text)  # exactly one token per character
        assert char_tok.decode(ids) == text
        assert char_tok.convert_ids_to_tokens(ids) == list(text)
    else:  # special-token strings in text are parsed as the special tokens
        assert USER_ID in ids or BOS_ID in ids


def test_random_printable_roundtrip(char_tok):
    import random

    rng = random.Random(0)
    alphabet = [chr(i) for i in range(32, 127)] + ["\n"] * 5
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))).replace("<", "[")
        ids = char_tok(text)["input_ids"]  # plain calls add no special tokens
        assert len(ids) == len(text) and UNK_ID not in ids
        assert char_tok.decode(ids) == text


def test_unknown_chars_map_to_unk(char_tok):
    ids = char_tok("a\tb é")["input_ids"]
    assert ids[1] == UNK_ID and ids[4] == UNK_ID and len(ids) == 5
    assert char_tok.decode(ids, skip_special_tokens=True) == "ab "


def test_chat_template_exact(char_tok):
    p = "23+58 -17\nok"
    ids = _ids(
        char_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
    )
    assert ids == [BOS_ID, USER_ID, *char_tok(p)["input_ids"], ASSISTANT_ID]
    assert ids == prompt_ids(p)
    text = char_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
    assert text == f"<bos><|user|>{p}<|assistant|>"
    convo = [{"role": "user", "content": p}, {"role": "assistant", "content": "64"}]
    assert char_tok.apply_chat_template(convo, tokenize=False) == f"<bos><|user|>{p}<|assistant|>64<eos>"
    full = _ids(char_tok.apply_chat_template(convo, tokenize=True))
    assert full == prompt_ids(p) + completion_ids("64")
    assert full[-1] == EOS_ID
    with pytest.raises(Exception, match="unknown chat role"):
        char_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_autotokenizer_roundtrip(char_tok, tmp_path):
    # With a Llama config beside it (as in a model directory), AutoTokenizer must still give the same pipeline.
    tiny.tiny_config(_micro_recipe()).save_pretrained(tmp_path)
    char_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == char_tok.get_vocab()
    for text in SAMPLES:
        assert loaded(text)["input_ids"] == char_tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == char_tok.decode(char_tok(text)["input_ids"])
    assert loaded.decode(loaded("a  b\n c")["input_ids"]) == "a  b\n c"
    msgs = [{"role": "user", "content": "use 3 7 9 to make 30"}]
    assert _ids(loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)) == prompt_ids(
        msgs[0]["content"]
    )
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert loaded.padding_side == "left"


# -------------------------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def local_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("local_model")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny.tiny_config(_micro_recipe()))
    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return path


def test_load_from_local_path(local_model_dir, char_tok):
    model, tok = load_model_and_tokenizer(str(local_model_dir))
    assert isinstance(model, LlamaForCausalLM) and model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok.get_vocab() == char_tok.get_vocab()
    assert _ids(
        tok.apply_chat_template([{"role": "user", "content": "1+1"}], add_generation_prompt=True, tokenize=True)
    ) == prompt_ids("1+1")
    expected = load_file(str(local_model_dir / "model.safetensors"))
    state = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(state[k], v)
    model_bf16, _ = load_model_and_tokenizer(local_model_dir, dtype="bfloat16")
    assert next(model_bf16.parameters()).dtype == torch.bfloat16


def test_tokenizer_defaults_filled(local_model_dir, tmp_path):
    # A tokenizer without pad token and chat template gets eos as pad and the documented default template.
    tok = AutoTokenizer.from_pretrained(local_model_dir)
    tok.pad_token = None
    tok.chat_template = None
    model = LlamaForCausalLM.from_pretrained(local_model_dir)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    _, loaded = load_model_and_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<eos>"
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<bos>user: hi\nassistant: "


def test_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not a local directory"):
        load_model_and_tokenizer("no-such-org/no-such-model-unigrad")


def test_hub_id_without_a_reachable_hub_fails_at_once_and_names_offline_mode(monkeypatch):
    """Without HF_HUB_OFFLINE and without a network, transformers retries for about 50 s; a quick probe of the hub
    sends the load to the local cache at once, and the message says how to skip the probe."""
    from unigrad.models.loading import _hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if _hub_reachable("no-such-org/no-such-model-unigrad"):
        pytest.skip("a model hub is reachable from this machine")
    with pytest.raises(ModelNotFoundError, match="no model hub is reachable from here .set HF_HUB_OFFLINE=1"):
        load_model_and_tokenizer("no-such-org/no-such-model-unigrad")


# ----------------------------------------------------------------------------------------------- LoRA


def test_lora_only_adapter_trainable_and_save_merges(local_model_dir, tmp_path):
    pytest.importorskip("peft", reason="LoRA needs peft (not yet a declared dependency)")
    model, tok = load_model_and_tokenizer(
        local_model_dir, lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert frozen and not any("lora_" in n for n in frozen)
    # Move the adapter away from its no-op init so that merging changes the weights.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    ids = torch.tensor([prompt_ids("12+34")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = save_model(model, tok, tmp_path / "merged")
    assert any("lora_" in n for n, _ in model.named_parameters())  # the caller's model keeps its adapter
    saved = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in saved)
    reloaded, tok2 = load_model_and_tokenizer(out)
    assert isinstance(reloaded, LlamaForCausalLM)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    base = load_file(str(local_model_dir / "model.safetensors"))
    key = next(k for k in saved if k.endswith("self_attn.q_proj.weight"))
    assert not torch.equal(saved[key], base[key])
    assert tok2.get_vocab() == tok.get_vocab()


# ----------------------------------------------------------------------------------------------- tiny


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.delenv("UNIGRAD_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tiny.cache_root() == tmp_path / "xdg" / "unigrad"
    monkeypatch.setenv("UNIGRAD_CACHE", str(tmp_path / "u"))
    assert tiny.cache_root() == tmp_path / "u"
    monkeypatch.delenv("UNIGRAD_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tiny.cache_root() == Path.home() / ".cache" / "unigrad"


def test_recipe_roundtrip_and_key():
    r = _micro_recipe()
    assert tiny.TinyRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert tiny.tiny_cache_dir(r, "/c") == tiny.tiny_cache_dir(tiny.TinyRecipe.from_dict(r.to_dict()), "/c")
    assert tiny.tiny_cache_dir(r, "/c") != tiny.tiny_cache_dir(r.replace(seed=1), "/c")
    assert tiny.tiny_cache_dir(r, "/c") != tiny.tiny_cache_dir(r.replace(lr=r.lr * 1.5), "/c")
    with pytest.raises(ValueError):
        tiny.TinyRecipe(tasks=())


def test_tiny_build_deterministic(tmp_path):
    recipe = _micro_recipe()
    a = tiny.ensure_tiny(recipe, tmp_path / "a", progress=False)
    b = tiny.ensure_tiny(recipe, tmp_path / "b", progress=False)
    assert a.name == b.name and a != b
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = tiny.ensure_tiny(recipe.replace(seed=1), tmp_path / "a", progress=False)
    assert c != a
    wc = load_file(str(c / "model.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_tiny_cache_reuse_and_contents(tmp_path):
    recipe = _micro_recipe()
    before = tiny.build_count()
    path = tiny.ensure_tiny(recipe, tmp_path, progress=False, evaluate_built=tiny_heldout_accuracy)
    assert tiny.build_count() == before + 1
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert tiny.ensure_tiny(recipe, tmp_path, progress=False) == path
    assert tiny.build_count() == before + 1
    assert (path / "manifest.json").stat().st_mtime_ns == mtime
    # Only the finished directory (and its lock file) is left in the cache: no temp directories.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.name + ".lock"])
    assert tiny.TinyRecipe.from_dict(json.loads((path / "recipe.json").read_text())) == recipe
    report = json.loads((path / "report.json").read_text())
    assert set(report["heldout_greedy_accuracy"]) == {"arithmetic", "countdown"}
    assert all(0.0 <= v <= 1.0 for v in report["heldout_greedy_accuracy"].values())
    assert report["parameters"] == sum(p.numel() for p in LlamaForCausalLM(tiny.tiny_config(recipe)).parameters())
    assert tiny.verify_cache(path) is None
    # load_model_and_tokenizer("unigrad-tiny") goes through the same cache.
    model, tok = load_model_and_tokenizer("unigrad-tiny", tiny_recipe=recipe, cache_dir=tmp_path)
    assert tiny.build_count() == before + 1
    assert isinstance(model, LlamaForCausalLM) and tok.get_vocab() == build_char_tokenizer().get_vocab()
    assert model.generation_config.eos_token_id == EOS_ID


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete", "manifest"])
def test_tiny_damaged_cache_rebuilt(tmp_path, damage):
    recipe = _micro_recipe()
    path = tiny.ensure_tiny(recipe, tmp_path, progress=False)
    good = (path / "model.safetensors").read_bytes()
    weights = path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(good[: len(good) // 2])
    elif damage == "corrupt":
        weights.write_bytes(good[:-8] + bytes(8 * [0x41]))
    elif damage == "delete":
        weights.unlink()
    else:
        (path / "manifest.json").write_text("{not json")
    assert tiny.verify_cache(path) is not None
    before = tiny.build_count()
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = tiny.ensure_tiny(recipe, tmp_path, progress=False)
    assert again == path and tiny.build_count() == before + 1
    assert tiny.verify_cache(path) is None
    assert (path / "model.safetensors").read_bytes() == good
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.ensure_tiny(recipe, tmp_path, progress=False)
    assert tiny.build_count() == before + 1


def test_tiny_progress_lines(tmp_path, capsys):
    tiny.ensure_tiny(_micro_recipe(steps=10), tmp_path, progress=True, evaluate_built=tiny_heldout_accuracy)
    err = capsys.readouterr().err
    assert "step 10/10 loss" in err and "held-out greedy accuracy: arithmetic" in err


def test_tiny_build_records_the_evaluation_it_is_handed(tmp_path):
    """The build ends with the evaluation its caller hands in (the models layer cannot import unigrad.eval):
    called once with the trained model and the recipe, its numbers land in report.json; without one, or with
    eval_examples=0, nothing is evaluated and the report holds no accuracy."""
    calls = []

    def evaluation(model, tokenizer, recipe):
        calls.append((model.training, tokenizer.pad_token_id, recipe))
        return {"arithmetic": 0.25, "countdown": 0.5}

    recipe = _micro_recipe()
    report = tiny.build_tiny(recipe, tmp_path / "a", progress=False, evaluate_built=evaluation)
    assert calls == [(False, PAD_ID, recipe)]
    assert report["heldout_greedy_accuracy"] == {"arithmetic": 0.25, "countdown": 0.5}
    assert json.loads((tmp_path / "a" / "report.json").read_text())["heldout_greedy_accuracy"] == {
        "arithmetic": 0.25, "countdown": 0.5}
    tiny.build_tiny(recipe.replace(eval_examples=0), tmp_path / "c", progress=False, evaluate_built=evaluation)
    assert len(calls) == 1


@pytest.mark.parametrize("name", [tiny.TINY_NAME, tiny.TINY_MOE_NAME])
def test_a_build_load_model_and_tokenizer_starts_records_its_heldout_accuracy(tmp_path, name):
    """A build no caller hands an evaluation (load_model_and_tokenizer's, unigrad train's, unigrad eval's) ends with
    the one the package root registers, unigrad.eval.tiny_heldout_accuracy: report.json holds accuracy per task."""
    assert build_evaluation(tiny.TINY_NAME).__name__ == "tiny_heldout_accuracy"
    load_model_and_tokenizer(name, tiny_recipe=_micro_recipe(), cache_dir=tmp_path)
    (report_file,) = tmp_path.glob("models/unigrad-tiny-*/report.json")
    accuracy = json.loads(report_file.read_text())["heldout_greedy_accuracy"]
    assert set(accuracy) == {"arithmetic", "countdown"} and all(0.0 <= v <= 1.0 for v in accuracy.values())


def test_importing_unigrad_registers_the_build_evaluations_without_importing_them():
    """`import unigrad` wires unigrad.eval's build evaluations into the models layer, and stays fast: neither
    unigrad.eval nor torch is imported until a build calls one."""
    code = ("import sys, unigrad; from unigrad.models.build_evaluations import build_evaluation as b; "
            "print(b('unigrad-tiny').__name__, b('unigrad-chat').__name__, 'unigrad.eval' in sys.modules, "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["tiny_heldout_accuracy", "chat_heldout_report", "False", "False"]


def test_default_recipe_trains_on_default_mixture():
    from unigrad.tasks import DEFAULT_MIXTURE

    recipe = tiny.TinyRecipe()
    assert sorted(recipe.task_names) == sorted(DEFAULT_MIXTURE)
    params = sum(p.numel() for p in LlamaForCausalLM(tiny.tiny_config(recipe)).parameters())
    assert 1_000_000 <= params <= 5_000_000


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_rows_equal_separate_examples(attention):
    """Packing examples into one row (block-diagonal mask, positions from 0) changes no logit."""
    recipe = _micro_recipe(pack_length=64, batch_size=6)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny.tiny_config(recipe)).eval()
    model.set_attn_implementation(attention)
    batch = [
        (prompt_ids(p) + completion_ids(c), len(prompt_ids(p)))
        for p, c in [
            ("12+3", "15"),
            ("use 2 5 to make 10", "2*5"),
            ("9-4", "5"),
            ("a", "b"),
            ("x" * 30, "y" * 20),
            ("77+8", "85"),
        ]
    ]
    micro = list(pretrain.micro_batches(batch, recipe))
    assert sum(len(row) for row in pretrain.pack(batch, recipe.pack_length)) == len(batch)
    assert len(micro) == 1 and micro[0][0].shape[0] < len(batch)  # several examples share a row
    input_ids, mask, position_ids, labels = micro[0]
    with torch.no_grad():
        packed = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
        seen = 0
        for row in range(input_ids.shape[0]):
            starts = ((position_ids[row] == 0) & (input_ids[row] == BOS_ID)).nonzero().flatten().tolist()
            for k, start in enumerate(starts):
                ids = input_ids[row, start:]
                n = next(len(b[0]) for b in batch if b[0] == ids[: len(b[0])].tolist())
                assert position_ids[row, start : start + n].tolist() == list(range(n))
                alone = model(input_ids=ids[:n][None]).logits[0]
                torch.testing.assert_close(packed[row, start : start + n], alone, atol=1e-5, rtol=1e-5)
                n_prompt = next(b[1] for b in batch if b[0] == ids[:n].tolist())
                assert (labels[row, start : start + n_prompt] == -100).all()
                assert (labels[row, start + n_prompt : start + n] == ids[n_prompt:n]).all()
                seen += 1
                if k == len(starts) - 1:
                    assert (labels[row, start + n :] == -100).all()
    assert seen == len(batch)


def test_tiny_moe_builds_loads_and_its_bf16_router_creates_mismatch(tmp_path):
    """The MoE twin: a real Mixtral through the same build, cache and loading path; sampled in bfloat16
    against a float32 learner, its log-probs differ (the mismatch lab's premise)."""
    from unigrad.diagnostics.mismatch import mismatch_metrics
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.rollout.base import SamplingParams
    from unigrad.rollout.logprobs import sequence_logprobs
    from unigrad.rollout.transformers_engine import TransformersEngine
    from unigrad.train.learning.batching import encode_prompt

    recipe = _micro_recipe()
    model, tok = load_model_and_tokenizer("unigrad-tiny-moe", tiny_recipe=recipe, cache_dir=tmp_path)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 4
    dense_dir = tiny.tiny_cache_dir(recipe, tmp_path)
    assert not dense_dir.exists()  # the MoE has its own cache entry; the dense recipe was not built
    assert tiny.tiny_cache_dir(recipe.replace(**tiny.TINY_MOE_EXPERTS), tmp_path).is_dir()
    engine = TransformersEngine(model, tok.pad_token_id, tok.eos_token_id, dtype=torch.bfloat16)
    prompts = [encode_prompt(tok, p) for p in ("12+7", "use 3 4 5 to make 12")]
    ro = engine.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=8, seed=0))
    with torch.no_grad():
        train = sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                                  temperature=1.0)
    m = mismatch_metrics(train, ro.infer_logprobs, ro.completion_mask)
    assert m["mismatch/abs_logp_diff_max"] > 1e-4 and m["mismatch/kl_k3"] >= 0


def test_lora_learner_logprobs_follow_the_adapter(local_model_dir):
    """The learner's teacher-forced log-probs of a peft model are the adapted model's, with or without the shared
    prompt pass, and their gradient reaches the adapter (and nothing else)."""
    pytest.importorskip("peft", reason="LoRA needs peft (not yet a declared dependency)")
    model, tok = load_model_and_tokenizer(local_model_dir, lora=LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # away from the no-op init, so the adapter changes the logits
    prompt = prompt_ids("12+34")
    prompt_t = torch.tensor([prompt] * 3)
    from unigrad.rollout.logprobs import sequence_logprobs

    completion = torch.tensor([tok("46", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] * 3)
    completion[1, 1] = tok("7", add_special_tokens=False)["input_ids"][0]
    mask = torch.ones_like(completion, dtype=torch.bool)
    with torch.no_grad():
        full = model(input_ids=torch.cat([prompt_t, completion], 1)).logits.log_softmax(-1)
    expected = full[:, len(prompt) - 1 : -1].gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    grads = []
    for share in (True, False):
        model.zero_grad()
        got = sequence_logprobs(model, prompt_t, torch.ones_like(prompt_t, dtype=torch.bool), completion, mask,
                                share_prompts=share)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        got.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and all("lora_" in n for n in grads[0])
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)
