"""The nano MLLM's word-level tokenizer over the world's vocabulary, and its chat template."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    PreTrainedTokenizerFast,
)

from iomm.nano.world import (
    VOCABULARY,
)

# ------------------------------------------------------------------------------ tokenizer

SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "<sep>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
BACKGROUND_WORDS: tuple[str, ...] = ("white", "black")
QA_WORDS: tuple[str, ...] = (
    "describe", "the", "image", "what", "color", "is", "shape", "object", "objects", "how", "many",
    "are", "there", "background", "yes", "no", "?", ".", *COUNT_WORDS, *BACKGROUND_WORDS,
)
# The paper's reconstruction prompt (lower-cased; the tokenizer lower-cases) and a few instruction words.
AUX_PROMPT = "generate an image that is identical to the reference image :"
INSTRUCTION_WORDS: tuple[str, ...] = (
    *AUX_PROMPT.split(), "make", "draw", "create", "change", "replace", "remove", "add", "edit", "into",
    "with", "it", "this", "picture", "instead", "same", ",", "!",
)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<sep> {{ message['content'] }} </s> "
    "{% elif message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>{% else %} {{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<sep>{% endif %}"
)


def nano_vocabulary() -> list[str]:
    """Every plain word of the nano tokenizer: the world's words plus question/instruction words."""
    return sorted(set(VOCABULARY) | set(QA_WORDS) | set(INSTRUCTION_WORDS))


def build_tokenizer(
    words: list[str] | None = None,
    special_tokens: dict[str, str] | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (lower-cased, split on whitespace and punctuation) that prepends `<s>`.

    `special_tokens` maps attribute names (`bos_token`, ..., family-specific ones such as
    `context_image_token`) to tokens; it needs at least pad/unk/bos/eos.
    """
    special_tokens = dict(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    specials = list(dict.fromkeys(special_tokens.values()))
    vocab = {token: i for i, token in
             enumerate(specials + [w for w in (words or nano_vocabulary()) if w not in specials])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=special_tokens["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = special_tokens["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **special_tokens)
