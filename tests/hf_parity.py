"""Shared pieces of the parity tests against transformers' PyTorch models (test_gemma.py, test_llama.py)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from guard_jax.models import hf
from guard_jax.sampling import log_prob, sample


@dataclasses.dataclass
class Case:
    """A random transformers checkpoint saved at `path` (`hf`: the PyTorch model) and our model loaded from it."""

    name: str
    path: object
    hf: object
    model: object
    params: dict

    def hf_logits(self, tokens_BT, mask_BT=None, hf=None):
        """Reference logits; left-padded rows get positions cumsum(mask) - 1 like ours."""
        mask_BT = np.ones_like(tokens_BT) if mask_BT is None else mask_BT
        pos_BT = np.maximum(np.cumsum(mask_BT, axis=1) - 1, 0)
        with torch.no_grad():
            out = (hf or self.hf)(
                torch.tensor(tokens_BT), attention_mask=torch.tensor(mask_BT), position_ids=torch.tensor(pos_BT)
            )
        return out.logits.float().numpy()


def make_case(name, config, path, std=0.3) -> Case:
    """Build transformers' model for `config` (eager attention) with normal(0, std) weights everywhere (so attention
    is far from uniform), save it at `path` and load it through `hf.load`."""
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, std)
    ref.save_pretrained(path)
    model, params, _ = hf.load(path, tokenizer=False)
    return Case(name, path, ref, model, params)


def case_fixture(configs: dict, model_class):
    """A module-scoped pytest fixture `case` over `configs` (name -> (transformers config class, kwargs)): each
    a random checkpoint built by `make_case` in a temporary folder, loaded as a `model_class` of the config's
    model_type."""

    @pytest.fixture(scope="module", params=sorted(configs))
    def case(request, tmp_path_factory):
        cls, kwargs = configs[request.param]
        built = make_case(request.param, cls(**kwargs), tmp_path_factory.mktemp(request.param))
        assert isinstance(built.model, model_class) and built.model.model_type == cls.model_type, (built.model, cls.model_type)
        return built

    return case


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, tokens_BT, mask_BT):
    return model.apply(params, tokens_BT, mask_BT)


@functools.partial(jax.jit, static_argnums=(0, 4))
def prefill(model, params, tokens_BP, mask_BP, max_len):
    return model.prefill(params, tokens_BP, mask_BP, model.init_cache(tokens_BP.shape[0], max_len))


@functools.partial(jax.jit, static_argnums=0)
def decode(model, params, token_B, cache):
    return model.decode(params, token_B, cache)


def random_tokens(seed, shape, vocab_size=128):
    return np.random.default_rng(seed).integers(0, vocab_size, shape).astype(np.int32)


def left_pad_mask(pads, T):
    return (np.arange(T)[None, :] >= np.asarray(pads)[:, None]).astype(np.int32)


def check_sampler_matches_log_prob(model, params, max_new_tokens):
    """`sample` from a left-padded batch of prompts: its per-token and total log-probs equal teacher-forced `log_prob`."""
    prompt_BP, mask_BP = jnp.asarray(random_tokens(7, (4, 3))), jnp.asarray(left_pad_mask([0, 1, 2, 0], 3))
    out = sample(jax.random.PRNGKey(0), model, params, prompt_BP, mask_BP, max_new_tokens=max_new_tokens)
    assert out.tokens_BT.shape == (4, max_new_tokens)
    logp_B, logp_BT = log_prob(model, params, prompt_BP, mask_BP, out.tokens_BT, out.lengths_B)
    np.testing.assert_allclose(np.asarray(logp_BT), np.asarray(out.logp_BT), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logp_B), np.asarray(out.logp_B), atol=1e-5, rtol=0)
