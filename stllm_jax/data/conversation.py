r"""The InstructBLIP-Vicuna conversation template, tokenisation, labels and bucketed padding.

The LLM sees (REFERENCE.md, "sequence"):

    [V] </s> ###Human: {instruction} {question} ###Assistant: {answer} </s> [PAD]...
         \_________________________ prompt ____________________/ \__ supervised __/

`[V]` (the visual tokens) is not text: `input_ids` start at the `</s>` that follows it. `</s>` is BOS, EOS
and UNK (id 2 in Vicuna); `[PAD]` is added as the last id (32000 for Vicuna) and padding is on the right.
As in the original, the prompt and the answer are tokenised separately (`</s>` + prompt, then answer +
`</s>`) and concatenated; `answer_mask` is 1 exactly on the answer tokens and the closing `</s>`.
With an empty instruction the turn is `###Human: {question} ###Assistant: `.

The Q-Former reads `{instruction} {question}` through the BERT tokenizer (with `[DEC]`), left-truncated to
256 tokens (`[CLS]`/`[SEP]` kept), as LAVIS does.

Lengths follow the released code: the answer and its closing `</s>` are cut to `max_answer_tokens` (256, its
`max_txt_len`) from the right, so a long answer loses its end and its `</s>` (counted in
`EncodedText.truncated_tokens`); the prompt is never cut. A pair still longer than the largest text bucket
(1024 in the 7B configs) is skipped as `text_too_long`, never cut to fit. The answer's trailing whitespace is
dropped, as the released tokenisation of `answer + '</s>'` drops it. Visual tokens are never touched here.

Tokenizers load from local directories only (`from_pretrained(dir, local_files_only=True)`); a LLaMA directory
with a SentencePiece `tokenizer.model` loads as the released slow tokenizer (`slow_llama.py`).

Inference uses the same template; generated text is cut at the separator `###`. Chat asks as the open QA prompt
with the system text (the released demo), or with `--multi-turn` keeps the history as `</s>###Human: q1
###Assistant: a1</s>###Human: q2 ###Assistant: ` (each piece tokenised as in training). The evaluation prompts
(REFERENCE.md, "Evaluation") live here too:

    MVBench   [V]</s>###Human: {MVBENCH_SYSTEM}Question: {q}\nOptions:\n(A) {c0}\n(B) {c1}...\nOnly give the best
              option.\n###Assistant: Best option:(      Q-Former text: 'Question: {q}\nOptions:\n(A) {c0}...'
              prediction = '(' + the first line of the answer; `mvbench_is_correct` is the original's matching
    open QA   [V]</s>###Human: {q} ###Assistant:          (ActivityNet-QA, VideoChatGPT-Bench and chat: QA_SYSTEM
                                                          before '###Human: ')
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import numpy as np

from stllm_jax.data.errors import DataError, SampleError

EOS_TOKEN = '</s>'
PAD_TOKEN = '[PAD]'
DEC_TOKEN = '[DEC]'
HUMAN = '###Human: '
ASSISTANT = '###Assistant: '
SEPARATOR = '###'  # generation stops at it
SENTENCEPIECE_MODEL = 'tokenizer.model'  # a directory with it holds a slow (SentencePiece) LLaMA tokenizer
QFORMER_MAX_LENGTH = 256
MAX_ANSWER_TOKENS = 256  # the released max_txt_len: the answer and its closing </s> are cut to this many tokens

MVBENCH_SYSTEM = ('Carefully watch the video and pay attention to the cause and sequence of events, the detail and '
                  'movement of objects, and the action and pose of persons. Based on your observations, select the '
                  'best option that accurately addresses the question.\n')
MVBENCH_QUESTION_END = '\nOnly give the best option.\n'
MVBENCH_ANSWER_START = 'Best option:('
QA_SYSTEM = ('Carefully watch the video and pay attention to the cause and sequence of events, the detail and '
             'movement of objects, and the action and pose of persons. Based on your observations, give your answer '
             'that best addresses the question.\n')


# ----------------------------------------------------------------------------------------- strings


def human_turn(instruction: str, question: str) -> str:
  """The prompt text after `</s>`: '###Human: {instruction} {question} ###Assistant: '."""
  instruction = instruction.strip() if instruction else ''
  lead = f'{instruction} ' if instruction else ''
  return f'{HUMAN}{lead}{question} {ASSISTANT}'


def qformer_text(instruction: str, question: str) -> str:
  """What the Q-Former reads: the instruction and the question."""
  instruction = instruction.strip() if instruction else ''
  return f'{instruction} {question}' if instruction else question


def chat_turns(history: Sequence[tuple[str, str]], question: str) -> list[tuple[str, str]]:
  """(prompt text, answer text) pieces of a conversation whose last question is still unanswered."""
  pieces = [(human_turn('', q), a) for q, a in history]
  return pieces + [(human_turn('', question), '')]


def qa_prompt(question: str, with_system: bool = False) -> str:
  """Open-ended QA and chat: '{QA_SYSTEM}###Human: {q} ###Assistant: ' with or without the system text."""
  return (QA_SYSTEM if with_system else '') + human_turn('', question)


def mvbench_question(question: str, candidates: Sequence[str]) -> str:
  """'Question: {q}\nOptions:\n(A) {c0}\n(B) {c1}...' (also the Q-Former text)."""
  options = ''.join(f'({chr(ord("A") + n)}) {c}\n' for n, c in enumerate(candidates))
  return f'Question: {question}\nOptions:\n{options}'.rstrip()


def mvbench_prompt(question: str, candidates: Sequence[str]) -> str:
  """The text after `</s>`, ending in 'Best option:(' so the model continues with the letter."""
  return f'{HUMAN}{MVBENCH_SYSTEM}{mvbench_question(question, candidates)}{MVBENCH_QUESTION_END}' \
         f'{ASSISTANT}{MVBENCH_ANSWER_START}'


def mvbench_ground_truth(candidates: Sequence[str], answer: str) -> str:
  """'(X) answer' for the candidate equal to `answer`."""
  if answer not in candidates:
    raise ValueError(f'the answer {answer!r} is not among the candidates {list(candidates)}')
  return f'({chr(ord("A") + list(candidates).index(answer))}) {answer}'


def mvbench_prediction(answer: str) -> str:
  """'(' + the first line of the generated answer (the prompt ended in '(')."""
  return '(' + answer.strip().split('\n')[0]


def mvbench_is_correct(prediction: str, ground_truth: str) -> bool:
  """The original matching: the prediction's first word (lower-cased, dots removed) and the ground truth's
  option '(x)' contain one another ('(A) cat', 'A', '(a)' and 'a.' all match '(A) cat')."""
  predicted_option = prediction.lower().split(' ')[0].replace('.', '')
  true_option = ground_truth.lower().split(' ')[0]
  return predicted_option in true_option or true_option in predicted_option


def answer_text(tokenizer, generated_ids: Sequence[int], stop_strings: Sequence[str] = (SEPARATOR,)) -> str:
  """Generated ids -> the answer: up to EOS, cut at the first stop string, after any 'Assistant:', stripped."""
  ids = list(generated_ids)
  eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
  if eos in ids:
    ids = ids[:ids.index(eos)]
  text = tokenizer.decode(ids, skip_special_tokens=True)
  for stop in stop_strings:
    text = text.split(stop)[0]
  return text.split('Assistant:')[-1].strip()


# ----------------------------------------------------------------------------------------- tokenizers


def _load(directory: str, what: str, field: str, tokenizer_class=None, **kwargs):
  """`tokenizer_class` (default transformers' AutoTokenizer) from a local directory, or a DataError saying why not.

  transformers (and the torch it imports) is imported here, on the first tokenizer: training on random batches,
  the converter's checks and every command that reads no text start without it."""
  if tokenizer_class is None:
    import transformers  # pylint: disable=g-import-not-at-top
    tokenizer_class = transformers.AutoTokenizer
  if not directory or not os.path.isdir(directory):
    raise DataError(f'data.{field}={directory!r} is not a directory. Point it at a local Hugging Face '
                    f'{what} tokenizer directory (tokenizer.json or tokenizer.model + tokenizer_config.json); '
                    'the synthetic set writes one under DIR/tokenizers/.')
  try:
    return tokenizer_class.from_pretrained(directory, local_files_only=True, **kwargs)
  except (OSError, ValueError) as e:
    raise DataError(f'data.{field}={directory!r}: cannot load a {what} tokenizer from it: {e}') from e


@functools.cache
def load_llm_tokenizer(directory: str):
  """The LLaMA/Vicuna tokenizer with ST-LLM's specials: `</s>` as BOS/EOS/UNK, `[PAD]` added if absent.

  A directory with a SentencePiece `tokenizer.model` (Vicuna's) loads as the released code loads it, the slow
  tokenizer (`slow_llama.LlamaTokenizer`, ids = SentencePiece's); one with only `tokenizer.json` (the tiny
  tokenizers of the synthetic set and the tests) as its fast tokenizer.
  """
  if os.path.isfile(os.path.join(directory or '', SENTENCEPIECE_MODEL)):
    from stllm_jax.data import slow_llama  # pylint: disable=g-import-not-at-top  (imports transformers)
    tok = _load(directory, 'LLaMA/Vicuna', 'llm_tokenizer', slow_llama.LlamaTokenizer, legacy=True,
                clean_up_tokenization_spaces=False)
  else:
    tok = _load(directory, 'LLaMA/Vicuna', 'llm_tokenizer')
  if EOS_TOKEN not in tok.get_vocab():
    raise DataError(f'data.llm_tokenizer={directory!r} has no {EOS_TOKEN!r} token; it is not a LLaMA tokenizer')
  tok.add_special_tokens({'pad_token': PAD_TOKEN, 'bos_token': EOS_TOKEN, 'eos_token': EOS_TOKEN,
                          'unk_token': EOS_TOKEN})
  tok.padding_side = 'right'
  return tok


@functools.cache
def load_qformer_tokenizer(directory: str):
  """The BERT tokenizer of the Q-Former, with `[DEC]` (added if absent) and left truncation."""
  tok = _load(directory, 'BERT (Q-Former)', 'qformer_tokenizer', truncation_side='left')
  if DEC_TOKEN not in tok.get_vocab():
    tok.add_special_tokens({'bos_token': DEC_TOKEN})
  tok.truncation_side = 'left'
  if tok.pad_token_id is None:
    raise DataError(f'data.qformer_tokenizer={directory!r} has no pad token; it is not a BERT tokenizer')
  return tok


# ----------------------------------------------------------------------------------------- encoding


@dataclasses.dataclass(frozen=True)
class EncodedText:
  input_ids: np.ndarray  # int32 [n]: </s> prompt answer </s>
  answer_mask: np.ndarray  # int32 [n]: 1 on answer tokens and the closing </s>
  truncated_tokens: int  # answer tokens (its closing </s> included) cut to max_answer_tokens


def _ids(tokenizer, text: str) -> list[int]:
  return tokenizer(text, add_special_tokens=False)['input_ids']


def encode_prompt(tokenizer, prompt: str) -> np.ndarray:
  """`</s>` + prompt tokens, for generation: int32 [n]."""
  return np.asarray([tokenizer.convert_tokens_to_ids(EOS_TOKEN)] + _ids(tokenizer, prompt), np.int32)


def encode_turns(tokenizer, turns: Sequence[tuple[str, str]]) -> np.ndarray:
  """`</s>` + (prompt, answer `</s>`) pieces as in training; an empty last answer leaves the prompt open."""
  eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
  ids = [eos]
  for prompt, answer in turns:
    ids += _ids(tokenizer, prompt)
    if answer:
      ids += _ids(tokenizer, answer) + [eos]
  return np.asarray(ids, np.int32)


def encode_training_text(tokenizer, instruction: str, question: str, answer: str, max_length: int,
                         max_answer_tokens: int = MAX_ANSWER_TOKENS) -> EncodedText:
  """Token ids and answer mask of one QA pair: the answer + `</s>` cut to `max_answer_tokens` from the right,
  the prompt whole; raises SampleError('text_too_long') if the two exceed `max_length` (the largest bucket).

  The released code tokenises `answer + '</s>'` in one call, and its tokenizer strips the text next to a special
  token given as a plain string, so trailing whitespace of the answer never becomes a token.
  """
  eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
  prompt = encode_prompt(tokenizer, human_turn(instruction, question))
  target = np.asarray(_ids(tokenizer, answer.rstrip()) + [eos], np.int32)
  kept = target[:max_answer_tokens]
  length = len(prompt) + len(kept)
  if length > max_length:
    raise SampleError('text_too_long', f'the prompt ({len(prompt)} tokens) and the answer ({len(kept)} tokens, cut '
                      f'to data.max_answer_tokens={max_answer_tokens}) make {length} tokens; the largest text bucket '
                      f'is {max_length} (data.text_buckets)')
  input_ids = np.concatenate([prompt, kept])
  answer_mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(kept), np.int32)])
  return EncodedText(input_ids, answer_mask, len(target) - len(kept))


def encode_qformer_text(tokenizer, text: str, max_length: int = QFORMER_MAX_LENGTH) -> tuple[np.ndarray, int]:
  """BERT ids of the Q-Former text ([CLS] ... [SEP]), left-truncated: (int32 [n], tokens dropped)."""
  full = tokenizer(text, truncation=False)['input_ids']
  ids = tokenizer(text, truncation=True, max_length=max_length)['input_ids']
  return np.asarray(ids, np.int32), len(full) - len(ids)


# ----------------------------------------------------------------------------------------- padding


def choose_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length."""
  for bucket in sorted(buckets):
    if bucket >= length:
      return bucket
  raise ValueError(f'length {length} exceeds the largest bucket {max(buckets)}')


def pad_batch(sequences: Sequence[np.ndarray], buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads int sequences to the smallest bucket that fits them all: (ids, mask) int32 [B, L]."""
  length = choose_bucket(max(len(s) for s in sequences), buckets)
  ids = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for row, seq in enumerate(sequences):
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = 1
  return ids, mask
