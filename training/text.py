"""Report text for MLM pretraining: a WordPiece tokenizer (built from the corpus when none is given), fixed-length
encodings with word boundaries, and whole-word masking (transformers 5 dropped `DataCollatorForWholeWordMask`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .errors import TrainingConfigError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style WordPiece tokenizer built on `texts`: [CLS] text [SEP], specials at ids 0-4.

    The vocabulary is every character and its `##` continuation, then whole words by frequency (ties by spelling)
    up to `vocab_size`. The `tokenizers` WordPieceTrainer breaks frequency ties in hash order, so it returns a
    different vocabulary from run to run; resuming a run (which rebuilds the tokenizer) needs the same ids.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    characters = sorted({c for word in counts for c in word})
    vocab = list(SPECIAL_TOKENS) + characters + [f"##{c}" for c in characters]
    if len(vocab) > vocab_size:
        raise TrainingConfigError(
            f"tokenizer_vocab_size {vocab_size} cannot hold the {len(vocab)} characters and specials"
        )
    known = set(vocab)
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if w not in known]
    vocab += words[: vocab_size - len(vocab)]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a local folder (e.g. Bio_ClinicalBERT's); it must have a mask and a pad token."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingConfigError(f"tokenizer folder {str(folder)!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise TrainingConfigError(f"tokenizer folder {str(folder)!r} holds no readable tokenizer ({error})") from None
    if not tokenizer.is_fast or tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise TrainingConfigError(f"tokenizer in {str(folder)!r} must be a fast tokenizer with [MASK] and [PAD] tokens")
    return tokenizer


@dataclass(frozen=True)
class Encoded:
    """Fixed-length encodings: ids, attention masks and word index per token (-1 for specials and padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_ids: torch.Tensor


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str], length: int) -> Encoded:
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=length)
    words = [[-1 if w is None else w for w in batch.word_ids(i)] for i in range(len(texts))]
    return Encoded(torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"]), torch.tensor(words))


def whole_word_mask(
    input_ids: torch.Tensor,
    word_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask whole words of one sequence until about `probability` of its word tokens are covered (at least one
    word; a word that would overshoot is skipped), then per masked token: 80% [MASK], 10% a random id, 10% kept.

    Returns (corrupted ids, labels with -100 where nothing was masked)."""
    words = sorted({int(w) for w in word_ids.tolist() if w >= 0})
    tokens = int((word_ids >= 0).sum())
    target = max(1, round(tokens * probability))
    chosen = torch.zeros_like(input_ids, dtype=torch.bool)
    covered = 0
    for position in torch.randperm(len(words), generator=generator).tolist():
        members = word_ids == words[position]
        count = int(members.sum())
        if covered >= target:
            break
        if covered + count > target and covered > 0:
            continue
        chosen |= members
        covered += count
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    draw = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    corrupted = torch.where(chosen & (draw < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, corrupted)
    return corrupted, labels
