"""Tiny local tokenizers with the real ones' special tokens, for the synthetic set, tests and laptops.

    build_llm_tokenizer(dir, corpus)      LLaMA-style BPE over SentencePiece-like '▁' pieces: <unk>=0, <s>=1,
                                          </s>=2 (used as BOS/EOS, as ST-LLM does), ..., [PAD] = the last id
    build_qformer_tokenizer(dir, corpus)  BERT-style uncased WordPiece ([PAD]=0 ... [CLS] $A [SEP]) with
                                          [DEC] added as the last id, as LAVIS adds it to bert-base-uncased

Both are trained on `corpus` (so they stay small: every printable ASCII character is in the LLM alphabet,
other characters become <unk>) and saved with `save_pretrained`, so `AutoTokenizer.from_pretrained(dir)`
loads them exactly like a downloaded Vicuna or BERT tokenizer directory. Nothing is downloaded.
"""

from __future__ import annotations

import string
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
import transformers

LLM_SPECIALS = ('<unk>', '<s>', '</s>')
BERT_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
TEMPLATE_TEXT = ('###Human: ###Assistant: ', 'Question: Options: (A) (B) (C) (D) Best option:(')


def build_llm_tokenizer(directory: str, corpus: Iterable[str], vocab_size: int = 256) -> str:
  """Trains and saves a LLaMA-style tokenizer of at most `vocab_size` ids ([PAD] last); returns `directory`."""
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first', split=True)
  tok.decoder = decoders.Metaspace(replacement='▁', prepend_scheme='first', split=True)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=list(LLM_SPECIALS),
                                initial_alphabet=list(string.printable) + ['▁'], limit_alphabet=256,
                                show_progress=False)
  tok.train_from_iterator(list(TEMPLATE_TEXT) + list(corpus), trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='</s>', eos_token='</s>',
                                              unk_token='<unk>', pad_token='[PAD]')
  fast.save_pretrained(directory)
  return directory


def build_qformer_tokenizer(directory: str, corpus: Iterable[str], vocab_size: int = 128) -> str:
  """Trains and saves a BERT-style uncased WordPiece tokenizer of at most `vocab_size` ids ([DEC] last)."""
  tok = Tokenizer(models.WordPiece(unk_token='[UNK]', max_input_chars_per_word=100))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size - 1, special_tokens=list(BERT_SPECIALS),
                                      show_progress=False)
  tok.train_from_iterator(list(TEMPLATE_TEXT) + list(corpus), trainer)
  cls_id, sep_id = tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', cls_id), ('[SEP]', sep_id)])
  bert = transformers.BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)
  bert.add_special_tokens({'bos_token': '[DEC]'})
  bert.save_pretrained(directory)
  return directory
