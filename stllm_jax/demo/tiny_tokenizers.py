"""Tiny local tokenizers with the real ones' special tokens, for the synthetic set, tests and laptops.

    build_llm_tokenizer(dir, corpus)      LLaMA-style BPE over SentencePiece-like '▁' pieces: <unk>=0, <s>=1,
                                          </s>=2 (used as BOS/EOS, as ST-LLM does), ..., [PAD] = the last id
    build_qformer_tokenizer(dir, corpus)  BERT-style uncased WordPiece ([PAD]=0 ... [CLS] $A [SEP]) with
                                          [DEC] added as the last id, as LAVIS adds it to bert-base-uncased

Both are built from `corpus` by plain deterministic Python (the Rust trainers of `tokenizers` break ties
in hash order, which changes ids from run to run), so they stay small: every printable ASCII character is
in the LLM alphabet and other characters become <unk>. They are saved with `save_pretrained`, so
`AutoTokenizer.from_pretrained(dir)` loads them exactly like a downloaded Vicuna or BERT tokenizer
directory. Nothing is downloaded.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
import transformers

LLM_SPECIALS = ('<unk>', '<s>', '</s>')
BERT_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
TEMPLATE_TEXT = ('###Human: ###Assistant: ', 'Question: Options: (A) (B) (C) (D) Best option:(')
SPACE = '\u2581'  # SentencePiece's word-start marker
LLM_ALPHABET = tuple(dict.fromkeys(string.printable + SPACE))
BERT_ALPHABET = tuple(string.ascii_lowercase + string.digits + string.punctuation)


def _word_counts(corpus: Iterable[str], split) -> collections.Counter:
  counts = collections.Counter()
  for text in corpus:
    counts.update(split(text))
  return counts


def train_bpe(word_counts: collections.Counter, alphabet: tuple[str, ...], num_merges: int) -> list[tuple[str, str]]:
  """Deterministic BPE: repeatedly merge the most frequent adjacent pair (ties: the smallest pair)."""
  known = set(alphabet)
  words = {tuple(c for c in word): n for word, n in sorted(word_counts.items()) if all(c in known for c in word)}
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for pieces, n in words.items():
      for pair in zip(pieces, pieces[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = min(pairs, key=lambda pair: (-pairs[pair], pair))
    merges.append(best)
    joined = best[0] + best[1]
    merged = {}
    for pieces, n in words.items():
      out, i = [], 0
      while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
          out.append(joined)
          i += 2
        else:
          out.append(pieces[i])
          i += 1
      merged[tuple(out)] = merged.get(tuple(out), 0) + n
    words = merged
  return merges


def _metaspace_words(text: str) -> list[str]:
  """SentencePiece-style pieces: spaces become '\u2581' at the start of the following word."""
  return [SPACE + word for word in text.split(' ') if word]


def build_llm_tokenizer(directory: str, corpus: Iterable[str], vocab_size: int = 256) -> str:
  """Trains and saves a LLaMA-style tokenizer of at most `vocab_size` ids ([PAD] last); returns `directory`."""
  base = list(LLM_SPECIALS) + list(LLM_ALPHABET)
  merges = train_bpe(_word_counts(list(TEMPLATE_TEXT) + list(corpus), _metaspace_words), LLM_ALPHABET,
                     vocab_size - 1 - len(base))
  vocab = {token: n for n, token in enumerate(base)}
  for left, right in merges:
    vocab.setdefault(left + right, len(vocab))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme='first', split=True)
  tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme='first', split=True)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='</s>', eos_token='</s>',
                                              unk_token='<unk>', pad_token='[PAD]')
  fast.save_pretrained(directory)
  return directory


def _bert_words(text: str) -> list[str]:
  """BERT's basic split (lower-cased): runs of letters/digits, and each punctuation character alone."""
  return re.findall(r'[a-z0-9]+|[^\sa-z0-9]', text.lower())


def build_qformer_tokenizer(directory: str, corpus: Iterable[str], vocab_size: int = 128) -> str:
  """Saves a BERT-style uncased WordPiece tokenizer of at most `vocab_size` ids ([DEC] last): the specials,
  every character and '##'-continuation of a letter or digit, then the corpus's most frequent words."""
  counts = _word_counts(list(TEMPLATE_TEXT) + list(corpus), _bert_words)
  vocab = {token: n for n, token in enumerate(BERT_SPECIALS)}
  for char in BERT_ALPHABET:
    vocab[char] = len(vocab)
  for char in string.ascii_lowercase + string.digits:
    vocab['##' + char] = len(vocab)
  for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
    if len(vocab) >= vocab_size - 1:
      break
    vocab.setdefault(word, len(vocab))
  tok = Tokenizer(models.WordPiece(vocab, unk_token='[UNK]', max_input_chars_per_word=100))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', vocab['[CLS]']), ('[SEP]', vocab['[SEP]'])])
  bert = transformers.BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)
  bert.add_special_tokens({'bos_token': '[DEC]'})
  bert.save_pretrained(directory)
  return directory
