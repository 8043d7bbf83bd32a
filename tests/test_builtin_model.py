"""The built-in model is made offline, the same bytes every time, and loads in transformers."""

from __future__ import annotations

import hashlib
import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from meshserve.common.tokenizer import ModelTokenizer
from meshserve.worker.builtin_model import builtin_model_dir, ensure_builtin_model, write_builtin_model


def digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_built_twice_gives_identical_files(tmp_path, model_dir):
    write_builtin_model(tmp_path / "again")
    assert digest(tmp_path / "again") == digest(model_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(digest(model_dir))


def test_ensure_reuses_the_cached_model(cache_dir, model_dir):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_builtin_model(cache_dir) == model_dir == builtin_model_dir(cache_dir)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_is_a_small_llama_with_grouped_query_attention(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_attention_heads"] == 2 * config["num_key_value_heads"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    assert model.config.vocab_size == ModelTokenizer.from_dir(model_dir).vocab_size


def test_our_tokenizer_matches_transformers(model_dir):
    ours = ModelTokenizer.from_dir(model_dir)
    theirs = AutoTokenizer.from_pretrained(model_dir)
    for text in ["Hello world", "Unicode: café 東京 🙂", "  leading spaces\nand lines", "<|user|> literal"]:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text).input_ids, skip_special_tokens=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(messages) == expected
    assert ours.encode_chat(messages) == theirs(expected, add_special_tokens=False).input_ids
