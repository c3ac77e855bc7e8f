"""A toy grammar problem the grammar tests share: a byte-level BPE tokenizer over 7 tokens (one of them, "1+",
gives every "1+" two tokenizations), a finite CFG of bracketed sums, and a peaky tabular ARM over V=7, T=5."""

import itertools

import jax
import numpy as np

from guard_jax.exact import SequenceSpace, exact_log_prob
from guard_jax.grammars import Grammar
from guard_jax.models.toy import TabularARM

TOKENS = ["<eos>", "1", "2", "+", "(", ")", "1+"]
CFG = 'start: e\ne: t | t "+" t\nt: n | "(" a ")"\na: n | n "+" n\nn: "1" | "2"\n'
MODEL = TabularARM(len(TOKENS), 5, eos_id=0)


def toy_tokenizer():
    """A transformers fast tokenizer: byte-level BPE, merge 1 + "+" -> "1+", EOS = id 0."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(TOKENS)}, merges=[("1", "+")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def language() -> set[str]:
    """Every string of CFG, enumerated by hand (the oracle)."""
    n = ["1", "2"]
    a = n + [x + "+" + y for x, y in itertools.product(n, n)]
    t = n + ["(" + x + ")" for x in a]
    return set(t) | {x + "+" + y for x, y in itertools.product(t, t)}


def text_of(tokens) -> str:
    """The text of a token sequence before its first EOS."""
    out = []
    for v in tokens:
        if v == 0:
            break
        out.append(TOKENS[v])
    return "".join(out)


def toy_grammar_problem(seed: int = 3, scale: float = 1.5):
    """-> (grammar, params, space, log_a float64 over the grid)."""
    grammar = Grammar.lark(CFG, toy_tokenizer())
    params = MODEL.init(jax.random.PRNGKey(seed), scale=scale)
    space = SequenceSpace.of(MODEL, MODEL.max_len)
    with jax.enable_x64(True):
        log_a = np.asarray(exact_log_prob(MODEL, params, MODEL.max_len), np.float64)
    return grammar, params, space, log_a
