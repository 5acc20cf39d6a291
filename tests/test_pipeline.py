"""The grain training pipeline: config, schedule, batch format, bad input, failure stop, exact resume."""

import json
import os
import shutil

import numpy as np
import pytest

from stllm_jax.data import annotations, conversation, pipeline, schedule, video
from stllm_jax.data.errors import REASONS, DataError, SampleError
from stllm_jax.data.samples import SampleOptions, load_training_sample

import data_helpers as helpers

ANSWER = 'A red ball moves to the left.'


@pytest.fixture(scope='module')
def tokenizer_dirs(tmp_path_factory):
  return helpers.make_tokenizers(str(tmp_path_factory.mktemp('tokenizers')))


@pytest.fixture(scope='module')
def good_videos(tmp_path_factory):
  """16 distinct 20-frame videos: videos/v00.mp4 ... v15.mp4 (frame t of video n is pattern frame n + t)."""
  root = tmp_path_factory.mktemp('good')
  frames = helpers.pattern_frames(40)
  for n in range(16):
    helpers.write_video(str(root / f'v{n:02d}.mp4'), frames[n:n + 20])
  return str(root)


def good_rows(count=16):
  return [helpers.qa_row(f'v{n:02d}.mp4', question=f'What moves in clip {n}?', answer=ANSWER,
                         instruction='Describe the video.' if n % 2 else '') for n in range(count)]


def make_config(tokenizer_dirs, datasets, **overrides):
  config = pipeline.default_config()
  for name, entry in datasets.items():
    config.datasets[name] = entry
  config.llm_tokenizer, config.qformer_tokenizer = tokenizer_dirs
  config.update(image_size=32, batch_size=4, num_workers=0, text_buckets=(32, 64), qformer_buckets=(16, 32),
                qformer_max_length=32, failure_check_after=1000)
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def good_config(tmp_path_factory, tokenizer_dirs, good_videos):
  annotation = helpers.write_json(str(tmp_path_factory.mktemp('ann') / 'good.json'), good_rows())
  return make_config(tokenizer_dirs, {'good': pipeline.dataset_entry(annotation, good_videos, num_frames=4)})


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------------------- config


def test_default_config_and_parsing(good_config):
  defaults = pipeline.default_config()
  for field in ('datasets', 'llm_tokenizer', 'qformer_tokenizer', 'text_buckets', 'qformer_buckets', 'batch_size',
                'seed', 'num_workers', 'max_failure_share', 'image_size', 'mixing'):
    assert field in defaults
  assert defaults.image_size == 224 and defaults.qformer_buckets == (32, 64, 128, 256)
  assert defaults.max_answer_tokens == 256 and max(defaults.text_buckets) == 1024  # the released lengths
  cfg = pipeline.parse_config(good_config)
  assert cfg.datasets[0].name == 'good' and cfg.datasets[0].num_frames == 4
  as_list = good_config.to_dict()
  as_list['datasets'] = [dict(name='good', **as_list['datasets']['good'])]
  assert pipeline.parse_config(as_list) == cfg


@pytest.mark.parametrize('change, message', [
    (dict(datasets={}), 'datasets is empty'),
    (dict(text_buckets=(0, 64)), 'text_buckets'),
    (dict(qformer_buckets=(16,)), 'smaller than data.qformer_max_length'),
    (dict(mixing='random'), 'mixing'),
    (dict(max_failure_share=1.5), 'max_failure_share'),
    (dict(num_workers=-1), 'num_workers'),
    (dict(video_cache_mib=-1), 'video_cache_mib'),
    (dict(batch_size=0), 'batch_size'),
    (dict(max_answer_tokens=0), 'max_answer_tokens'),
])
def test_bad_config_values_are_named(good_config, change, message):
  values = good_config.to_dict()
  values.update(change)
  with pytest.raises(DataError, match=message):
    pipeline.parse_config(values)


def test_config_typos_and_missing_fields_are_named(good_config):
  values = good_config.to_dict()
  values['batch_sise'] = 4
  with pytest.raises(ValueError, match='did you mean data.batch_size'):
    pipeline.parse_config(values)
  values = good_config.to_dict()
  values['datasets'] = {'x': {'annotation': 'a.json'}}
  with pytest.raises(DataError, match='needs annotation and media_root'):
    pipeline.parse_config(values)


def test_missing_annotation_file_stops_at_once(tokenizer_dirs, tmp_path):
  config = make_config(tokenizer_dirs, {'gone': pipeline.dataset_entry(str(tmp_path / 'no.json'), str(tmp_path))})
  with pytest.raises(DataError, match='no.json.*does not exist'):
    pipeline.make_train_iterator(config, 0, 1)
  (tmp_path / 'dict.json').write_text('{"video": "x"}')
  config = make_config(tokenizer_dirs, {'bad': pipeline.dataset_entry(str(tmp_path / 'dict.json'), str(tmp_path))})
  with pytest.raises(DataError, match='must hold a JSON list'):
    pipeline.make_train_iterator(config, 0, 1)


# ----------------------------------------------------------------------------------------- schedule


def test_block_counts_follow_sizes_and_weights():
  np.testing.assert_array_equal(schedule.block_counts([100, 300], [1, 1], 'by_size', 10, 1), [10, 30])
  np.testing.assert_array_equal(schedule.block_counts([109, 300], [1, 1], 'by_size', 10, 1), [10, 30])  # 9 dropped
  np.testing.assert_array_equal(schedule.block_counts([109, 300], [1, 1], 'by_size', 10, 2), [5, 15])  # 54 per host
  np.testing.assert_array_equal(schedule.block_counts([100, 300], [3, 1], 'by_size', 10, 1), [30, 30])
  np.testing.assert_array_equal(schedule.block_counts([100, 300], [0.25, 1], 'by_size', 10, 1), [3, 30])  # 2.5 up
  np.testing.assert_array_equal(schedule.block_counts([100, 300], [0.01, 1], 'by_size', 10, 1), [1, 30])  # >= 1
  np.testing.assert_array_equal(schedule.block_counts([100, 300], [1, 1], 'by_weight', 10, 1), [20, 20])
  np.testing.assert_array_equal(schedule.block_counts([100, 300], [1, 0], 'by_size', 10, 1), [10, 0])


def test_mixture_is_sampled_as_the_released_trainer_samples_it():
  """The released MetaLoader (stllm/datasets/datasets/dataloader_utils.py) over one DataLoader per dataset
  (DistributedSampler reshuffled each epoch, drop_last=True), worked by hand: datasets of 10 and 23 rows, batches
  of 3, one host. An epoch holds 10 // 3 = 3 batches of the first and 23 // 3 = 7 of the second, 10 batches in a
  shuffled order, a new order each epoch. Each batch is 3 consecutive rows of its dataset's shuffle for that
  epoch; the last 10 - 9 = 1 and 23 - 21 = 2 rows of each shuffle are dropped, never carried into the next epoch."""
  sizes, batch_size = (10, 23), 3
  counts = schedule.block_counts(sizes, [1, 1], 'by_size', batch_size, 1)
  np.testing.assert_array_equal(counts, [3, 7])
  plan = schedule.Schedule(sizes, tuple(int(c) for c in counts), batch_size, seed=0, process_index=0,
                           process_count=1)
  assert plan.block_size == 10
  orders = []
  for epoch in range(3):
    order = plan.block_order(epoch)
    assert np.bincount(order).tolist() == [3, 7]
    orders.append(order.tolist())
    slots = [plan.row(batch, slot) for batch in range(10 * epoch, 10 * epoch + 10) for slot in range(batch_size)]
    assert {slot_epoch for _, _, slot_epoch in slots} == {epoch}
    for dataset, kept in ((0, 9), (1, 21)):
      rows = [row for slot_dataset, row, _ in slots if slot_dataset == dataset]
      assert rows == plan.epoch_rows(dataset, epoch)[:kept].tolist()  # in shuffled order, the tail dropped
  assert orders[0] != orders[1] != orders[2]


def test_the_global_batch_is_a_slice_of_its_datasets_shuffle_on_any_number_of_hosts():
  """As the released DistributedSampler deals one shuffle to the GPUs round-robin: the hosts' batches k together
  are rows [k G, (k + 1) G) of the dataset's shuffle for that epoch (G = batch per host x hosts)."""
  sizes, batch_size, hosts = (11, 30), 2, 2
  counts = tuple(int(c) for c in schedule.block_counts(sizes, [1, 1], 'by_size', batch_size, hosts))
  assert counts == (2, 7)  # 5 and 15 rows per host
  plans = [schedule.Schedule(sizes, counts, batch_size, 5, host, hosts) for host in range(hosts)]
  whole = schedule.Schedule(sizes, counts, batch_size, 5, 0, 1)  # the same shuffles, undealt
  seen = {0: 0, 1: 0}
  for batch in range(2 * plans[0].block_size):
    dataset, chunk = plans[0].locate(batch)
    epoch, batch_in_epoch = divmod(chunk, counts[dataset])
    rows = sorted(plan.row(batch, slot)[1] for plan in plans for slot in range(batch_size))
    global_batch = batch_size * hosts
    shuffle = whole.epoch_rows(dataset, epoch)
    assert rows == sorted(shuffle[batch_in_epoch * global_batch:(batch_in_epoch + 1) * global_batch].tolist())
    seen[dataset] += 1
  assert seen == {0: 4, 1: 14}


def test_schedule_chunks_are_consecutive_and_epochs_cover_every_row():
  plan = schedule.Schedule(sizes=(10, 23), counts=(2, 5), batch_size=3, seed=0, process_index=0, process_count=1)
  next_chunk = [0, 0]
  for batch in range(3 * plan.block_size):
    dataset, chunk = plan.locate(batch)
    assert chunk == next_chunk[dataset]
    next_chunk[dataset] += 1
  assert next_chunk == [6, 15]
  for dataset, size in ((0, 10), (1, 23)):
    assert sorted(plan.epoch_rows(dataset, 0).tolist()) == list(range(size))
    assert plan.epoch_rows(dataset, 0).tolist() != plan.epoch_rows(dataset, 1).tolist()  # reshuffled


def test_hosts_get_disjoint_rows_and_the_same_datasets():
  plans = [schedule.Schedule((11, 30), (2, 3), 2, 5, host, 2) for host in range(2)]
  rows = [set(p.epoch_rows(0, 0).tolist()) for p in plans]
  assert len(rows[0]) == len(rows[1]) == 5 and not rows[0] & rows[1]  # 11 rows: one left out this epoch
  for batch in range(20):
    assert plans[0].locate(batch) == plans[1].locate(batch)


def test_a_dataset_smaller_than_one_batch_is_refused_unless_left_out(tmp_path, tokenizer_dirs, good_videos):
  """Left out (weight 0), a dataset is never read: its files need not exist."""
  small = helpers.write_json(str(tmp_path / 'small.json'), good_rows(7))
  big = helpers.write_json(str(tmp_path / 'big.json'), good_rows(16))
  datasets = {'small': pipeline.dataset_entry(small, good_videos), 'big': pipeline.dataset_entry(big, good_videos)}
  config = make_config(tokenizer_dirs, datasets)
  with pytest.raises(DataError, match=r"dataset 'small' .* has 7 rows, fewer than one batch of 8 \(4 per host x 2 "
                                      r"hosts\).*data.datasets.small.weight=0"):
    pipeline.make_train_iterator(config, 0, 2)
  config.datasets.small.update(weight=0.0, annotation=str(tmp_path / 'gone.json'))
  assert pipeline.make_train_iterator(config, 0, 2).plan.counts == (2, 0)  # ('big', 'small'): 8 rows per host


# ----------------------------------------------------------------------------------------- batches


def test_batch_format(good_config, tokenizer_dirs):
  rows = annotations.load_annotations(good_config.datasets.good.annotation)
  tok = conversation.load_llm_tokenizer(tokenizer_dirs[0])
  with pipeline.make_train_iterator(good_config, 0, 1) as iterator:
    batches = take(iterator, 2)
  expected = dict(frames=((4, 4, 32, 32, 3), np.uint8), num_real_frames=((4,), np.int32), sample_index=((4,), np.int64), dataset_index=((4,), np.int32),
                  qa_index=((4,), np.int32), epoch=((4,), np.int32), text_truncated=((4,), np.int32))
  for batch in batches:
    for key, (shape, dtype) in expected.items():
      assert batch[key].shape == shape and batch[key].dtype == dtype, key
    for ids, masks, buckets in (('input_ids', ('attention_mask', 'answer_mask'), (32, 64)),
                                ('qformer_input_ids', ('qformer_attention_mask',), (16, 32))):
      assert batch[ids].shape[0] == 4 and batch[ids].shape[1] in buckets and batch[ids].dtype == np.int32
      assert all(batch[m].shape == batch[ids].shape and batch[m].dtype == np.int32 for m in masks)
      assert batch[masks[0]].sum(1).max() > min(buckets) or batch[ids].shape[1] == min(buckets)  # smallest fit
    assert np.all(batch['input_ids'][:, 0] == tok.convert_tokens_to_ids('</s>'))
    assert np.all(batch['answer_mask'] <= batch['attention_mask'])
    assert np.all(batch['input_ids'][batch['attention_mask'] == 0] == tok.pad_token_id)
    assert batch['frames'].min() < 64 and batch['frames'].max() > 192  # RGB crops of the test videos
    for b in range(4):
      row = rows[batch['sample_index'][b]]
      qa = row['QA'][batch['qa_index'][b]]
      assert tok.decode(batch['input_ids'][b][batch['answer_mask'][b] == 1]) == qa['a'] + '</s>'
      prompt = batch['input_ids'][b][(batch['attention_mask'][b] == 1) & (batch['answer_mask'][b] == 0)]
      assert tok.decode(prompt[1:]) == conversation.human_turn(qa['i'], qa['q'])
  first_epoch = np.concatenate([b['sample_index'] for b in take(pipeline.make_train_iterator(good_config, 0, 1), 4)])
  assert sorted(first_epoch.tolist()) == list(range(16))  # one epoch visits every row once


def test_each_batch_comes_from_one_dataset_with_its_frame_count(tmp_path, tokenizer_dirs, good_videos):
  two = helpers.write_json(str(tmp_path / 'two.json'), good_rows(8))
  three = helpers.write_json(str(tmp_path / 'three.json'), good_rows(16))
  config = make_config(tokenizer_dirs, {'two': pipeline.dataset_entry(two, good_videos, num_frames=2),
                                        'three': pipeline.dataset_entry(three, good_videos, num_frames=3)})
  iterator = pipeline.make_train_iterator(config, 0, 1)
  assert [spec.name for spec in iterator.cfg.datasets] == ['three', 'two']  # a ConfigDict sorts its keys
  batches = take(iterator, 9)
  frames_of = {0: 3, 1: 2}
  seen = set()
  for batch in batches:
    dataset = int(batch['dataset_index'][0])
    assert np.all(batch['dataset_index'] == dataset)
    assert batch['frames'].shape[1] == frames_of[dataset]
    seen.add(dataset)
  assert seen == {0, 1}
  assert sum(int(b['dataset_index'][0] == 0) for b in batches) == 6  # by_size: 16 rows vs 8 rows -> 2:1


def test_short_videos_and_long_answers_are_reported(tmp_path, tokenizer_dirs, good_videos):
  rows = [helpers.qa_row('v00.mp4', answer=' '.join(['left'] * 80)) for _ in range(4)]
  annotation = helpers.write_json(str(tmp_path / 'long.json'), rows)
  config = make_config(tokenizer_dirs, {'long': pipeline.dataset_entry(annotation, good_videos, num_frames=24)},
                       max_answer_tokens=40)
  iterator = pipeline.make_train_iterator(config, 0, 1)
  batch = next(iterator)
  assert np.all(batch['num_real_frames'] == 20)  # 20-frame videos, T = 24: the last frame is repeated
  assert np.all(batch['text_truncated'] == 81 - 40) and batch['input_ids'].shape[1] == 64  # 80 x 'left' + </s>
  assert np.all(batch['answer_mask'].sum(1) == 40)
  metrics = iterator.metrics()
  assert metrics['data/text_truncated'] == 4 and metrics['data/repeated_frames'] == 4


# ----------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope='module')
def broken_dataset(tmp_path_factory, good_videos):
  """Media root with good videos and every kind of broken media; rows for each bad case + 4 good rows."""
  root = str(tmp_path_factory.mktemp('broken_media'))
  cases = helpers.write_broken_media(root)
  for n in range(4):
    shutil.copy(os.path.join(good_videos, f'v{n:02d}.mp4'), os.path.join(root, f'v{n:02d}.mp4'))
  os.symlink(os.path.join(good_videos, 'v00.mp4'), os.path.join(root, 'link_out.mp4'))  # a real video, elsewhere
  media_cases = [(reason.replace('_truncated', ''), helpers.qa_row(name)) for reason, name in cases.items()]
  media_cases += [('outside_media_root', helpers.qa_row(name)) for name in (
      '../' + os.path.basename(root) + '_x/v00.mp4', os.path.join(good_videos, 'v00.mp4'), 'link_out.mp4',
      f'sub/../../{os.path.basename(good_videos)}/v00.mp4')]
  annotation_cases = [
      ('bad_annotation', {'QA': [{'q': 'What moves?', 'a': 'x'}]}),  # no video
      ('bad_annotation', {'video': 'v00.mp4'}),  # no QA
      ('bad_annotation', {'video': 'v00.mp4', 'QA': [{'q': 'What moves?'}]}),  # QA without an answer
      ('bad_annotation', {'video': 7, 'QA': [{'q': 'q', 'a': 'a'}]}),  # wrong type
      ('bad_annotation', {'video': 'v00.mp4', 'QA': 'What moves?'}),  # QA not a list
      ('bad_annotation', {'video': 'v00.mp4', 'QA': [{'q': 3, 'a': 'a'}]}),  # question not a string
      ('bad_annotation', {'video': 'v00.mp4', 'QA': [{'q': 'q', 'a': 'a'}], 'start': 'soon'}),
      ('bad_annotation', ['v00.mp4', 'What moves?']),  # not an object
      ('empty_qa', {'video': 'v00.mp4', 'QA': []}),
      ('empty_clip', helpers.qa_row('v00.mp4', start=30.0, end=40.0)),
      ('text_too_long', helpers.qa_row('v00.mp4', question=' '.join(['moves'] * 200))),
      ('text_too_long', helpers.qa_row('v00.mp4', answer=' '.join(['left'] * 80))),  # fits 64 only if cut
  ]
  rows = media_cases + annotation_cases + [(None, helpers.qa_row(f'v{n:02d}.mp4', answer=ANSWER)) for n in range(4)]
  return root, rows


def test_every_bad_row_is_skipped_with_its_reason(broken_dataset, tokenizer_dirs):
  root, rows = broken_dataset
  options = SampleOptions(*tokenizer_dirs, max_text_length=64, qformer_max_length=32, image_size=32)
  reasons = set()
  for expected, raw in rows:
    rng = np.random.default_rng(0)
    if expected is None:
      assert load_training_sample(raw, root, 4, 3.0, rng, options)['frames'].shape == (4, 32, 32, 3)
      continue
    with pytest.raises(SampleError) as e:
      load_training_sample(raw, root, 4, 3.0, rng, options)
    assert e.value.reason == expected, (raw, e.value)
    reasons.add(expected)
  assert reasons == set(REASONS)


def test_broken_dataset_run_goes_on_and_counts_skips(broken_dataset, tokenizer_dirs, tmp_path, report):
  root, rows = broken_dataset
  annotation = helpers.write_json(str(tmp_path / 'broken.json'), [raw for _, raw in rows])
  config = make_config(tokenizer_dirs, {'broken': pipeline.dataset_entry(annotation, root, num_frames=4)},
                       max_failure_share=0.95, failure_check_after=8, max_attempts_per_sample=256)
  iterator = pipeline.make_train_iterator(config, 0, 1)
  batches = take(iterator, 10)  # 40 slots: more than one epoch of the 26 rows
  good_names = {f'v{n:02d}.mp4' for n in range(4)}
  for batch in batches:
    assert batch['frames'].shape == (4, 4, 32, 32, 3)
    assert all(rows[i][1]['video'] in good_names for i in batch['sample_index'])
  stats = iterator.stats
  expected_reasons = {reason for reason, _ in rows if reason}
  assert {r for r, n in stats['skipped'].items() if n} == expected_reasons  # each visited and counted
  assert stats['samples'] == 40 and stats['attempts'] == 40 + sum(stats['skipped'].values())
  metrics = iterator.metrics()
  assert metrics['data/skipped'] == sum(stats['skipped'].values())
  bad = sum(reason is not None for reason, _ in rows)
  report(f'data: skip counts over a deliberately broken dataset ({bad} bad + {len(rows) - bad} good rows, '
         '10 batches of 4)',
         ', '.join(f'{reason}={count}' for reason, count in stats['skipped'].items() if count)
         + f'; samples={stats["samples"]}, attempts={stats["attempts"]}')
  json.dumps(iterator.get_state())  # the statistics travel in the checkpoint


def test_wrong_media_root_stops_naming_the_dataset_and_paths(good_config, tmp_path):
  values = good_config.to_dict()
  values['datasets']['good']['media_root'] = str(tmp_path / 'wrong_root')
  with pytest.raises(DataError) as e:
    next(pipeline.make_train_iterator(values, 0, 1))
  message = str(e.value)
  assert "dataset 'good'" in message and 'missing_file' in message and 'wrong_root/v' in message
  assert 'media_root' in message


def test_failure_share_above_the_limit_stops(tmp_path, tokenizer_dirs, good_videos):
  rows = good_rows(8) + [helpers.qa_row(f'gone{n}.mp4') for n in range(8)]
  annotation = helpers.write_json(str(tmp_path / 'half.json'), rows)
  config = make_config(tokenizer_dirs, {'half': pipeline.dataset_entry(annotation, good_videos, num_frames=2)},
                       max_failure_share=0.2, failure_check_after=8)
  iterator = pipeline.make_train_iterator(config, 0, 1)
  with pytest.raises(DataError, match=r"(?s)dataset 'half': \d+ of \d+ samples failed .*gone\d.mp4"):
    take(iterator, 8)


# ----------------------------------------------------------------------------------------- resume


def test_resume_mid_epoch_gives_the_same_batches(good_config):
  iterator = pipeline.make_train_iterator(good_config, 0, 1)
  take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))  # as it would be stored in a checkpoint
  following = take(iterator, 4)  # crosses into the second epoch
  stats_after = iterator.stats
  resumed = pipeline.make_train_iterator(good_config, 0, 1)
  resumed.set_state(state)
  assert resumed.stats == state['stats']
  assert_same_batches(following, take(resumed, 4))
  assert resumed.stats == stats_after


def test_resume_with_worker_processes_gives_the_same_batches(good_config):
  iterator = pipeline.make_train_iterator(good_config, 0, 1)
  take(iterator, 1)
  state = iterator.get_state()
  following = take(iterator, 3)
  values = good_config.to_dict()
  values['num_workers'] = 2
  with pipeline.make_train_iterator(values, 0, 1) as resumed:
    resumed.set_state(state)
    assert_same_batches(following, take(resumed, 3))
    resumed.set_state(state)  # restoring twice (e.g. after a failed step) starts over from the state
    assert_same_batches(following[:1], take(resumed, 1))


def test_kept_decoded_videos_give_the_same_batches(good_config):
  """data.video_cache_mib: the second epoch's videos come from memory, and every batch is what decoding gives."""
  expected = take(pipeline.make_train_iterator(good_config, 0, 1), 6)  # 4 batches per epoch
  values = good_config.to_dict()
  values['video_cache_mib'] = 16
  cache = video.DecodedVideos.shared(16 << 20)
  hits = cache.hits
  assert_same_batches(expected, take(pipeline.make_train_iterator(values, 0, 1), 6))
  assert cache.hits - hits >= 8 and len(cache) == 16  # 16 videos of 20 x 48 x 64 pixels: 2.8 MiB


def test_state_for_other_settings_is_refused(good_config):
  state = pipeline.make_train_iterator(good_config, 0, 1).get_state()
  values = good_config.to_dict()
  values['batch_size'] = 2
  with pytest.raises(DataError, match='batch_size'):
    pipeline.make_train_iterator(values, 0, 1).set_state(state)
  with pytest.raises(DataError, match='not a data iterator state'):
    pipeline.make_train_iterator(good_config, 0, 1).set_state({'next_batch': 3})


def test_hosts_read_disjoint_rows(good_config):
  per_host = [np.concatenate([b['sample_index'] for b in take(pipeline.make_train_iterator(good_config, h, 2), 2)])
              for h in range(2)]
  assert not set(per_host[0].tolist()) & set(per_host[1].tolist())
  assert sorted(per_host[0].tolist() + per_host[1].tolist()) == list(range(16))
  with pytest.raises(DataError, match='process_index'):
    pipeline.make_train_iterator(good_config, 2, 2)
