"""A character-level tokenizer for the skills corpus, built with `tokenizers` and wrapped for transformers."""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eep.tasks.skills import SKILLS, tag

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
CHARACTERS = string.digits + string.ascii_lowercase + "+=?\n "


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Vocabulary: 3 specials, one tag token per skill, then one token per character of ``CHARACTERS``.

    Tag tokens are split off whole (``[add]`` is one token); everything else is one token per character, and decoding
    concatenates tokens, so ``decode(encode(text)) == text`` for any text over the vocabulary.
    """
    vocab = {t: i for i, t in enumerate([PAD, EOS, UNK, *(tag(s) for s in SKILLS), *CHARACTERS])}
    tags = "|".join(tag(s).replace("[", r"\[").replace("]", r"\]") for s in SKILLS)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(f"{tags}|[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="right",
        model_max_length=64, clean_up_tokenization_spaces=False,
    )
