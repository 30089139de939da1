"""Load a causal LM and its tokenizer: the embedded ``unigrad-tiny``, a local directory, or a hub id.

``load_model_and_tokenizer`` returns a model ready for the learner and the rollout engine and a tokenizer that
always has a pad token (its eos token if it had none) and a chat template (``DEFAULT_CHAT_TEMPLATE`` if it had
none). With ``lora`` the model is wrapped by peft so that only the adapter's parameters are trainable;
``save_model`` writes plain HF format, merging the adapter into the weights first.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from unigrad.models.chat_model import CHAT_NAME, ChatRecipe, ensure_chat
from unigrad.models.tiny import TINY_MOE_EXPERTS, TINY_MOE_NAME, TINY_NAME, TinyRecipe, ensure_tiny

# Used for tokenizers that come without a chat template: plain "role: content" lines, after the bos token
# (if the tokenizer has one); an assistant turn ends with the eos token; the generation prompt is "assistant: ".
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter (peft): rank ``r``, scaling ``alpha / r``, ``dropout`` on the adapter's input.

    ``target_modules``: module-name suffixes to adapt (Llama / Qwen names by default), or ``"all-linear"``.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")


class ModelNotFoundError(OSError):
    """A model name that is neither ``unigrad-tiny``, nor a local directory, nor loadable from a hub."""


class CorruptModelError(ValueError):
    """A local model's weights file that is truncated or otherwise not a whole safetensors file."""


def check_safetensors(directory: str | os.PathLike) -> None:
    """Raise ``CorruptModelError`` naming the first ``*.safetensors`` file in ``directory`` whose size is not what its
    header says (a copy or a save that was cut off), or whose header cannot be read."""
    import json

    for path in sorted(Path(directory).glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if size < 8 or length > size - 8:
                    raise ValueError("its header runs past the end of the file")
                header = json.loads(f.read(length))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
            expected = 8 + length + max(ends, default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise CorruptModelError(f"{path} is truncated or corrupt (unreadable header: {err}): copy the model "
                                    "again, or rerun what wrote it") from None
        if size != expected:
            raise CorruptModelError(f"{path} is truncated or corrupt: its header says {expected} bytes, the file has "
                                    f"{size} (a copy or a save was cut off): copy the model again, or rerun what "
                                    "wrote it")


def local_model_dir(name: str) -> str:
    """Where a local model is: a model directory itself, a finished run directory's final/; a name that is not a
    directory is returned as it is (a hub id). ModelNotFoundError for a directory that holds no model."""
    path = Path(name)
    if not path.is_dir() or (path / "config.json").is_file():
        return name
    if (path / "config.yaml").is_file() and (path / "final" / "config.json").is_file():  # a finished run
        return str(path / "final")
    hint = ("it is a run directory without final/ (the run has not finished: continue it with --resume)"
            if (path / "config.yaml").is_file() else "give a model directory in HF format, a run "
            f"directory with final/, or {TINY_NAME!r}")
    raise ModelNotFoundError(f"{name} holds no model (no config.json there): {hint}")


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike = TINY_NAME,
    dtype: torch.dtype | str = torch.float32,
    lora: LoraSettings | None = None,
    device: str | torch.device = "cpu",
    *,
    tiny_recipe: TinyRecipe | ChatRecipe | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """(model, tokenizer) for ``name_or_path``.

    - ``"unigrad-tiny"``: the embedded default, built on first use (a few minutes on a laptop CPU) and cached
      (see ``unigrad.models.tiny``; ``tiny_recipe`` and ``cache_dir`` select another recipe or cache root).
    - ``"unigrad-tiny-moe"``: the same recipe as a Mixtral mixture of experts (4 experts, 2 per token), whose
      router can pick different experts in a bfloat16 rollout than in the float32 learner.
    - ``"unigrad-chat"``: the second embedded model, a small Qwen2 with a byte-level BPE tokenizer and a chat
      template with tools (see ``unigrad.models.chat_model``), built on first use and cached the same way;
      ``tiny_recipe`` is then a ``ChatRecipe``.
    - a local directory in HF format: ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``; a finished
      run directory loads its final/.
    - anything else is treated as a model hub id; where no hub is reachable and the model is not in the local
      HF cache this raises ``ModelNotFoundError`` saying so.

    The model is returned in train mode, on ``device``, in ``dtype``.
    """
    model, tokenizer = _from_pretrained(_model_source(os.fspath(name_or_path), tiny_recipe, cache_dir),
                                        os.fspath(name_or_path), _dtype(dtype))
    _complete_tokenizer(tokenizer)
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    if lora is not None:
        model = apply_lora(model, lora)
    model.train()
    return model, tokenizer


def _model_source(name: str, tiny_recipe: TinyRecipe | ChatRecipe | None, cache_dir: str | os.PathLike | None
                  ) -> str:
    """Where `name` loads from: an embedded model's cached directory (built on first use), a local model
    directory (a finished run's final/), or `name` itself as a model hub id."""
    if name == CHAT_NAME and not Path(name).exists():
        if tiny_recipe is not None and not isinstance(tiny_recipe, ChatRecipe):
            raise TypeError(f"{CHAT_NAME} is built from a ChatRecipe, got {type(tiny_recipe).__name__}")
        return str(ensure_chat(tiny_recipe, cache_dir))
    if isinstance(tiny_recipe, ChatRecipe):
        raise TypeError(f"a ChatRecipe builds {CHAT_NAME}, not {name!r}")
    if name == TINY_NAME and not Path(name).exists():
        return str(ensure_tiny(tiny_recipe, cache_dir))
    if name == TINY_MOE_NAME and not Path(name).exists():
        return str(ensure_tiny((tiny_recipe or TinyRecipe()).replace(**TINY_MOE_EXPERTS), cache_dir))
    return local_model_dir(name)


def _from_pretrained(source: str, name: str, dtype: torch.dtype):
    """(model, tokenizer) from `source` through transformers' Auto classes; `ModelNotFoundError` naming `name` and
    the reason when `source` is no local directory and cannot be had from the hub or the local HF cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(source).is_dir()
    if local:
        check_safetensors(source)
    # Offline (HF_HUB_OFFLINE=1), or no hub reachable: only the local HF cache is tried, so a missing model fails
    # at once instead of after transformers' retries (about 50 s).
    offline = not local and (_hub_offline() or not _hub_reachable(source))
    options = {"local_files_only": True} if offline else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options), tokenizer
    except OSError as e:
        if local:
            raise
        where = ("the hub is switched off (HF_HUB_OFFLINE)" if _hub_offline() else
                 "no model hub is reachable from here (set HF_HUB_OFFLINE=1 to skip the check)" if offline else
                 "the id may not exist")
        raise ModelNotFoundError(
            f"could not load model {name!r}: it is not a local directory, loading it as a model hub id failed "
            f"({where}) and it is not in the local HF cache. Pass a local directory in HF format, or "
            f"{TINY_NAME!r} for the embedded default ({CHAT_NAME!r}: the embedded chat model). "
            f"Cause: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e


def apply_lora(model, lora: LoraSettings):
    """``model`` wrapped in a peft LoRA adapter: only the adapter's parameters require grad."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def save_model(model, tokenizer, path: str | os.PathLike) -> Path:
    """Write ``model`` and ``tokenizer`` to ``path`` in HF format (LoRA merged into a copy of the weights)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency of this module's LoRA path only
        return False
    return isinstance(model, PeftModel)


def _hub_reachable(model_id: str, timeout: float = 5.0) -> bool:
    """Whether the model hub answers a question about `model_id` within `timeout` seconds (any HTTP answer counts,
    a missing id included: transformers then reports it). False on a connection error or a timeout."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover
        return True
    try:
        HfApi().model_info(model_id, timeout=timeout)
    except HfHubHTTPError:
        return True
    except Exception:  # noqa: BLE001 - connection refused, name resolution, timeouts: the transports' own types
        return False
    return True


def _hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _complete_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    value = getattr(torch, aliases.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value
