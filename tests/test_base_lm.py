"""The shipped base LM (guard_jax/assets/base_lm): loads offline in guard_jax and transformers with the same
logits, and its validation perplexity is the one its training log and docs/models.md report."""

import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.pretrain_base import SHIPPED, token_rows, validation_nll
from guard_jax.models import hf

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shipped():
    return hf.load(SHIPPED)


def test_size_and_files():
    files = {p.name: p.stat().st_size for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.json"} <= set(files)
    assert sum(files.values()) <= 40 << 20


def test_transformers_gives_the_same_logits(shipped):
    import torch
    from transformers import AutoModelForCausalLM

    model, params, tokenizer = shipped
    ids = [model.bos_id] + tokenizer("A fool and his money are soon parted.", add_special_tokens=False)["input_ids"]
    ours = np.asarray(model.apply(params, jnp.asarray([ids])))
    ref = AutoModelForCausalLM.from_pretrained(str(SHIPPED)).eval()
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_validation_perplexity_matches_log_and_docs(shipped):
    model, params, tokenizer = shipped
    log = json.loads((SHIPPED / "train_log.json").read_text())
    ppl = float(np.exp(validation_nll(model, params, token_rows(tokenizer, "validation", log["config"]["seq_len"]))))
    assert ppl == pytest.approx(log["validation_perplexity"], rel=0.01)
    reported = re.search(r"validation perplexity \*\*([0-9.]+)\*\*", (ROOT / "docs" / "models.md").read_text())
    assert reported, "docs/models.md must state the base LM's 'validation perplexity **X**'"
    assert ppl == pytest.approx(float(reported.group(1)), rel=0.01)
