"""Reading and writing PyTorch weight files one tensor at a time; the pieces of the export."""

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from stllm_jax.convert import cli, export, mappings, strict, tensor_files
from stllm_jax.errors import UserError


def test_safetensors_written_here_read_by_the_library_and_back(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {'a.weight': rng.standard_normal((3, 5)).astype(np.float32),
            'b': rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
            'c': np.arange(6, dtype=np.int64).reshape(2, 3), 'empty': np.zeros((0, 4), np.float16)}
  path = str(tmp_path / 'x.safetensors')
  specs = [(k, v.shape, v.dtype) for k, v in arrays.items()]
  written = tensor_files.write_safetensors(path, specs, arrays.__getitem__, {'format': 'pt'})
  assert written == os.path.getsize(path)
  by_library = safetensors.torch.load_file(path)
  np.testing.assert_array_equal(by_library['a.weight'].numpy(), arrays['a.weight'])
  np.testing.assert_array_equal(by_library['b'].float().numpy(), arrays['b'].astype(np.float32))
  reader = tensor_files.SafetensorsReader(path)
  for name, array in arrays.items():
    read = reader.read(name)
    assert read.dtype == array.dtype and read.shape == array.shape
    np.testing.assert_array_equal(read, array)
    assert read.flags.owndata  # a private copy: the mapped pages are released after each read
  np.testing.assert_array_equal(reader.read('a.weight'), arrays['a.weight'])  # a re-read after release
  reader.close()


def test_safetensors_from_the_library_read_here(tmp_path):
  path = str(tmp_path / 'lib.safetensors')
  tensors = {'x': torch.randn(4, 3).to(torch.bfloat16), 'y': torch.randn(2)}
  safetensors.torch.save_file(tensors, path)
  files = tensor_files.TensorFile(path)
  loaded = {name: strict.to_numpy(load()) for name, load in files.tensors()}
  np.testing.assert_array_equal(loaded['x'].astype(np.float32), tensors['x'].float().numpy())
  np.testing.assert_array_equal(loaded['y'], tensors['y'].numpy())


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
  path = tmp_path / 'bad.safetensors'
  path.write_bytes(b'\xff' * 16)
  with pytest.raises(UserError, match='is not a safetensors file'):
    tensor_files.read_safetensors_header(str(path))


def _bin_dir(tmp_path, shards):
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f'pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin'
    torch.save(shard, tmp_path / name)
    weight_map.update({k: name for k in shard})
  (tmp_path / 'pytorch_model.bin.index.json').write_text(json.dumps({'weight_map': weight_map}))
  return str(tmp_path)


def test_bin_shards_are_loaded_one_at_a_time(tmp_path, monkeypatch):
  shards = [{'a': torch.ones(2), 'b': torch.ones(3)}, {'c': torch.zeros(4)}]
  directory = _bin_dir(tmp_path, shards)
  events, load = [], tensor_files.torch_state_dict

  def logged(path, key=None, trusted=False):
    events.append(('open', os.path.basename(path)))
    return load(path, key, trusted)

  monkeypatch.setattr(tensor_files, 'torch_state_dict', logged)
  tensor_set = tensor_files.TensorSet(tensor_files.hf_directory_files(directory), directory)
  assert tensor_set.names() == ['a', 'b', 'c'] and not events  # listed from the index, nothing loaded
  for name, loader in tensor_set:
    loader()
    events.append(('tensor', name))
  assert events == [('open', 'pytorch_model-00001-of-00002.bin'), ('tensor', 'a'), ('tensor', 'b'),
                    ('open', 'pytorch_model-00002-of-00002.bin'), ('tensor', 'c')]


def test_an_index_naming_absent_shards_is_refused(tmp_path):
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {'a': 'model-1.safetensors'}}))
  with pytest.raises(UserError, match='names shards that are not in'):
    tensor_files.hf_directory_files(str(tmp_path))


class PickledObject:
  """Something a checkpoint may hold besides tensors (an optimizer, a config object)."""


def test_a_pickle_with_objects_is_not_loaded(tmp_path):
  path = str(tmp_path / 'objects.pth')
  torch.save({'model': {'w': torch.ones(1)}, 'optimizer': PickledObject()}, path)
  with pytest.raises(UserError, match='pickles Python objects besides tensors.*pass --trust-pickle'):
    tensor_files.torch_state_dict(path, 'model')
  state, _ = tensor_files.torch_state_dict(path, 'model', trusted=True)
  assert list(state) == ['w']


def test_a_name_given_twice_is_refused():
  template = {'w': np.zeros((2,), np.float32)}
  rules = [(r'w', mappings.copy('w'))]
  with pytest.raises(strict.CheckpointMismatch, match='w: given twice'):
    strict.load_strict([('w', np.ones(2)), ('w', np.ones(2))], rules, template)


def test_mean_rows_and_their_inverse():
  rows = np.arange(12, dtype=np.float32).reshape(4, 3)
  transform = mappings.WithMeanRows('llm/lm_head/kernel', 1, transpose=True)
  match = re.fullmatch(r'lm_head\.weight', 'lm_head.weight')
  (path, kernel), = transform(match, rows)
  assert path == 'llm/lm_head/kernel' and kernel.shape == (3, 5)
  np.testing.assert_array_equal(kernel[:, -1], rows.mean(0))
  np.testing.assert_array_equal(transform.inverse(match, lambda p: kernel, (5, 3)), kernel.T)


def test_merge_lora_adds_the_low_rank_update():
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((2, 6, 4, 3)).astype(np.float32)  # scanned [layers, embed, heads, head_dim]
  a = rng.standard_normal((2, 6, 2)).astype(np.float32)
  b = rng.standard_normal((2, 2, 4, 3)).astype(np.float32)
  flat = {'llm/blocks/layers/attention/query/kernel': kernel, 'llm/blocks/layers/attention/query/lora/a': a,
          'llm/blocks/layers/attention/query/lora/b': b}
  merged = export.merge_lora(flat, {'lora_rank': 2, 'lora_alpha': 4.0})
  assert list(merged) == ['llm/blocks/layers/attention/query/kernel']
  expected = kernel + 2.0 * np.einsum('ldr,lrhk->ldhk', a, b)
  np.testing.assert_allclose(merged['llm/blocks/layers/attention/query/kernel'], expected, rtol=1e-5, atol=1e-6)


def test_shard_plan_and_sizes():
  specs = [('a', (10,)), ('b', (10,)), ('c', (100,)), ('d', (1,))]
  assert export.plan_shards(specs, 4, 80) == [[('a', (10,)), ('b', (10,))], [('c', (100,))], [('d', (1,))]]
  assert cli.parse_size('5GB') == 5 * 10 ** 9 and cli.parse_size('2GiB') == 2 * 2 ** 30
  with pytest.raises(UserError):
    cli.parse_size('five')
  assert tensor_files.format_bytes(1536) == '1.5 KiB'


def test_lavis_names_map_to_hugging_face_names():
  assert mappings.lavis_name_to_hf('Qformer.bert.encoder.layer.3.crossattention.self.key.bias') == \
      'qformer.encoder.layer.3.crossattention.attention.key.bias'
  assert mappings.lavis_name_to_hf('visual_encoder.blocks.7.attn.proj.weight') == \
      'vision_model.encoder.layers.7.self_attn.projection.weight'
  assert mappings.lavis_name_to_hf('model.layers.0.mlp.up_proj.weight') == \
      'language_model.model.layers.0.mlp.up_proj.weight'
