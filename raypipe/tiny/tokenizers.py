"""Offline tokenizers for the tiny models: trained on a small English corpus, saved and
loaded back with ``from_pretrained`` like hub tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

from raypipe.chat_templates import VICUNA_V1_CHAT_TEMPLATE

#: Text the offline tokenizers are trained on: generic prompt and dialogue English, so
#: common words become single tokens as with real vocabularies.
_CORPUS = """
a photo of a red car parked on a city street at dusk, realistic, dramatic lighting, 8k, highly detailed
a crimson vintage car, teal umbrella, golden retriever running on the beach, soft morning light
an orange tabby cat sleeping on a wooden windowsill, cozy interior, warm sunlight, sharp focus
a firefighter holding a hose in front of a burning building, smoke, cinematic lighting
a bowl of ramen with a soft boiled egg on a wooden table, studio lighting, food photography
a woman with a french braid wearing a yellow raincoat in a bamboo forest, misty, film grain
a giraffe walking through a narrow corridor, surreal, strange, impossible, funny, unusual
describe the image in detail. what colour is the main object? what is the person doing?
the image shows a scene with people, animals, plants, vehicles, food, clothes and furniture
is the car red or blue? yes, it is. no, it is not. the answer is. what is unusual in this picture?
oil painting, watercolor, pixel art, anime style, ukiyo-e woodblock print, art nouveau, sketch
green blue yellow purple white black brown pink grey gray silver gold beige navy maroon olive
dog cat horse bird fish lion tiger bear elephant monkey rabbit deer fox wolf owl eagle
tree flower rose tulip sunflower cactus fern palm oak pine maple bamboo lotus orchid daisy
bus train bicycle motorcycle truck boat airplane tractor scooter van taxi helicopter ship
pizza burger sushi salad cake bread pasta soup apple banana coffee tea sandwich noodles
shirt dress jacket coat hat scarf boots sneakers jeans skirt sweater hoodie suit tie
chair table sofa bed desk shelf lamp cabinet stool bench wardrobe armchair dresser
USER: ASSISTANT: <image> Human: Assistant: ### user assistant system
""".strip()


CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _corpus_lines(extra: list[str] | None = None) -> list[str]:
    # Fixed text only, so a tokenizer (and every image rendered with it) is the same on
    # every machine whatever else changes in the checkout.
    return _CORPUS.splitlines() + list(extra or [])


def _done(path: Path) -> bool:
    return (path / ".raypipe-complete").exists()


def _mark_done(path: Path) -> Path:
    (path / ".raypipe-complete").write_text("ok\n")
    return path


def build_clip_tokenizer(path: str | Path, vocab_size: int = 2048):
    """A CLIP-style BPE tokenizer (lower-cased, `</w>` word ends, 77 tokens) trained offline."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    path = Path(path)
    if _done(path):
        return CLIPTokenizer.from_pretrained(path)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        end_of_word_suffix="</w>",
        initial_alphabet=ByteLevel.alphabet(),
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    spec = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(spec["vocab"])
    # Every byte, word-final or not, must be in the vocabulary so no text maps to <unk>.
    for ch in sorted(ByteLevel.alphabet()):
        for t in (ch, ch + "</w>"):
            vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    _mark_done(path)
    return CLIPTokenizer.from_pretrained(path)


#: The tiny Llama's chat template: LLaVA-1.5's ``vicuna_v1`` format as raypipe trains it
#: (string content or lists of image/text parts), the template its exports carry.
LLAMA_CHAT_TEMPLATE = VICUNA_V1_CHAT_TEMPLATE


#: Extra fixed text for the Llama tokenizer: the fixture dialogues' words become tokens.
_LLAMA_EXTRA = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.
What is in the picture? What colour is the square? Is the square red? Which shape is shown? It is a red square. It is a blue circle. Yes. No.
The image shows a green square on a white background. This is a photo of a yellow circle. It is bright.
""".strip()


def build_tiny_llama_tokenizer(path: str | Path, vocab_size: int = 1024):
    """A Llama-style BPE tokenizer trained offline, with ``<image>`` and a Vicuna chat template.

    SentencePiece layout as in Llama: words carry a ``▁`` prefix, unknown characters fall
    back to ``<0xNN>`` byte tokens, BOS ``<s>`` is added on encode, EOS is ``</s>``. PAD is
    its own ``<pad>`` token (as in llava-hf checkpoints) and ``<image>`` is a special token,
    both appended after the trained vocabulary.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if _done(path):
        return AutoTokenizer.from_pretrained(path)
    specials = ["<unk>", "<s>", "</s>"]

    def metaspace():
        return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)

    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    trained.train_from_iterator(_corpus_lines(_LLAMA_EXTRA.splitlines()), trainer)
    spec = json.loads(trained.to_str())["model"]
    # Llama's id layout: specials, then the 256 byte-fallback tokens, then learned pieces.
    vocab = {tok: i for i, tok in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for tok in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = metaspace()
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    _mark_done(path)
    return AutoTokenizer.from_pretrained(path)
