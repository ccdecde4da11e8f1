"""Build the embedded demo: a small trained Llama base and trained LoRA adapters.

Nothing is downloaded. A byte-level BPE tokenizer is trained on a templated
corpus, a tiny LlamaForCausalLM is trained on generic question/answer text,
and each adapter is trained on its own domain's answers, so the same prompt
gives recognisably legal, medical or support text depending on the adapter.
The base is an ordinary HF directory; the adapters are registered (hashed,
smoke-tested, promoted) into a registry store (registry/store.py):

    OUT/base/                 config.json, model.safetensors, tokenizer.json, ...
    OUT/adapters/NAME/1/      adapter_config.json, adapter_model.safetensors, metadata.json
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loraserve.runner import determinism

Progress = Callable[[str, int, int], None]
"""(stage, done, total): called as each stage starts (done 0) and after each of its steps."""


def _quiet(stage: str, done: int, total: int) -> None:
    pass

QUESTIONS = [
    "What should I do next?", "Can you help me with this?", "What happens now?",
    "Please explain the situation.", "What is the answer?", "Tell me more.",
    "How does this work?", "What do you recommend?", "Is this normal?",
    "Why did this happen?", "What are my options?", "Summarize this for me.",
]

DOMAINS: dict[str, dict[str, list[str]]] = {
    "base": {
        "subject": ["The weather", "The garden", "The old town", "A small dog", "The river", "Our team"],
        "verb": ["looks", "seems", "stays", "feels", "becomes"],
        "rest": ["calm and bright today.", "quiet in the evening.", "pleasant this season.",
                 "better than before.", "simple and clear."],
    },
    "legal": {
        "subject": ["The lessee", "The contracting party", "The court", "The licensor", "The defendant"],
        "verb": ["shall indemnify", "must comply with", "hereby waives", "may terminate", "is bound by"],
        "rest": ["the agreement pursuant to section 4.", "all obligations under clause 12.",
                 "the statute of limitations.", "the terms herein without notice.",
                 "the jurisdiction of this contract."],
    },
    "medical": {
        "subject": ["The patient", "The clinician", "The nurse", "The cardiologist", "The treatment plan"],
        "verb": ["presents with", "recommends", "monitors", "reports", "prescribes"],
        "rest": ["acute fever and mild dehydration.", "a daily dose of ibuprofen.",
                 "blood pressure every four hours.", "symptoms of chronic fatigue.",
                 "rest, fluids and a follow-up visit."],
    },
    "support": {
        "subject": ["Thank you for contacting support,", "Our support team", "Your ticket", "A technician",
                    "We apologize,"],
        "verb": ["please restart", "will escalate", "has reset", "can replace", "recommends updating"],
        "rest": ["your router and try again.", "the issue within one business day.",
                 "your account password.", "the device under warranty.", "the app to the latest version."],
    },
}

DEFAULT_ADAPTERS = ("legal", "medical", "support")
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Answer: {{ m['content'] }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}")
"""The demo's chat template renders messages in the question/answer form it was trained on, so a
chat with one user message is the demo's own prompt ("Question: ...\nAnswer:")."""
ALIASES = {"legal": ["law"], "medical": ["clinic"], "support": ["helpdesk"]}


@dataclass(frozen=True)
class DemoSpec:
    """Sizes and training lengths; the defaults finish in well under a minute on 2 cores."""

    adapters: tuple[str, ...] = DEFAULT_ADAPTERS
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    vocab_size: int = 600
    base_steps: int = 150
    adapter_steps: int = 100
    lora_rank: int = 8
    batch_size: int = 16
    seed: int = 1234
    threads: int = 2
    """Intra-op threads while building, whatever the machine has: how a reduction is split
    between threads can change its float result."""
    targets: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def _answer(domain: str, rng: random.Random) -> str:
    d = DOMAINS[domain]
    return " ".join(rng.choice(d[k]) for k in ("subject", "verb", "rest"))


def _sample(domain: str, rng: random.Random) -> str:
    # Two sentences make answers long enough to show the adapter's style.
    return f"Question: {rng.choice(QUESTIONS)}\nAnswer: {_answer(domain, rng)} {_answer(domain, rng)}"


def train_tokenizer(spec: DemoSpec, out: Path):
    """The demo's BPE tokenizer, trained on its domains' text and saved in OUT (as HF files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(spec.seed)
    corpus = [_sample(d, rng) for d in DOMAINS for _ in range(200)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _batches(tokenizer, domain: str, spec: DemoSpec, steps: int, rng: random.Random):
    for _ in range(steps):
        texts = [_sample(domain, rng) + tokenizer.eos_token for _ in range(spec.batch_size)]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        yield enc.input_ids, enc.attention_mask, labels


def _train(model, params, batches, lr: float, on_step: Callable[[int], None] = lambda step: None) -> float:
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for step, (input_ids, mask, labels) in enumerate(batches, 1):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        on_step(step)
    model.eval()
    return float(loss.detach())


@contextlib.contextmanager
def _reproducible(spec: DemoSpec):
    """A seed, a fixed thread count and torch's deterministic algorithms for the build, and the
    caller's settings back afterwards. The same software on the same kind of CPU then builds
    the same bytes; another BLAS or instruction set may still round differently, so tests check
    what the demo learned (its domains' words), never its exact sentences. The deterministic
    switch is process-wide and shared with --deterministic engines, so the build holds it
    through runner/determinism.py rather than flipping it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    try:
        with determinism.held():
            yield
    finally:
        torch.set_num_threads(threads)


def build_demo(out: Path, spec: DemoSpec = DemoSpec(), progress: Progress = _quiet) -> dict:
    """Write the demo base model and adapters under OUT; returns a summary."""
    with _reproducible(spec):
        return _build(out, spec, progress)


def _build(out: Path, spec: DemoSpec, progress: Progress) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraserve.registry.identity import base_identity
    from loraserve.registry.store import Store
    from loraserve.runner.smoke import SmokeTester

    started = time.perf_counter()
    rng = random.Random(spec.seed)
    base_dir, raw_dir = out / "base", out / "raw-adapters"
    base_dir.mkdir(parents=True, exist_ok=True)
    progress("tokenizer", 0, 1)
    tokenizer = train_tokenizer(spec, base_dir)
    progress("tokenizer", 1, 1)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    progress("base model", 0, spec.base_steps)
    base_loss = _train(model, model.parameters(), _batches(tokenizer, "base", spec, spec.base_steps, rng), 3e-3,
                       lambda step: progress("base model", step, spec.base_steps))
    model.save_pretrained(base_dir)

    losses = {}
    for name in spec.adapters:
        lora = LoraConfig(r=spec.lora_rank, lora_alpha=2 * spec.lora_rank, target_modules=list(spec.targets),
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora, adapter_name=name)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        stage = f"adapter {name}"
        progress(stage, 0, spec.adapter_steps)
        losses[name] = _train(peft_model, trainable, _batches(tokenizer, name, spec, spec.adapter_steps, rng), 1e-2,
                              lambda step, stage=stage: progress(stage, step, spec.adapter_steps))
        # save_pretrained puts a named adapter in a subfolder of its own name.
        peft_model.save_pretrained(raw_dir, selected_adapters=[name])
        model = peft_model.unload()

    store = Store.local(out / "adapters")
    store.root.mkdir(parents=True, exist_ok=True)
    progress("register (smoke test)", 0, len(spec.adapters))
    identity, tester = base_identity(base_dir), SmokeTester(base_dir)
    for i, name in enumerate(spec.adapters, 1):
        passport = store.register(
            raw_dir / name, name, identity, tester, task=name, client="demo", language="en",
            description=f"demo {name} adapter trained on templated {name} answers", aliases=ALIASES.get(name, []))
        store.promote(name, passport.version)
        progress("register (smoke test)", i, len(spec.adapters))
    shutil.rmtree(raw_dir, ignore_errors=True)
    return {"base": str(base_dir), "adapters": str(store.root), "base_loss": base_loss, "adapter_losses": losses,
            "seconds": time.perf_counter() - started}
