"""The built-in tiny model: a small Llama with random weights and a locally trained byte-level BPE tokenizer.

It is made offline and deterministically (fixed seeds, a corpus generated here), saved in
Hugging Face format, and is the default model of `meshserve up` and of the tests. Its output
is noise; it exists so that every code path (tokeniser, chat template, paged attention, GQA)
runs for real without downloading anything.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from meshserve.common.config import cache_dir as meshserve_cache_dir

BUILTIN_MODEL_NAME = "meshserve-tiny"
# Bump when anything below changes what is written, so old caches are not reused.
BUILTIN_MODEL_VERSION = 2

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BOS, EOS, PAD, END_OF_TURN = "<s>", "</s>", "<pad>", "<|end|>"
# Tools (OpenAI's shape) are listed in a system turn first; an assistant's calls and a tool's results are
# written in the Hermes convention (<tool_call>JSON</tool_call>, <tool_response>), which the gateway reads
# back (gateway/tools.py). Without tools the rendering is the plain one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\n"
    "You may call these tools. To call one, answer with "
    '<tool_call>{"name": NAME, "arguments": ARGUMENTS}</tool_call> and nothing else.\n'
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|end|>\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'tool' %}<tool_response id={{ message['tool_call_id'] | tojson }}>"
    "{{ message['content'] }}</tool_response>{% else %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>"
    "{\"name\": {{ call['function']['name'] | tojson }}, \"arguments\": {{ call['function']['arguments'] }}}"
    "</tool_call>{% endfor %}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Upper bound on the BPE vocabulary; the model's vocabulary is what training actually produced,
# so the model can never emit an id the tokenizer cannot decode.
MAX_VOCAB_SIZE = 4096

_WORDS = (
    "the a an of to in and or but not is are was were be been being have has had do does did "
    "will would can could shall should may might must it its this that these those there here "
    "I you he she we they me him her us them my your his our their what which who whom whose "
    "when where why how all any both each few more most other some such no nor only own same so "
    "than too very just now then once again also still ever never always often sometimes "
    "model token tokens request requests stream streams server servers worker workers router "
    "gateway mesh cache block blocks batch batches queue queues priority latency throughput "
    "kernel kernels attention layer layers head heads prompt prompts answer answers question "
    "sample samples seed seeds text word words sentence sentences paragraph story stories "
    "time day night morning evening year years world city river mountain forest sea sky sun "
    "moon star stars light dark water fire earth wind rain snow tree trees flower flowers "
    "house door window road bridge garden field book books letter letters number numbers "
    "people person child children friend friends teacher student king queen cat dog bird fish "
    "good new first last long great little small big old young high low right left early late "
    "important different large next public bad same able free full strong clear fast slow "
    "go goes went make makes made take takes took see sees saw know knows knew think thinks "
    "come comes came give gives gave find finds found tell tells told ask asks asked work "
    "works worked seem seems feel feels try tries leave leaves call calls run runs ran read "
    "reads write writes wrote send sends sent wait waits start starts stop stops open opens "
    "close closes learn learns grow grows carry carries begin begins keep keeps hold holds"
).split()
_PUNCT = [".", ".", ".", "!", "?", ",", ";", ":"]
_FIXED_TEXT = """\
meshserve serves large language models as a mesh of small services. A gateway takes requests,
a router picks a worker for each one, workers run batched inference, and an aggregator merges
the streams of requests that fan out. Tokens stream back to the caller as soon as they exist.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Once upon a time, in a city by the sea, there lived a small robot who wanted to learn to write.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 3.14 2026. Symbols: + - * / = ( ) [ ] { } # @ & %.
def add(a, b):
    return a + b
Unicode: café, naïve, über, São Paulo, Zürich, 東京, 北京, Ελλάδα, Москва, 🙂 🚀 ✓.
"""


def builtin_model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or meshserve_cache_dir()) / "models" / f"{BUILTIN_MODEL_NAME}-v{BUILTIN_MODEL_VERSION}"


def ensure_builtin_model(cache_dir: Path | None = None) -> Path:
    """Returns the built-in model's directory, creating it first if it is not there yet.

    Safe to call from several processes at once: each builds into a private temporary
    directory and renames it into place; the loser of the race discards its copy.
    """
    target = builtin_model_dir(cache_dir)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_builtin_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def training_corpus(n_sentences: int = 6000, seed: int = 0) -> list[str]:
    """A fixed, generated English-like corpus: enough variety for a few thousand BPE merges."""
    rng = random.Random(seed)
    lines = _FIXED_TEXT.splitlines()
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(_PUNCT))
    return lines


def write_builtin_model(out_dir: Path) -> None:
    """Writes the tokenizer and the model into out_dir. Same bytes every time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out_dir)
    _write_model(out_dir)


def _write_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")


def _write_model(out_dir: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()

    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    bos, eos, pad, end = (tokenizer.token_to_id(t) for t in (BOS, EOS, PAD, END_OF_TURN))
    # Grouped-query attention (8 query heads over 4 KV heads) so the engine's GQA path is exercised.
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=[eos, end],
        pad_token_id=pad,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=[eos, end], pad_token_id=pad, do_sample=False
    )
    model.save_pretrained(out_dir)
