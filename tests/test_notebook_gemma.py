"""notebooks/gemma_tpu.ipynb runs top to bottom on a tiny random Gemma saved by transformers (with a word-level
tokenizer), on a mesh of 2 CPU host devices, with LoRA and with full fine-tuning, at tiny budgets (slow: minutes of
compiling on 2 cores); the default suite runs its set-up cells."""

import json
import pathlib

import nbformat
import pytest
import torch
import transformers
from nbclient import NotebookClient
from tokenizers import Tokenizer, models, pre_tokenizers

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "gemma_tpu.ipynb"
WORDS = ["amazing", "the", "a", "day", "was", "is", "so", "not", "very", "good", "bad", "we", "it", "and", "then",
         "cat", "dog", "sun", "rain", "tree", "house", "walk", "run", "see", "sky", "blue", "red", "old", "new", "big"]
TINY = dict(word="amazing", new_tokens=8, n_gold=64, n_eval=32, batch=32, dpg_steps=1, dpg_samples=32, minibatch=16,
            learning_rate=1e-3, cap_prompt="amazing amazing")


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory) -> pathlib.Path:
    """A 2-layer random GemmaForCausalLM over 33 word tokens (<pad>, <eos>, <bos> first, as Gemma's ids 0, 1, 2)."""
    path = tmp_path_factory.mktemp("gemma") / "tiny-gemma"
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", *WORDS, "<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                     bos_token="<bos>", eos_token="<eos>")
    config = transformers.GemmaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    transformers.GemmaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_notebook(folder, out, monkeypatch, upto: str | None = None, **settings):
    """Execute the notebook (its cells up to the first whose source contains `upto`, when given) -> its printed text."""
    monkeypatch.setenv("GUARD_JAX_MODEL", str(folder))
    monkeypatch.setenv("GUARD_JAX_SETTINGS", json.dumps(TINY | settings))
    monkeypatch.setenv("GUARD_JAX_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parent.parent))  # this checkout's guard_jax, whatever the venv installed
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # the kernel's mesh: 2 CPU devices
    nb = nbformat.read(NOTEBOOK, as_version=4)
    if upto is not None:
        nb.cells = nb.cells[: next(i for i, c in enumerate(nb.cells) if upto in c.source) + 1]
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_gemma_notebook_loads_the_folder_on_the_mesh(gemma_folder, tmp_path, monkeypatch):
    """The default-suite check (the whole notebook takes minutes on 2 cores): settings from the environment, the mesh
    over the runtime's devices, the folder loaded and sharded."""
    text = run_notebook(gemma_folder, tmp_path, monkeypatch, upto="gj.LM.load(MODEL_PATH", lora_rank=2)
    assert "mesh {'data': 1, 'model': 2}" in text and "'lora_rank': 2" in text and "LM(Gemma" in text


@pytest.mark.slow
def test_gemma_notebook_with_lora(gemma_folder, tmp_path, monkeypatch):
    text = run_notebook(gemma_folder, tmp_path, monkeypatch, lora_rank=2)
    assert "mesh {'data': 1, 'model': 2}" in text and "adapters" in text and "max |log-prob difference|" in text
    assert (tmp_path / "cap_dpg_hf" / "config.json").is_file() and (tmp_path / "dpg" / "metrics.jsonl").is_file()
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "cap_dpg_hf").config.model_type == "gemma"


@pytest.mark.slow
def test_gemma_notebook_with_full_fine_tuning(gemma_folder, tmp_path, monkeypatch):
    text = run_notebook(gemma_folder, tmp_path, monkeypatch, lora_rank=0)
    assert "trained parameters: all" in text and (tmp_path / "cap_dpg_hf" / "config.json").is_file()
