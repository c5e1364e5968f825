"""Build the embedded default model: a few-layer Qwen2 with random weights and a locally trained tokenizer.

It is saved with ``save_pretrained`` and loaded back through ``from_pretrained`` like any hub model, so
every code path the tests exercise is the one a real checkpoint takes. Builds are cached by a hash of
their settings and written atomically (safe when several ranks ask at once).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from selfbudget_pl.format import OutputFormat

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM_TOKEN + "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER_TOKEN + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT_TOKEN + "{{ message['content'] }}" + EOS_TOKEN +
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TOKEN + "{% endif %}"
)


@dataclass
class TinyModelSpec:
    """Every size of the tiny model. The defaults give about 1M parameters.

    ``vocab_size`` is what the tokenizer trainer aims for (the default corpus yields ~400 tokens); with
    ``pad_vocab`` the vocabulary is filled up to exactly ``vocab_size`` with entries the tokenizer never
    produces (``<unused_N>``), which gives a random-weight model a real checkpoint's vocabulary size
    (Qwen2.5: 151,936) without a corpus that large. ``rope_theta`` as in the checkpoint being imitated.
    """

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    pad_vocab: bool = False
    corpus_size: int = 4000
    seed: int = 0
    format_tags: list[str] = field(default_factory=lambda: OutputFormat().tags)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SELFBUDGET_CACHE", Path.home() / ".cache" / "selfbudget_pl")) / "tiny_models"


def ensure_tiny_model(spec: TinyModelSpec | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory of the tiny model for ``spec``, building it on first use."""
    spec = spec or TinyModelSpec()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"qwen2-tiny-{spec.fingerprint()}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        build_tiny_model(spec, staging)
        try:
            os.replace(staging, target)  # atomic; a concurrent builder that won the race is kept
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def math_corpus(size: int, seed: int = 0) -> Iterator[str]:
    """Math-flavoured text to train the tokenizer on: arithmetic, LaTeX and word problems."""
    rng = random.Random(seed)
    words = (
        "the of and is a to in we find so total each how many what number sum product answer "
        "therefore let then has are there more than less times divide half twice per cost"
    ).split()
    latex = ["\\frac{", "\\sqrt{", "\\boxed{", "\\cdot", "\\pi", "^2", "\\left(", "\\right)", "x", "y", "n"]
    for _ in range(size):
        operands = [rng.randint(0, 99) for _ in range(rng.randint(2, 6))]
        steps, total = [], operands[0]
        for value in operands[1:]:
            steps.append(f"{total}+{value}={total + value};")
            total += value
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        formula = "".join(rng.choice(latex) + str(rng.randint(0, 9)) for _ in range(rng.randint(1, 4)))
        yield f"{sentence} {'+'.join(map(str, operands))} {''.join(steps)} ${formula}$ \\boxed{{{total}}}"


def build_tiny_model(spec: TinyModelSpec, out_dir: str | os.PathLike, corpus: Iterable[str] | None = None) -> Path:
    """Train the tokenizer, build the random-weight Qwen2 model and ``save_pretrained`` both to ``out_dir``."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(spec, corpus),
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN, *spec.format_tags],
        model_max_length=spec.max_position_embeddings,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_theta=spec.rope_theta,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tiny_model_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out_dir


def _train_tokenizer(spec: TinyModelSpec, corpus: Iterable[str] | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Digits stay single tokens (as in Qwen2), so arithmetic is learnable digit by digit.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = [PAD_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN, *spec.format_tags]
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus or math_corpus(spec.corpus_size, spec.seed), trainer=trainer)
    if spec.pad_vocab:
        tokenizer = _pad_vocabulary(tokenizer, spec.vocab_size)
    return tokenizer


def _pad_vocabulary(tokenizer, size: int):
    """``tokenizer`` with never-produced ``<unused_N>`` entries appended until it has ``size`` ids (no
    merge builds them, so encoding is unchanged; they decode as their own text)."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    specials = {entry["content"] for entry in state["added_tokens"]}
    count, index = len(vocab) + len(specials - vocab.keys()), 0
    while count < size:
        name = f"<unused_{index}>"
        index += 1
        if name not in vocab and name not in specials:
            vocab[name] = count
            count += 1
    return Tokenizer.from_str(json.dumps(state))
