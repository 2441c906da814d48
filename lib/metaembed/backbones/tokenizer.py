"""A small tokenizer the project builds locally, for tiny random-weight backbones.

Nothing can be downloaded, so tiny backbones get a WordPiece tokenizer built
from a fixed word list (the synthetic benchmark's vocabulary plus common
English words).  Unknown ASCII words fall back to character pieces; a word
with a character outside lowercase ASCII letters, digits and punctuation
("café", "北京"), or longer than 64 characters, becomes one ``<unk>``.  Known
words are one token each, keeping sequences short on CPU.  This only concerns
the tiny test backbones: real checkpoints load their own tokenizer.
"""
from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"

COMMON_WORDS = """
a an the of in on at to for with and or not is are was be this that these those it its by from as
what which who where when how many much does do there here than then any all some each every no one
two three four five six seven eight nine ten zero left right top bottom middle center centre upper lower
above below next near far beside between under over inside outside small large big little tiny
red green blue yellow purple orange white black cyan magenta pink brown gray grey gold silver
circle square triangle cross star diamond ring heart hexagon pentagon rectangle oval line dot bar
shape shapes color colour colors object objects image picture photo scene page document page
represent given following question answer find select retrieve region crop contains containing
show shows showing shown describe description caption text query candidate instruction
classify classification category label visual grounding modify modified replace replaced change
changed add added remove removed same different similar like with without has have had fact facts
number numbers count digit digits word words row rows column columns cell cells block blocks grid
first second third fourth last item items entity entities attribute value values yes no true false
""".split()


def build_tiny_tokenizer(
    extra_words: Iterable[str] = (),
    special_tokens: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """Build a deterministic lowercase WordPiece tokenizer (no download).

    ``special_tokens`` (image markers, meta tokens, ...) are added as single,
    never-split tokens after the word vocabulary.
    """
    words: list[str] = []
    seen: set[str] = set()

    def push(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            words.append(tok)

    for tok in (PAD, UNK, BOS, EOS):
        push(tok)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    for ch in chars:
        push(ch)
        push("##" + ch)
    from ..data.synthetic import VOCABULARY  # the embedded benchmark's words are single tokens

    for w in list(COMMON_WORDS) + list(VOCABULARY) + [w.lower() for w in extra_words]:
        push(w)
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
    )
    specials = list(dict.fromkeys(special_tokens))
    if specials:
        fast.add_special_tokens({"additional_special_tokens": specials})
    return fast
