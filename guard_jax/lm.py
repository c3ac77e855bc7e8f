"""`LM`: a language model with its conditioning, the one type every sampler, scorer, trainer and evaluator takes.

An `LM` is a model (an ARM: static configuration, hashable), its params (a pytree), the prompt it conditions on
(token ids, BOS first; left-padded when a batch is built), and optionally the tokenizer that turns text into
those ids and back, and a device mesh its batches are split over.

    a = LM.load("embedded")                        # the shipped base LM, unconditional ([BOS])
    a = a.with_context("The weather today")        # a(y | context)
    cap = a.with_prefix("Write about love. ")      # CAP: the same model and params, a constraint-aware prompt first
    a2 = a.with_params(trained_params)             # a trained proposal, same conditioning

The context text is kept (`context`), so `with_prefix` tokenizes prefix + context as one string, as the
paper's CAP does. Two LMs that condition on prompts of different lengths are padded to one length by
`prompt_arrays(..., length=)`, so swapping prompts never recompiles a jitted step.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from guard_jax.models.base import ARM, Params

EMBEDDED = pathlib.Path(__file__).resolve().parent / "assets" / "base_lm"


@dataclasses.dataclass(frozen=True, eq=False)
class LM:
    """model + params + prompt (token ids, BOS first) + optional tokenizer, context text and mesh.

    `prompt`: the ids the model conditions on, e.g. (bos_id,) for an unconditional model. `context`: the
    text after BOS that `prompt` encodes (None when the prompt was given as ids). `mesh`: a
    `jax.sharding.Mesh` whose "data" axis splits each batch (None: one device).
    """

    model: ARM
    params: Params
    prompt: tuple[int, ...]
    tokenizer: Any = None
    context: str | None = None
    mesh: Any = None

    def __post_init__(self):
        prompt = tuple(int(t) for t in self.prompt)
        if not prompt:
            raise ValueError("LM.prompt needs at least one token (BOS for an unconditional model)")
        vocab, bos = getattr(self.model, "vocab_size", None), getattr(self.model, "bos_id", None)
        if vocab is not None and not all(0 <= t < vocab or t == bos for t in prompt):  # toy ARMs: bos_id = vocab_size
            raise ValueError(f"LM.prompt has token ids outside [0, vocab_size={vocab}) that are not BOS ({bos}): {prompt}")
        object.__setattr__(self, "prompt", prompt)

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def of(cls, model: ARM, params: Params, prompt=None, *, tokenizer=None, mesh=None) -> "LM":
        """An LM from a model and params; `prompt` = token ids (default [BOS]: unconditional)."""
        ids = (model.bos_id,) if prompt is None else tuple(prompt)
        return cls(model, params, ids, tokenizer, None if prompt is not None else "", mesh)

    @classmethod
    def load(cls, path: str | pathlib.Path = "embedded", *, context: str = "", dtype=jnp.float32, param_dtype=None,
             mesh=None) -> "LM":
        """A Hugging Face model folder (config.json + safetensors + tokenizer), or "embedded" for the shipped
        base LM (GPT-2, 4 layers x 128, V = 8,192), conditioned on BOS + `context`."""
        from guard_jax.models import hf

        folder = EMBEDDED if str(path) == "embedded" else pathlib.Path(path)
        model, params, tokenizer = hf.load(folder, dtype=dtype, param_dtype=param_dtype)
        return cls.of(model, params, tokenizer=tokenizer, mesh=mesh).with_context(context)

    def with_params(self, params: Params) -> "LM":
        """The same model and conditioning with other params (a trained proposal)."""
        return dataclasses.replace(self, params=params)

    def with_mesh(self, mesh) -> "LM":
        """The same LM whose batches are split over `mesh` (None: one device)."""
        return dataclasses.replace(self, mesh=mesh)

    def with_prompt(self, ids) -> "LM":
        """The same model and params conditioned on the token ids `ids` (BOS first)."""
        return dataclasses.replace(self, prompt=tuple(ids), context=None)

    def with_context(self, text: str) -> "LM":
        """Conditioned on BOS + the tokens of `text` ("" = unconditional)."""
        return dataclasses.replace(self, prompt=(self.model.bos_id, *self.encode(text)), context=text)

    def with_prefix(self, text: str) -> "LM":
        """CAP: conditioned on BOS + the tokens of `text` + this LM's context (tokenized as one string)."""
        if not text:
            raise ValueError("with_prefix needs a non-empty prefix, e.g. \"Write a sentence with the word 'love'. \"")
        if self.context is None:
            return self.with_prompt((self.model.bos_id, *self.encode(text), *self.prompt[1:]))
        return self.with_context(text + self.context)

    # --- text ---------------------------------------------------------------------------------------------
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: build the LM with LM.load(path) or LM.of(..., tokenizer=)")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens); [] for ""."""
        if not text:
            return []
        return list(self._need_tokenizer("encoding text")(text, add_special_tokens=False)["input_ids"])

    def decode(self, tokens_NT, lengths_N) -> list[str]:
        """The continuations as text (the first lengths_N[i] tokens of each row, EOS and special tokens dropped)."""
        from guard_jax.constraints import decode_texts

        return decode_texts(self._need_tokenizer("decoding samples"), tokens_NT, lengths_N)

    # --- arrays -------------------------------------------------------------------------------------------
    def prompt_arrays(self, batch_size: int = 1, length: int | None = None) -> tuple[jax.Array, jax.Array]:
        """(tokens_BP, mask_BP): the prompt left-padded to `length` (default its own length), repeated B times."""
        P = len(self.prompt) if length is None else int(length)
        if P < len(self.prompt):
            raise ValueError(f"length={P} is shorter than the prompt ({len(self.prompt)} tokens)")
        pad = P - len(self.prompt)
        tokens_1P = jnp.asarray([[self.model.pad_id] * pad + list(self.prompt)], jnp.int32)
        mask_1P = jnp.asarray([[0] * pad + [1] * len(self.prompt)], jnp.int32)
        return jnp.repeat(tokens_1P, batch_size, 0), jnp.repeat(mask_1P, batch_size, 0)

    def __repr__(self) -> str:
        n = sum(int(x.size) for x in jax.tree.leaves(self.params))
        cond = repr(self.context) if self.context is not None else f"{len(self.prompt)} prompt ids"
        mesh = "" if self.mesh is None else f", mesh={dict(self.mesh.shape)}"
        return f"LM({type(self.model).__name__}, {n:,} params, conditioned on {cond}{mesh})"


def common_prompt_length(*lms: LM) -> int:
    """The prompt length that fits every LM in `lms` (pass it to `prompt_arrays(length=)`)."""
    return max(len(lm.prompt) for lm in lms)
