"""The tiny model is a real transformers checkpoint: it saves, reloads and generates."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfbudget_pl.format import OutputFormat
from selfbudget_pl.models import ModelLoader, export_pretrained, export_streamed
from selfbudget_pl.tiny_model import TinyModelSpec, ensure_tiny_model
from selfbudget_pl.weights import iter_full_weights


def test_tiny_model_round_trips_and_generates(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 2e6, n_params
    assert model.config.model_type == "qwen2"

    # Budget tags are single special tokens; digits are single tokens.
    for tag in OutputFormat().tags:
        assert len(tokenizer(tag, add_special_tokens=False).input_ids) == 1
    assert len(tokenizer("1234", add_special_tokens=False).input_ids) == 4
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+3"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        logits = model(ids).logits
    assert out.shape[1] <= ids.shape[1] + 6

    export_pretrained(model, tokenizer, tmp_path / "copy")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "copy").get_vocab() == tokenizer.get_vocab()


def test_tiny_model_is_cached_and_sized_by_spec(tmp_path):
    spec = TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=300, corpus_size=200)
    first = ensure_tiny_model(spec, tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert ensure_tiny_model(spec, tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp  # not rebuilt
    config = json.loads((first / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (32, 2, 1)
    assert ensure_tiny_model(TinyModelSpec(**{**spec.__dict__, "seed": 1}), tmp_path) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".building-")]


def test_lora_trains_only_adapters_and_merges_on_export(tmp_path, tiny_model_dir):
    loader = ModelLoader(name_or_path=str(tiny_model_dir), lora={"enabled": True, "r": 4, "alpha": 8})
    model = loader.load_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)  # make the adapter change the output
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids).logits
    export_pretrained(model, loader.load_tokenizer(), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)


def test_padded_vocabulary_reaches_the_spec_size_and_encodes_as_before(tmp_path, tiny_model_dir):
    # model=qwen2.5_0.5b_shape pads to 151,936 this way; a small size keeps the test fast.
    spec = TinyModelSpec(vocab_size=700, pad_vocab=True, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, rope_theta=1e6)
    path = ensure_tiny_model(spec, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"] == 700
    assert config["rope_parameters"]["rope_theta"] == 1e6
    assert sorted(tokenizer.get_vocab().values()) == list(range(700))
    unpadded = AutoTokenizer.from_pretrained(tiny_model_dir)  # the same corpus and trainer, not padded
    text = "the sum of 12+30 is \\boxed{42}<|endoftext|>"
    assert tokenizer.encode(text) == unpadded.encode(text)  # the added entries are never produced
    assert tokenizer.decode([699]).startswith("<unused_")


def test_streamed_export_of_a_lora_model_equals_the_merged_save_pretrained(tmp_path, tiny_model_dir):
    loader = ModelLoader(name_or_path=str(tiny_model_dir), lora={"enabled": True, "r": 4, "alpha": 8})
    model = loader.load_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    tokenizer = loader.load_tokenizer()
    export_pretrained(model, tokenizer, tmp_path / "merged")
    # A shard limit below one layer's weights: several files and an index.
    export_streamed(iter_full_weights(model, "", merge_lora=True), model, tokenizer, tmp_path / "streamed",
                    max_shard_bytes=64 * 1024)
    assert (tmp_path / "streamed" / "model.safetensors.index.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    assert merged.keys() == streamed.keys()
    assert all(torch.equal(merged[key], streamed[key]) for key in merged)
    assert AutoTokenizer.from_pretrained(tmp_path / "streamed").get_vocab() == tokenizer.get_vocab()


def test_empty_model_matches_the_loaded_one_without_storage(tiny_model_dir):
    loader = ModelLoader(name_or_path=str(tiny_model_dir), lora={"enabled": True, "r": 4, "alpha": 8},
                         gradient_checkpointing=True)
    loaded, empty = loader.load_model(), loader.build_empty_model()
    assert all(tensor.is_meta for tensor in empty.state_dict().values())
    shapes = lambda model: {k: (v.shape, v.dtype, v.requires_grad) for k, v in model.named_parameters()}  # noqa: E731
    assert shapes(empty) == shapes(loaded)
    assert empty.generation_config.eos_token_id == loaded.generation_config.eos_token_id
    assert empty.base_model.model.is_gradient_checkpointing
