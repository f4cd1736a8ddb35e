import json

import pytest
import torch
from transformers import GPT2LMHeadModel

from minigpt.export import load_hf, save_hf
from minigpt.model import GPT, GPTConfig


def test_transformers_loads_our_export_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=99, n_layer=2, n_head=4, n_embd=64)).eval()
    save_hf(model, tmp_path / "hf", eos_token_id=98)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 99, (2, 32))
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(idx).logits
        back = load_hf(tmp_path / "hf").eval()(idx)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back, ours)


def test_export_refuses_what_gpt2_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="bias=True"):
        save_hf(GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8, bias=False)), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_hf(tmp_path / "nothing")
    save_hf(GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8)), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="sets {'activation_function': 'relu'}, which minigpt's GPT does not implement"):
        load_hf(tmp_path / "hf")  # it would load weights that compute something else
