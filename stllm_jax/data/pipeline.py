"""Training input pipeline on grain: VideoChat2 datasets -> fixed-shape batches of numpy arrays.

    config.data --make_train_iterator(data_config, process_index, process_count)--> TrainIterator
    slot s = k*B + j --schedule--> (dataset, row, epoch) --worker: load_training_sample--> sample or skips
    B slots of batch k --collate (bucketed padding)--> batch k

Batch (all numpy; shapes fixed per (T, text bucket L, Q-Former bucket Lq); every sample from one dataset):
    frames                  uint8   [B, T, S, S, 3]  RGB crops, channels-last (S = data.image_size); the model
                                                     normalises them on the device (transforms.UINT8_NORMALIZED)
    qformer_input_ids       int32   [B, Lq]          BERT ids of "{instruction} {question}", right-padded
    qformer_attention_mask  int32   [B, Lq]
    input_ids               int32   [B, L]           "</s>###Human: ... ###Assistant: {answer}</s>" + [PAD]
    attention_mask          int32   [B, L]
    answer_mask             int32   [B, L]           1 on the answer tokens and their closing </s>
    num_real_frames         int32   [B]              distinct frames (< T: the last frame was repeated)
    sample_index            int64   [B]              row of the annotation file
    dataset_index           int32   [B]              position in DataConfig.datasets (a ConfigDict mapping
                                                     lists its names in sorted order)
    qa_index                int32   [B]              which QA pair of the row
    epoch                   int32   [B]              the dataset epoch the row was drawn in
    text_truncated          int32   [B]              answer tokens cut to data.max_answer_tokens (from the right)
The train step computes the shifted next-token loss from input_ids and answer_mask.

API
    default_config() -> ConfigDict          the `config.data` section; fields documented in DataConfig
    dataset_entry(annotation, media_root, num_frames=16, weight=1.0, folder_fps=3.0) -> ConfigDict
    parse_config(config.data) -> DataConfig  validated, typed view (clear errors for bad values)
    make_train_iterator(config.data, process_index, process_count) -> TrainIterator
    TrainIterator: next(it) -> batch; it.get_state() -> JSON-serialisable dict; it.set_state(state);
                   it.stats (cumulative skip statistics, nested); it.metrics() -> {'data/...': int};
                   it.close() (also a context manager)

Resuming: the state is the index of the next batch plus the cumulative statistics. Which row fills which
slot, and every random choice of a sample (QA pair, frames, crop), is a pure function of (seed, batch,
slot, host), so a restored iterator yields exactly the batches the first run would have, whatever
`num_workers` is. The state also records the dataset sizes, batch size, seed and hosts, and `set_state`
refuses a state made for different ones.

Bad input: a sample that fails (see errors.REASONS) is skipped, counted by reason and replaced by a random
row of the same dataset. The run stops with a DataError naming the dataset and its first failing paths
when more than `max_failure_share` of a dataset's attempts failed (after `failure_check_after` attempts),
or when one slot fails `max_attempts_per_sample` times in a row; at the end of a run the share is checked
whatever the number of attempts (`TrainIterator.check_failures(final=True)`).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from typing import Any, Iterator, Mapping, Protocol, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from stllm_jax import configlib
from stllm_jax.data import annotations, conversation, schedule, transforms
from stllm_jax.data.errors import REASONS, DataError, SampleError
from stllm_jax.data.samples import SampleOptions, load_training_sample

STATE_VERSION = 2  # 2: each dataset epoch drops its last partial batch (schedule.py)
MAX_REPORTED_FAILURES = 5


# ----------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  annotation: str  # VideoChat2-format JSON list
  media_root: str  # row["video"] is relative to it
  num_frames: int = 16  # T for every batch of this dataset
  weight: float = 1.0  # share of batches; 'by_size': its epochs per epoch of the mixture (data.mixing); 0: unread
  folder_fps: float = 3.0  # frame rate of media stored as folders of frame images


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """`config.data`. Defaults are the paper's recipe where it has one."""
  datasets: tuple = ()  # name -> dataset_entry(...) (a mapping; a list of entries with a "name" works too)
  llm_tokenizer: str = ''  # local directory of the LLaMA/Vicuna tokenizer
  qformer_tokenizer: str = ''  # local directory of the BERT tokenizer of the Q-Former
  image_size: int = 224  # train.py sets it to model.vision.image_size
  crop_scale: tuple = transforms.DEFAULT_SCALE  # RandomResizedCrop area range
  text_buckets: tuple = (64, 128, 256, 512, 1024)  # LLM text lengths (after the visual tokens)
  # The answer and its closing </s> are cut to this many tokens from the right (the released max_txt_len); the
  # prompt never is. A sample still longer than the largest text bucket is skipped as text_too_long.
  max_answer_tokens: int = conversation.MAX_ANSWER_TOKENS
  qformer_buckets: tuple = (32, 64, 128, 256)  # Q-Former text lengths
  qformer_max_length: int = conversation.QFORMER_MAX_LENGTH  # left truncation of the Q-Former text
  batch_size: int = 128  # per host; train.py sets it to train.batch_size / number of hosts
  seed: int = 0
  # 'by_size': an epoch holds round(weight x whole batches of its rows) batches of each dataset (weight 1: every
  # dataset once, as the released trainer); 'by_weight': batches in proportion to the weights alone (schedule.py)
  mixing: str = 'by_size'
  num_workers: int = 8  # decoding processes per host; 0 decodes in the main process
  worker_buffer_size: int = 4  # samples each worker prepares ahead
  max_failure_share: float = 0.2  # stop when a larger share of a dataset's samples fails...
  failure_check_after: int = 100  # ...once it has been tried this many times
  max_attempts_per_sample: int = 32  # stop when one slot fails this many times in a row
  min_video_frames: int = 2  # videos with fewer frames are skipped (too_few_frames)
  max_frame_pixels: int = 3840 * 2160  # larger frames are skipped (frame_too_large) before decoding
  decode_threads: int = 1  # FFmpeg threads per video (parallelism comes from workers)
  # Decoded videos each worker keeps in memory, whole (MiB; 0: none): for a small set read for many epochs, where
  # decoding is most of a sample's time (the demo). A video larger than this is never kept.
  video_cache_mib: int = 0
  # A row's video must resolve (symlinks followed) inside its media_root, or inside one of these directories.
  allowed_media_dirs: tuple[str, ...] = ()

  def validate(self) -> None:
    if not self.datasets:
      raise DataError('config.data.datasets is empty: add at least one entry, e.g. '
                      'config.data.datasets.mine = pipeline.dataset_entry("train.json", "videos/")')
    for spec in self.datasets:
      if spec.num_frames < 1:
        raise DataError(f'data.datasets.{spec.name}.num_frames must be >= 1, got {spec.num_frames}')
      if spec.weight < 0:
        raise DataError(f'data.datasets.{spec.name}.weight must be >= 0, got {spec.weight}')
      if spec.folder_fps <= 0:
        raise DataError(f'data.datasets.{spec.name}.folder_fps must be > 0, got {spec.folder_fps}')
    if not any(spec.weight > 0 for spec in self.datasets):
      raise DataError('every data.datasets.*.weight is 0: no dataset would be read')
    for field in ('text_buckets', 'qformer_buckets'):
      buckets = getattr(self, field)
      if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
        raise DataError(f'data.{field} must be positive integers, got {buckets!r}')
    if max(self.qformer_buckets) < self.qformer_max_length:
      raise DataError(f'the largest data.qformer_buckets ({max(self.qformer_buckets)}) is smaller than '
                      f'data.qformer_max_length ({self.qformer_max_length})')
    if self.mixing not in schedule.MIXING:
      raise DataError(f'data.mixing={self.mixing!r}; choose one of {schedule.MIXING}')
    positive = dict(batch_size=self.batch_size, image_size=self.image_size, worker_buffer_size=self.worker_buffer_size,
                    max_attempts_per_sample=self.max_attempts_per_sample, decode_threads=self.decode_threads,
                    min_video_frames=self.min_video_frames, max_frame_pixels=self.max_frame_pixels,
                    max_answer_tokens=self.max_answer_tokens)
    for name, value in positive.items():
      if value < 1:
        raise DataError(f'data.{name} must be >= 1, got {value}')
    if self.num_workers < 0:
      raise DataError(f'data.num_workers must be >= 0, got {self.num_workers}')
    if not isinstance(self.video_cache_mib, int) or self.video_cache_mib < 0:
      raise DataError(f'data.video_cache_mib must be a whole number of MiB >= 0, got {self.video_cache_mib!r}')
    if not 0 <= self.max_failure_share <= 1:
      raise DataError(f'data.max_failure_share must lie in [0, 1], got {self.max_failure_share}')
    low, high = self.crop_scale
    if not 0 < low <= high <= 1:
      raise DataError(f'data.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}')


def dataset_entry(annotation: str, media_root: str, num_frames: int = 16, weight: float = 1.0,
                  folder_fps: float = 3.0) -> ml_collections.ConfigDict:
  """One `config.data.datasets.NAME` entry."""
  return ml_collections.ConfigDict(dict(annotation=annotation, media_root=media_root, num_frames=num_frames,
                                        weight=float(weight), folder_fps=float(folder_fps)))


def default_config() -> ml_collections.ConfigDict:
  """`config.data` with the defaults of DataConfig and no dataset (config files add them)."""
  values = dataclasses.asdict(DataConfig())
  values['datasets'] = ml_collections.ConfigDict()
  return ml_collections.ConfigDict(values)


def _dataset_specs(value: Any) -> tuple[DatasetSpec, ...]:
  value = configlib.to_dict(value)
  if isinstance(value, DatasetSpec):
    return (value,)
  if isinstance(value, Mapping):
    items = [(name, entry) for name, entry in value.items()]
  elif isinstance(value, (list, tuple)):
    items = []
    for n, entry in enumerate(value):
      if isinstance(entry, DatasetSpec):
        items.append((entry.name, entry))
        continue
      entry = configlib.to_dict(entry)
      if not isinstance(entry, Mapping) or 'name' not in entry:
        raise DataError(f'data.datasets[{n}] must be a mapping with a "name"; got {entry!r}')
      items.append((entry['name'], {k: v for k, v in entry.items() if k != 'name'}))
  else:
    raise DataError(f'data.datasets must map names to dataset entries, got {type(value).__name__}')
  specs = []
  for name, entry in items:
    if isinstance(entry, DatasetSpec):
      specs.append(entry)
      continue
    entry = dict(configlib.to_dict(entry), name=name)
    try:
      specs.append(configlib.from_dict(DatasetSpec, entry, f'data.datasets.{name}'))
    except TypeError as e:  # a missing required field
      raise DataError(f'data.datasets.{name}: {e} (needs annotation and media_root)') from e
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise DataError(f'data.datasets has duplicate names: {names}')
  return tuple(specs)


def parse_config(config: Any) -> DataConfig:
  """`config.data` (ConfigDict, dict or DataConfig) -> validated DataConfig."""
  if isinstance(config, DataConfig):
    config.validate()
    return config
  values = dict(configlib.to_dict(config))
  datasets = _dataset_specs(values.pop('datasets', ()))
  cfg = configlib.from_dict(DataConfig, values, 'data')
  cfg = dataclasses.replace(cfg, datasets=datasets, crop_scale=tuple(float(x) for x in cfg.crop_scale),
                            allowed_media_dirs=tuple(str(d) for d in cfg.allowed_media_dirs),
                            text_buckets=tuple(sorted(cfg.text_buckets)),
                            qformer_buckets=tuple(sorted(cfg.qformer_buckets)))
  cfg.validate()
  return cfg


# ----------------------------------------------------------------------------------------- worker side


def _sample_options(cfg: DataConfig) -> SampleOptions:
  return SampleOptions(llm_tokenizer=cfg.llm_tokenizer, qformer_tokenizer=cfg.qformer_tokenizer,
                       max_text_length=max(cfg.text_buckets), max_answer_tokens=cfg.max_answer_tokens,
                       qformer_max_length=cfg.qformer_max_length,
                       image_size=cfg.image_size, crop_scale=cfg.crop_scale, min_video_frames=cfg.min_video_frames,
                       max_frame_pixels=cfg.max_frame_pixels, decode_threads=cfg.decode_threads,
                       allowed_media_dirs=tuple(cfg.allowed_media_dirs), video_cache_bytes=cfg.video_cache_mib << 20)


@dataclasses.dataclass(frozen=True)
class SlotLoader:
  """grain map: slot index -> {'sample': arrays or None, 'failures': [...], ...}. Picklable."""
  datasets: tuple[DatasetSpec, ...]
  plan: schedule.Schedule
  options: SampleOptions
  max_attempts: int

  def __call__(self, slot: int) -> dict[str, Any]:
    batch, position = divmod(int(slot), self.plan.batch_size)
    failures = []
    dataset = epoch = row_index = None
    for attempt in range(self.max_attempts):
      dataset, row_index, epoch = self.plan.row(batch, position, attempt)
      spec = self.datasets[dataset]
      raw = annotations.load_annotations(spec.annotation)[row_index]
      try:
        sample = load_training_sample(raw, spec.media_root, spec.num_frames, spec.folder_fps,
                                      self.plan.sample_rng(batch, position, attempt), self.options)
      except SampleError as e:
        failures.append((e.reason, f'{spec.annotation}[{row_index}] {annotations.describe(raw)}', e.message))
        continue
      sample.update(sample_index=row_index, epoch=epoch)
      return dict(batch=batch, dataset=dataset, sample=sample, failures=failures)
    return dict(batch=batch, dataset=dataset, sample=None, failures=failures)


def _mark_flags_parsed() -> None:
  """grain reads absl flags; outside absl.app (tests, notebooks, worker processes) they are unparsed."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  _mark_flags_parsed()


# ----------------------------------------------------------------------------------------- statistics


def new_stats(names: Sequence[str]) -> dict[str, Any]:
  """Cumulative statistics, JSON-serialisable."""
  return dict(batches=0, samples=0, attempts=0, skipped={reason: 0 for reason in REASONS},
              text_truncated_samples=0, text_truncated_tokens=0, qformer_truncated_samples=0,
              repeated_frame_samples=0,
              datasets={name: dict(attempts=0, skipped=0, first_failures=[]) for name in names})


def _record(stats: dict[str, Any], name: str, slot: dict[str, Any], num_frames: int) -> None:
  per_dataset = stats['datasets'][name]
  attempts = len(slot['failures']) + (slot['sample'] is not None)
  stats['attempts'] += attempts
  per_dataset['attempts'] += attempts
  for reason, where, message in slot['failures']:
    stats['skipped'][reason] += 1
    per_dataset['skipped'] += 1
    if len(per_dataset['first_failures']) < MAX_REPORTED_FAILURES:
      per_dataset['first_failures'].append([reason, where, message])
  sample = slot['sample']
  if sample is not None:
    stats['samples'] += 1
    stats['text_truncated_samples'] += int(sample['text_truncated'] > 0)
    stats['text_truncated_tokens'] += int(sample['text_truncated'])
    stats['qformer_truncated_samples'] += int(sample['qformer_truncated'] > 0)
    stats['repeated_frame_samples'] += int(sample['num_real_frames'] < num_frames)


def _failure_report(name: str, per_dataset: dict[str, Any]) -> str:
  lines = [f'  {reason}: {where}: {message}' for reason, where, message in per_dataset['first_failures']]
  return '\n'.join(lines)


def check_failures(stats: dict[str, Any], cfg: DataConfig, final: bool = False) -> None:
  """DataError when a dataset's share of failed attempts is too high: checked once it has had
  `failure_check_after` attempts, and at the end of a run (`final`) whatever their number."""
  for spec in cfg.datasets:
    per_dataset = stats['datasets'][spec.name]
    attempts, skipped = per_dataset['attempts'], per_dataset['skipped']
    enough = attempts >= (1 if final else cfg.failure_check_after)
    if enough and skipped > cfg.max_failure_share * attempts:
      raise DataError(
          f'dataset {spec.name!r}: {skipped} of {attempts} samples failed ({skipped / attempts:.0%} > '
          f'data.max_failure_share {cfg.max_failure_share:.0%}). Check its annotation {spec.annotation!r} and '
          f'media_root {spec.media_root!r}. First failures:\n{_failure_report(spec.name, per_dataset)}')


def metrics(stats: dict[str, Any]) -> dict[str, int]:
  """Flat cumulative counters for the training metrics (same keys every step)."""
  out = {'data/samples': stats['samples'], 'data/attempts': stats['attempts'],
         'data/skipped': sum(stats['skipped'].values()),
         'data/text_truncated': stats['text_truncated_samples'],
         'data/qformer_truncated': stats['qformer_truncated_samples'],
         'data/repeated_frames': stats['repeated_frame_samples']}
  out.update({f'data/skipped/{reason}': count for reason, count in stats['skipped'].items()})
  return out


# ----------------------------------------------------------------------------------------- batches


def collate(samples: Sequence[dict[str, Any]], dataset: int, cfg: DataConfig, llm_pad_id: int,
            qformer_pad_id: int) -> dict[str, np.ndarray]:
  """Samples of one dataset -> a batch with bucketed, right-padded text (see the module docstring)."""
  input_ids, attention_mask = conversation.pad_batch([s['input_ids'] for s in samples], cfg.text_buckets,
                                                     llm_pad_id)
  answer_mask, _ = conversation.pad_batch([s['answer_mask'] for s in samples], (input_ids.shape[1],), 0)
  qformer_ids, qformer_mask = conversation.pad_batch([s['qformer_input_ids'] for s in samples],
                                                     cfg.qformer_buckets, qformer_pad_id)
  column = lambda key, dtype: np.asarray([s[key] for s in samples], dtype)
  return dict(frames=np.stack([s['frames'] for s in samples]), qformer_input_ids=qformer_ids,
              qformer_attention_mask=qformer_mask, input_ids=input_ids, attention_mask=attention_mask,
              answer_mask=answer_mask, num_real_frames=column('num_real_frames', np.int32),
              sample_index=column('sample_index', np.int64),
              dataset_index=np.full(len(samples), dataset, np.int32), qa_index=column('qa_index', np.int32),
              epoch=column('epoch', np.int32), text_truncated=column('text_truncated', np.int32))


class BatchIterator(Protocol):
  """What the trainer reads batches from: `TrainIterator` (real videos) or `RandomBatches` (random arrays)."""
  batches_per_epoch: int

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...
  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: Mapping[str, Any]) -> None: ...
  def metrics(self) -> dict[str, int]: ...
  def close(self) -> None: ...


class TrainIterator:
  """Batches for one host, resumable exactly (see the module docstring)."""

  def __init__(self, cfg: DataConfig, process_index: int, process_count: int):
    if not 0 <= process_index < process_count:
      raise DataError(f'process_index {process_index} must lie in [0, process_count={process_count})')
    self.cfg = cfg
    sizes = [len(annotations.load_annotations(spec.annotation)) if spec.weight > 0 else 0 for spec in cfg.datasets]
    for spec, size in zip(cfg.datasets, sizes):
      if spec.weight > 0 and schedule.epoch_batches(size, cfg.batch_size, process_count) < 1:
        raise DataError(f'dataset {spec.name!r} ({spec.annotation}) has {size} rows, fewer than one batch of '
                        f'{cfg.batch_size * process_count} ({cfg.batch_size} per host x {process_count} hosts), so '
                        f'an epoch of it holds no whole batch; add rows, use a smaller batch, or leave it out with '
                        f'data.datasets.{spec.name}.weight=0')
    counts = schedule.block_counts(sizes, [s.weight for s in cfg.datasets], cfg.mixing, cfg.batch_size,
                                   process_count)
    self.plan = schedule.Schedule(tuple(sizes), tuple(int(c) for c in counts), cfg.batch_size, cfg.seed,
                                  process_index, process_count)
    self._llm_pad_id = conversation.load_llm_tokenizer(cfg.llm_tokenizer).pad_token_id
    self._qformer_pad_id = conversation.load_qformer_tokenizer(cfg.qformer_tokenizer).pad_token_id
    self._loader = SlotLoader(cfg.datasets, self.plan, _sample_options(cfg), cfg.max_attempts_per_sample)
    self._next_batch = 0
    self._stats = new_stats([s.name for s in cfg.datasets])
    self._source = None

  @property
  def batches_per_epoch(self) -> int:
    """Batches of one epoch: one schedule block (every dataset's whole batches once, at weight 1)."""
    return self.plan.block_size

  # -- iteration

  def _start(self) -> None:
    cfg = self.cfg
    _mark_flags_parsed()
    ds = grain.MapDataset.range(self._next_batch * cfg.batch_size, sys.maxsize).map(self._loader)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=cfg.worker_buffer_size))
    if cfg.num_workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                       per_worker_buffer_size=cfg.worker_buffer_size),
                          worker_init_fn=_init_worker)
    self._source = iter(ds)

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._source is None:
      self._start()
    cfg = self.cfg
    slots = [next(self._source) for _ in range(cfg.batch_size)]
    dataset = slots[0]['dataset']
    spec = cfg.datasets[dataset]
    if any(slot['batch'] != self._next_batch or slot['dataset'] != dataset for slot in slots):
      raise RuntimeError(f'slots of batch {self._next_batch} arrived out of order: '
                         f'{[(s["batch"], s["dataset"]) for s in slots]}')
    for slot in slots:
      _record(self._stats, spec.name, slot, spec.num_frames)
    for slot in slots:
      if slot['sample'] is None:
        raise DataError(f'dataset {spec.name!r}: one sample failed {cfg.max_attempts_per_sample} times in a row '
                        f'(data.max_attempts_per_sample). Check its annotation {spec.annotation!r} and media_root '
                        f'{spec.media_root!r}. First failures:\n'
                        f'{_failure_report(spec.name, self._stats["datasets"][spec.name])}')
    check_failures(self._stats, cfg)
    batch = collate([slot['sample'] for slot in slots], dataset, cfg, self._llm_pad_id, self._qformer_pad_id)
    self._next_batch += 1
    self._stats['batches'] += 1
    return batch

  # -- state

  def _signature(self) -> dict[str, Any]:
    cfg = self.cfg
    return dict(datasets=[s.name for s in cfg.datasets], sizes=list(self.plan.sizes), counts=list(self.plan.counts),
                batch_size=cfg.batch_size, seed=cfg.seed, process_index=self.plan.process_index,
                process_count=self.plan.process_count)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable: the next batch index, cumulative statistics and what they were made for."""
    return dict(version=STATE_VERSION, next_batch=self._next_batch, stats=copy.deepcopy(self._stats),
                signature=self._signature())

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continue exactly after the batch the state was taken at."""
    if not isinstance(state, Mapping) or state.get('version') != STATE_VERSION:
      raise DataError(f'not a data iterator state of version {STATE_VERSION}: {str(state)[:200]}')
    mine, theirs = self._signature(), dict(state['signature'])
    if mine != theirs:
      diff = {k: (theirs.get(k), mine[k]) for k in mine if theirs.get(k) != mine[k]}
      raise DataError(f'the saved data iterator state was made for other data settings; resuming would not '
                      f'repeat the same batches. (saved, now): {diff}')
    self.close()
    self._next_batch = int(state['next_batch'])
    self._stats = copy.deepcopy(dict(state['stats']))

  # -- statistics

  @property
  def stats(self) -> dict[str, Any]:
    """Cumulative statistics over the batches yielded so far (a copy)."""
    return copy.deepcopy(self._stats)

  def metrics(self) -> dict[str, int]:
    return metrics(self._stats)

  def check_failures(self, final: bool = False) -> None:
    """DataError if a dataset's share of failures passes data.max_failure_share (see `check_failures`)."""
    check_failures(self._stats, self.cfg, final)

  # -- cleanup

  def close(self) -> None:
    if self._source is not None:
      close = getattr(self._source, 'close', None)
      if close is not None:
        close()
      self._source = None

  def __enter__(self) -> TrainIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_train_iterator(data_config: Any, process_index: int, process_count: int) -> TrainIterator:
  """The training iterator of this host (`config.data` as a ConfigDict, dict or DataConfig)."""
  return TrainIterator(parse_config(data_config), process_index, process_count)
