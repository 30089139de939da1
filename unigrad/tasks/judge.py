"""An LLM as the judge: a reward function (TRL's convention, `unigrad.tasks.reward_fn`) that asks any
OpenAI-compatible chat model whether each completion is right.

    from unigrad.tasks.judge import llm_judge
    reward = llm_judge("http://127.0.0.1:8000/v1", "judge", template="...{prompt}...{completion}...{answer}...")
    task = get_task("word_problems", reward=reward)

From a config, name the function that reads its settings from the environment:

    unigrad train reward=unigrad.tasks.judge:from_env       # with these variables set:

    UNIGRAD_JUDGE_URL          the judge's base URL ("http://host:port/v1"); required
    UNIGRAD_JUDGE_MODEL        the judge's model name; required
    UNIGRAD_JUDGE_TEMPLATE     the prompt template, or "@path" to read it from a file (default: DEFAULT_TEMPLATE)
    UNIGRAD_JUDGE_API_KEY_VAR  the name of the variable holding the API key (default UNIGRAD_JUDGE_API_KEY); a key
                               that is not set is sent as "none" (local servers ignore it)
    UNIGRAD_JUDGE_TIMEOUT      seconds per request (default 60)

The template is filled with `str.format`: {prompt}, {completion} and {answer} (the example's reference answer, "" where
it has none); other fields are refused when the judge is made, and literal braces are written {{ and }}. Each
completion is one chat request: the filled template as the user's message, temperature 0, `max_tokens` (16), n=1,
up to `concurrency` (8) requests at once.

The reply is read as a verdict: a first word "yes" or "no" (any case, punctuation ignored) is 1 or 0; otherwise the
first number in the reply (a decimal, or a fraction such as 3/4), which must lie in [0, 1]. A reply that is neither, a
number outside [0, 1], a request that fails or times out: that completion's reward is NaN (unscorable; the trainer
skips it), its reason in `judge.last_reasons` (one entry per completion of the last call, None where it was read)
and counted in a logged warning.
"""

from __future__ import annotations

import logging
import math
import os
import re
import string
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "Grade an answer to a question.\n\nQuestion: {prompt}\n\nReference answer: {answer}\n\nAnswer to grade: "
    "{completion}\n\nDoes the answer to grade reach the reference answer? Reply with yes or no.")
FIELDS = ("prompt", "completion", "answer")
API_KEY_VAR = "UNIGRAD_JUDGE_API_KEY"
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SCORE = re.compile(rf"({_NUMBER})(?:\s*/\s*({_NUMBER}))?")
_VERDICTS = {"yes": 1.0, "no": 0.0}


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and how it is asked (module docstring)."""

    base_url: str
    model: str
    template: str = DEFAULT_TEMPLATE
    api_key_env: str = API_KEY_VAR  # the environment variable holding the API key
    timeout: float = 60.0  # seconds per request
    max_tokens: int = 16
    concurrency: int = 8  # requests in flight at once
    max_retries: int = 1  # the openai client's own retries of a failed request

    def __post_init__(self) -> None:
        check_template(self.template)
        if not self.base_url or not self.model:
            raise ValueError("an LLM judge needs a base URL and a model name")
        if self.timeout <= 0 or self.max_tokens < 1 or self.concurrency < 1 or self.max_retries < 0:
            raise ValueError(f"LLM judge: timeout > 0, max_tokens >= 1, concurrency >= 1 and max_retries >= 0, "
                             f"got {self.timeout}, {self.max_tokens}, {self.concurrency}, {self.max_retries}")


def check_template(template: str) -> None:
    """A ValueError unless `template` is a format string whose fields are among FIELDS."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"LLM judge template: {err} (write literal braces as {{{{ and }}}})") from None
    unknown = sorted({name for name in names if name not in FIELDS})
    if unknown:
        raise ValueError(f"LLM judge template: unknown field(s) {', '.join(repr(n) for n in unknown)}; it may use "
                         f"{{prompt}}, {{completion}} and {{answer}} (write literal braces as {{{{ and }}}})")


def read_verdict(reply: str | None) -> tuple[float, str | None]:
    """(score in [0, 1], None) from a judge's reply, or (NaN, why it cannot be read)."""
    text = (reply or "").strip()
    if not text:
        return math.nan, "empty reply"
    first = re.sub(r"[^a-z]", "", text.split()[0].lower())
    if first in _VERDICTS:
        return _VERDICTS[first], None
    found = _SCORE.search(text)
    if found is None:
        return math.nan, f"no yes/no or number in the reply {text[:80]!r}"
    value = float(found.group(1))
    if found.group(2) is not None:
        value = value / float(found.group(2)) if float(found.group(2)) != 0 else math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        return math.nan, f"score {found.group(0)!r} is not in [0, 1] (reply {text[:80]!r})"
    return value, None


class LLMJudge:
    """A reward function `(prompts, completions, answer=..., **kwargs) -> list[float]` scored by a judge model."""

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.last_reasons: list[str | None] = []
        self._client = None
        self.__name__ = self.__qualname__ = f"llm_judge[{settings.model}]"  # names it in the trainer's messages

    def client(self):
        if self._client is None:
            import openai

            key = os.environ.get(self.settings.api_key_env) or "none"
            self._client = openai.OpenAI(base_url=self.settings.base_url, api_key=key,
                                         timeout=self.settings.timeout, max_retries=self.settings.max_retries)
        return self._client

    def request(self, prompt: str, completion: str, answer: str | None) -> dict:
        """The chat request for one completion (the keyword arguments of `chat.completions.create`)."""
        content = self.settings.template.format(prompt=prompt, completion=completion,
                                                answer="" if answer is None else answer)
        return {"model": self.settings.model, "messages": [{"role": "user", "content": content}],
                "temperature": 0.0, "max_tokens": self.settings.max_tokens, "n": 1}

    def judge(self, prompt: str, completion: str, answer: str | None) -> tuple[float, str | None]:
        """One completion's (score, None) or (NaN, why)."""
        import openai

        try:
            reply = self.client().chat.completions.create(**self.request(prompt, completion, answer))
        except openai.APITimeoutError:
            return math.nan, f"the judge took longer than {self.settings.timeout:g} s"
        except openai.APIError as err:
            return math.nan, f"the judge's request failed: {type(err).__name__}: {str(err)[:200]}"
        if not reply.choices:
            return math.nan, "the judge sent no choice"
        return read_verdict(reply.choices[0].message.content)

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        answers = kwargs.get("answer") or [None] * len(completions)
        if not completions:
            return []
        workers = min(self.settings.concurrency, len(completions))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="unigrad-judge") as pool:
            judged = list(pool.map(self.judge, prompts, completions, answers))
        self.last_reasons = [reason for _, reason in judged]
        reasons = Counter(r for r in self.last_reasons if r is not None)
        if reasons:
            log.warning("LLM judge %s: %d of %d completions unscored (NaN): %s", self.settings.model,
                        sum(reasons.values()), len(completions),
                        "; ".join(f"{r[:120]} (x{k})" for r, k in reasons.most_common(3)))
        return [score for score, _ in judged]


def llm_judge(base_url: str, model: str, template: str = DEFAULT_TEMPLATE, **options) -> LLMJudge:
    """A reward function asking `model` at `base_url`; `options`: the other `JudgeSettings` fields."""
    return LLMJudge(JudgeSettings(base_url, model, template, **options))


def settings_from_env(environ=None) -> JudgeSettings:
    """The `JudgeSettings` the UNIGRAD_JUDGE_* variables give (module docstring); a ValueError naming what is
    missing or wrong."""
    env = os.environ if environ is None else environ
    missing = [name for name in ("UNIGRAD_JUDGE_URL", "UNIGRAD_JUDGE_MODEL") if not env.get(name)]
    if missing:
        raise ValueError(f"reward=unigrad.tasks.judge:from_env needs {' and '.join(missing)} set (the judge's base "
                         "URL and model name); see unigrad/tasks/judge.py")
    template = env.get("UNIGRAD_JUDGE_TEMPLATE") or DEFAULT_TEMPLATE
    if template.startswith("@"):
        template = Path(template[1:]).read_text()
    try:
        timeout = float(env.get("UNIGRAD_JUDGE_TIMEOUT") or 60.0)
    except ValueError:
        raise ValueError(f"UNIGRAD_JUDGE_TIMEOUT={env['UNIGRAD_JUDGE_TIMEOUT']!r} is not a number of seconds") from None
    return JudgeSettings(env["UNIGRAD_JUDGE_URL"], env["UNIGRAD_JUDGE_MODEL"], template,
                         api_key_env=env.get("UNIGRAD_JUDGE_API_KEY_VAR") or API_KEY_VAR, timeout=timeout)


@lru_cache(maxsize=8)
def _judge_of(settings: JudgeSettings) -> LLMJudge:
    return LLMJudge(settings)


def judge_from_env() -> LLMJudge:
    """The judge the environment's UNIGRAD_JUDGE_* variables describe (one per distinct setting, reused)."""
    return _judge_of(settings_from_env())


def from_env(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The reward function to name in a config (`reward=unigrad.tasks.judge:from_env`): `judge_from_env()`'s scores."""
    return judge_from_env()(prompts, completions, **kwargs)
