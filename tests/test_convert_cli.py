"""`python -m stllm_jax.convert`: every source layout converts strictly, verifies against PyTorch, exports back.

The checkpoints are tiny random models written in the test (tests/convert_layouts.py) with the architecture
of configs/tiny.py, which every conversion passes as `--config` (LAVIS and ST-LLM files carry no vision or
Q-Former config of their own).
"""

import glob
import json
import os
import subprocess
import sys
import types

import flax
import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import convert_layouts as layouts
from stllm_jax import checkpoints, configlib, loading, sharding
from stllm_jax.convert import cli, export, reference, sources, verify
from stllm_jax.data import conversation
from stllm_jax.errors import UserError
from stllm_jax.models import stllm

ROOT = os.path.join(os.path.dirname(__file__), '..')
TINY = os.path.join(ROOT, 'configs', 'tiny.py')
SECTION = 'convert verify: PyTorch reference vs converted JAX model (float32 compute)'


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """A random HF InstructBLIP with configs/tiny.py's architecture, and the tiny tokenizers."""
  root = str(tmp_path_factory.mktemp('convert'))
  cfg, model, llm_tokenizer, qformer_tokenizer = layouts.tiny_instructblip(root, global_mlp_dim=16)
  return types.SimpleNamespace(root=root, cfg=cfg, model=model, llm_tokenizer=llm_tokenizer,
                               qformer_tokenizer=qformer_tokenizer, n=iter(range(10 ** 6)))


def fresh(world, name):
  """A path in the module's directory that does not exist yet."""
  return os.path.join(world.root, f'{name}_{next(world.n)}')


def run_cli(capsys, *argv):
  """(exit status, stdout, stderr) of `python -m stllm_jax.convert argv`, run in this process."""
  with pytest.raises(SystemExit) as exit_info:
    cli.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return exit_info.value.code, captured.out, captured.err


def assert_user_error(status, err, *fragments):
  """Exit status 2 and one `error: ...` message (after any progress bar), no traceback."""
  assert status == 2, err
  assert err.count('error: ') == 1 and 'Traceback' not in err, err
  message = err[err.index('error: '):]
  for fragment in fragments:
    assert fragment in message, message


def assert_nothing_written(out):
  assert not os.path.exists(out)
  assert not glob.glob(out + checkpoints.INCOMPLETE + '*')


def flat_params(path):
  return flax.traverse_util.flatten_dict(
      jax.tree_util.tree_map(np.asarray, checkpoints.load_stored_params(path)), sep='/')


def assert_exported_as(exported, source_state):
  """The exported tensors are the source's, but the LLM embedding and LM head end in one more row: the image
  token's, which the tiny vocabulary lacks, the mean of the other rows."""
  assert sorted(exported) == sorted(source_state)
  for name, tensor in source_state.items():
    if name in export.VOCAB_MATRICES:
      assert torch.equal(exported[name][:-1], tensor), name
      torch.testing.assert_close(exported[name][-1], tensor.double().mean(0).to(tensor.dtype), rtol=1e-6, atol=0)
    else:
      assert torch.equal(exported[name], tensor), name


def verified(report, name, ckpt, spec, **kwargs):
  result = verify.verify(ckpt, spec, log=lambda message: None, **kwargs)
  report(SECTION, f'{name:<44} max |diff| {result.max_abs_error:.2e}  relative {result.relative_error:.2e}')
  assert result.relative_error < 1e-5, result
  return result


# ------------------------------------------------------------------------------------ Hugging Face sources

@pytest.fixture(scope='module')
def hf_sources(world):
  return {layout: layouts.hf_dir(os.path.join(world.root, f'hf_{layout}'), world.model, layout,
                                 world.llm_tokenizer, world.qformer_tokenizer)
          for layout in ('safetensors', 'sharded-safetensors', 'sharded-bin')}


@pytest.fixture(scope='module')
def hf_converted(world, hf_sources):
  out = os.path.join(world.root, 'hf_converted')
  sources.convert(sources.prepare_hf_instructblip(hf_sources['safetensors'], configlib.load_config_file(TINY).model),
                  out, log=lambda message: None)
  return out


def test_hf_instructblip_converts_and_verifies(world, hf_sources, capsys, report):
  out = fresh(world, 'hf')
  status, printed, err = run_cli(capsys, 'hf-instructblip', hf_sources['safetensors'], '--out', out, '--config', TINY)
  assert status == 0, err
  assert 'reading 112 tensors (1.1 MiB)' in printed and 'K params' in printed
  status, printed, err = run_cli(capsys, 'verify', out, '--tolerance', '1e-5')
  assert status == 0 and 'OK' in printed, printed + err
  verified(report, 'hf-instructblip (safetensors)', out, verify.SourceSpec('hf-instructblip',
                                                                          {'source': hf_sources['safetensors']}))
  model = loading.load_model(out)
  assert model.llm_tokenizer and model.qformer_tokenizer
  assert conversation.load_qformer_tokenizer(model.qformer_tokenizer).convert_tokens_to_ids('[DEC]') == 127


@pytest.mark.parametrize('layout', ['sharded-safetensors', 'sharded-bin'])
def test_every_hf_file_layout_gives_the_same_params(world, hf_sources, hf_converted, layout):
  out = fresh(world, layout)
  sources.convert(sources.prepare_hf_instructblip(hf_sources[layout], configlib.load_config_file(TINY).model), out,
                  log=lambda message: None)
  expected, actual = flat_params(hf_converted), flat_params(out)
  assert expected.keys() == actual.keys()
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_round_trip_torch_jax_torch_keeps_every_tensor(world, hf_converted, capsys):
  out = fresh(world, 'exported')
  status, _, err = run_cli(capsys, 'export-hf', hf_converted, out)
  assert status == 0, err
  assert_exported_as(safetensors.torch.load_file(os.path.join(out, 'model.safetensors')), world.model.state_dict())
  reloaded, info = transformers.InstructBlipForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info
  assert os.path.isfile(os.path.join(out, 'tokenizer.json'))
  assert os.path.isfile(os.path.join(out, 'qformer_tokenizer', 'tokenizer.json'))
  assert not os.path.exists(os.path.join(out, 'stllm_heads.safetensors'))  # no ST-LLM heads in InstructBLIP


def test_sharded_export_has_an_index(world, hf_converted):
  out = fresh(world, 'exported_sharded')
  export.export_hf(hf_converted, out, max_shard_bytes=100_000, log=lambda message: None)
  with open(os.path.join(out, 'model.safetensors.index.json')) as f:
    weight_map = json.load(f)['weight_map']
  assert len(set(weight_map.values())) > 3
  assert sorted(weight_map) == sorted(world.model.state_dict())


# ------------------------------------------------------------------------------------------------ LAVIS

@pytest.fixture(scope='module')
def lavis_paths(world):
  return layouts.lavis_files(os.path.join(world.root, 'lavis'), world.model, world.cfg, world.llm_tokenizer)


def test_lavis_converts_and_verifies(world, lavis_paths, capsys, report):
  out = fresh(world, 'lavis')
  status, printed, err = run_cli(capsys, 'lavis', '--vit', lavis_paths['vit'], '--instructblip',
                                 lavis_paths['instructblip'], '--llm', lavis_paths['llm'], '--qformer-tokenizer',
                                 world.qformer_tokenizer, '--out', out, '--config', TINY)
  assert status == 0, err
  assert 'block 2 (the checkpoint\'s last) is dropped' in printed and '[PAD]' in printed
  verified(report, 'lavis (eva_vit_g.pth + InstructBLIP .pth + .bin)', out, verify.SourceSpec.resolve(out))
  params = flat_params(out)
  assert params['vision/blocks/layers/fc1/kernel'].shape[0] == world.cfg.vision.depth  # block 2 dropped
  state = world.model.state_dict()
  vicuna_rows = state['language_model.model.embed_tokens.weight'][:-1].double()
  np.testing.assert_allclose(params['llm/embed/embedding'][-1], vicuna_rows.mean(0).float().numpy(), rtol=1e-6)
  head_rows = state['language_model.lm_head.weight'][:-1].double()
  np.testing.assert_allclose(params['llm/lm_head/kernel'][:, -1], head_rows.mean(0).float().numpy(), rtol=1e-6)
  with open(os.path.join(out, 'model.json')) as f:
    model = json.load(f)
  assert model['ln_vision_eps'] == 1e-5 and model['llm']['vocab_size'] == world.cfg.llm.vocab_size
  loaded = loading.load_model(out)
  tokenizer = conversation.load_llm_tokenizer(loaded.llm_tokenizer)
  assert tokenizer.pad_token_id == world.cfg.llm.vocab_size - 1


def test_lavis_files_given_the_wrong_way_round_are_named(world, lavis_paths, capsys):
  out = fresh(world, 'lavis_swapped')
  status, _, err = run_cli(capsys, 'lavis', '--vit', lavis_paths['instructblip'], '--instructblip',
                           lavis_paths['vit'], '--llm', lavis_paths['llm'], '--out', out, '--config', TINY)
  assert_user_error(status, err, '--vit', 'does not hold EVA-ViT-g weights')
  assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------- ST-LLM

def test_stllm_conversation_checkpoint_converts_and_verifies(world, capsys, report):
  """bf16 sharded .bin, global-local MLP, no MVM head, the embedding saved twice, residual_index."""
  source = layouts.stllm_dir(fresh(world, 'stllm_conversation'), world.model, world.cfg, world.llm_tokenizer,
                             global_local=True, num_local_frames=4)
  out = fresh(world, 'stllm')
  status, printed, err = run_cli(capsys, 'stllm', source, '--qformer-tokenizer', world.qformer_tokenizer,
                                 '--dtype', 'bfloat16', '--out', out, '--config', TINY)
  assert status == 0, err
  assert 'video_input=global_local, 4 local frames' in printed and 'checked equal' in printed
  model = checkpoints.read_model_config(out)
  assert (model['video_input'], model['num_local_frames'], model['global_mlp_dim'], model['mvm_head']) == \
      ('global_local', 4, 16, False)
  assert model['llm']['param_dtype'] == 'bfloat16'
  verified(report, 'stllm conversation (bf16 .bin, 8 frames)', out, verify.SourceSpec.resolve(out), num_frames=8)

  exported = fresh(world, 'stllm_exported')
  status, _, err = run_cli(capsys, 'export-hf', out, exported)
  assert status == 0, err
  assert_exported_as(safetensors.torch.load_file(os.path.join(exported, 'model.safetensors')),
                     {name: tensor.to(torch.bfloat16) for name, tensor in world.model.state_dict().items()})
  heads = safetensors.torch.load_file(os.path.join(exported, 'stllm_heads.safetensors'))
  source_state = layouts.stllm_state(world.model, world.cfg, global_local=True, num_local_frames=4)
  assert sorted(heads) == ['down_proj.bias', 'down_proj.weight', 'up_proj.bias', 'up_proj.weight']
  for name, tensor in heads.items():
    assert torch.equal(tensor, source_state['model.stllm_model.' + name]), name
  with open(os.path.join(exported, 'stllm_config.json')) as f:
    assert json.load(f)['video_input'] == 'global_local'


def test_stllm_mvm_head_converts(world):
  source = layouts.stllm_dir(fresh(world, 'stllm_mvm'), world.model, world.cfg, world.llm_tokenizer,
                             mvm_head=True, embed_copy=False)
  out = fresh(world, 'stllm_mvm_out')
  sources.convert(sources.prepare_stllm(source, configlib.load_config_file(TINY).model), out, log=lambda m: None)
  params = flat_params(out)
  state = layouts.stllm_state(world.model, world.cfg, mvm_head=True, embed_copy=False)
  np.testing.assert_array_equal(params['mvm_dense/kernel'], state['model.stllm_model.mvm_decoder.head.weight'].float().numpy().T)
  np.testing.assert_array_equal(params['mvm_norm/scale'], state['model.stllm_model.mvm_decoder.norm.weight'].float().numpy())
  assert checkpoints.read_model_config(out)['mvm_head'] and checkpoints.read_model_config(out)['video_input'] == 'all'


QA_ADAPTER = dict(bt_adapter_depth=2, bt_adapter_frames=8)  # the tiny ViT has 2 blocks: the adapter reads both
QA_VIT = 'model.stllm_model.visual_encoder.'


@pytest.fixture(scope='module')
def qa_source(world):
  """The QA (MVBench) layout: bf16, an MVM head, no global-local MLP, a float16 BT-Adapter of 2 layer pairs."""
  return layouts.stllm_dir(os.path.join(world.root, 'stllm_qa'), world.model, world.cfg, world.llm_tokenizer,
                           mvm_head=True, **QA_ADAPTER)


@pytest.fixture(scope='module')
def qa_converted(world, qa_source):
  """(what the conversion logged, the QA checkpoint converted in float32)."""
  out, logged = os.path.join(world.root, 'stllm_qa_f32'), []
  prepared = sources.prepare_stllm(qa_source, configlib.load_config_file(TINY).model, world.qformer_tokenizer)
  sources.convert(prepared, out, log=logged.append)
  return logged, out


def test_stllm_qa_checkpoint_converts_with_its_bt_adapter(world, qa_converted):
  logged, out = qa_converted
  assert (f'note: BT-Adapter ({QA_VIT}BTAdapter_*, the QA model): 2 temporal + spatial layer pairs beside ViT '
          'blocks 0..1, at most 8 frames per video (model.vision.bt_adapter, params bt_adapter/)') in logged, logged
  model = checkpoints.read_model_config(out)
  assert (model['vision']['bt_adapter']['depth'], model['vision']['bt_adapter']['max_frames']) == (2, 8)
  assert (model['video_input'], model['mvm_head']) == ('all', True)
  params = flat_params(out)
  source = layouts.stllm_state(world.model, world.cfg, mvm_head=True, **QA_ADAPTER)
  adapter = lambda name: source[QA_VIT + name].float().numpy()
  np.testing.assert_array_equal(params['bt_adapter/temporal_1/temporal_fc/kernel'],
                                adapter('BTAdapter_T.1.temporal_fc.weight').T)
  np.testing.assert_array_equal(params['bt_adapter/spatial_0/attn/v_bias'].reshape(-1),
                                adapter('BTAdapter_S.0.attn.v_bias'))
  np.testing.assert_array_equal(params['bt_adapter/frame_position'], adapter('BTAdapter_position.weight'))


def test_stllm_qa_checkpoint_verifies_and_its_features_are_the_reference_towers(world, qa_converted, report,
                                                                                 parity):
  _, out = qa_converted
  verified(report, 'stllm QA with BT-Adapter (float32, 4 frames)', out, verify.SourceSpec.resolve(out),
           num_frames=4)
  loaded = loading.load_model(out)
  cfg = stllm.model_config(loaded.model_config)
  frames = np.random.default_rng(3).standard_normal((2, 4, 56, 56, 3)).astype(np.float32)
  ours = np.asarray(stllm.STLLM(cfg).apply({'params': loaded.params}, frames, method='vision_tokens'))
  source = layouts.stllm_state(world.model, world.cfg, mvm_head=True, **QA_ADAPTER)
  tower = reference.bt_adapter_tower(cfg.vision, {name[len(QA_VIT):]: tensor.float() for name, tensor in
                                                  source.items() if name.startswith(QA_VIT)})
  with torch.no_grad():
    theirs = tower(torch.tensor(frames.transpose(0, 1, 4, 2, 3)))  # [B*T, 1+P, W]
  assert parity('convert stllm QA: EVA-ViT + BT-Adapter features (tiny)', 'float32', ours.reshape(theirs.shape),
                theirs) <= 1e-5


def test_stllm_qa_round_trip_through_export_gives_identical_tensors(world, qa_converted, capsys):
  _, out = qa_converted
  exported = fresh(world, 'stllm_qa_exported')
  status, printed, err = run_cli(capsys, 'export-hf', out, exported)
  assert status == 0, err
  assert 'note: the BT-Adapter (visual_encoder.BTAdapter_*) is in stllm_heads.safetensors' in printed
  assert_exported_as(safetensors.torch.load_file(os.path.join(exported, 'model.safetensors')),
                     {name: tensor.to(torch.bfloat16).float() for name, tensor in world.model.state_dict().items()})
  heads = safetensors.torch.load_file(os.path.join(exported, 'stllm_heads.safetensors'))
  source = layouts.stllm_state(world.model, world.cfg, mvm_head=True, **QA_ADAPTER)
  released = {name[len('model.stllm_model.'):]: tensor for name, tensor in source.items()
              if 'BTAdapter_' in name or '.mvm_decoder.' in name}
  assert sorted(heads) == sorted(released)
  assert sum('BTAdapter_' in name for name in heads) == 2 + 2 * (9 + 13)  # cls, positions, 2 x (temporal, spatial)
  for name, tensor in released.items():
    assert heads[name].dtype == torch.float32 and torch.equal(heads[name], tensor.float()), name
  with open(os.path.join(exported, 'stllm_config.json')) as f:
    info = json.load(f)
  assert info['bt_adapter'] == dict(depth=2, max_frames=8, vit_blocks=[0, 1], temporal_norm_eps=1e-6,
                                    spatial_norm_eps=1e-5, drop_path=0.1)


def test_stllm_qa_checkpoint_in_bfloat16_verifies(world, qa_source, capsys, report):
  out = fresh(world, 'stllm_qa_bf16')
  status, _, err = run_cli(capsys, 'stllm', qa_source, '--dtype', 'bfloat16', '--out', out, '--config', TINY)
  assert status == 0, err
  assert {str(a.dtype) for path, a in flat_params(out).items() if path.startswith('bt_adapter/')} == {'bfloat16'}
  verified(report, 'stllm QA with BT-Adapter (bf16, 3 frames)', out, verify.SourceSpec.resolve(out),
           num_frames=3)


def test_a_qa_conversion_verifies_only_against_a_source_with_the_adapter(qa_converted, hf_sources, capsys):
  status, _, err = run_cli(capsys, 'verify', qa_converted[1], '--torch', hf_sources['safetensors'])
  assert_user_error(status, err, 'has a BT-Adapter (model.vision.bt_adapter.depth=2), which a hf-instructblip '
                    'source does not hold')


def _qa_source_with(world, edit):
  directory = fresh(world, 'stllm_qa_broken')
  state = layouts.stllm_state(world.model, world.cfg, **QA_ADAPTER)
  edit(state)
  layouts.write_config(directory, dict(world.model.config.text_config.to_dict(), model_type='st_llm_hf'))
  layouts.save_bin_shards(directory, state, 2)
  return directory


@pytest.mark.parametrize('edit, fragments', [
    (lambda s: s.pop(QA_VIT + 'BTAdapter_S.1.norm2.weight'),
     ['missing (no source tensor for these model parameters): 1',
      f'{QA_VIT}BTAdapter_S.1.norm2.weight -> bt_adapter/spatial_1/norm2/scale [64]']),
    (lambda s: s.update({QA_VIT + 'BTAdapter_X': torch.zeros(3)}),
     ['unused (no model parameter takes these source tensors): 1', f'{QA_VIT}BTAdapter_X']),
    (lambda s: s.update({QA_VIT + 'BTAdapter_T.1.temporal_fc.weight': torch.zeros(64, 63)}),
     ['mis-shaped', f'{QA_VIT}BTAdapter_T.1.temporal_fc.weight [63, 64] -> bt_adapter/temporal_1/temporal_fc/kernel '
      'expects [64, 64]']),
    (lambda s: s.update({QA_VIT + 'BTAdapter_S.2.mlp.fc1.bias': torch.zeros(128)}),
     ['unused', f'{QA_VIT}BTAdapter_S.2.mlp.fc1.bias [128] (would go to bt_adapter/spatial_2/fc1/bias, which the '
      'model does not have)']),
], ids=['missing', 'unknown-name', 'mis-shaped', 'spatial-layer-too-many'])
def test_a_mismatched_bt_adapter_is_named_and_nothing_is_written(world, capsys, edit, fragments):
  out = fresh(world, 'stllm_qa_broken_out')
  status, _, err = run_cli(capsys, 'stllm', _qa_source_with(world, edit), '--out', out, '--config', TINY)
  assert_user_error(status, err, 'does not match the model', 'Nothing was written', *fragments)
  assert_nothing_written(out)


def test_a_second_embedding_copy_that_differs_is_refused(world, capsys):
  source = fresh(world, 'stllm_bad_copy')
  state = layouts.stllm_state(world.model, world.cfg)
  state['model.stllm_model.embed_tokens.weight'] = state['model.embed_tokens.weight'].clone() + 1
  layouts.write_config(source, dict(world.model.config.text_config.to_dict(), model_type='st_llm_hf'))
  layouts.save_bin_shards(source, state, 2)
  out = fresh(world, 'stllm_bad_copy_out')
  status, _, err = run_cli(capsys, 'stllm', source, '--out', out, '--config', TINY)
  assert_user_error(status, err, 'model.stllm_model.embed_tokens.weight: should be a copy of model.embed_tokens.weight')
  assert_nothing_written(out)


# --------------------------------------------------------------------------------------------- hf-llama

def test_hf_llama_converts_verifies_and_exports(world, capsys, report):
  source = fresh(world, 'vicuna')
  world.model.language_model.save_pretrained(source)
  layouts.copy_tokenizer(world.llm_tokenizer, source)
  out = fresh(world, 'llama')
  status, printed, err = run_cli(capsys, 'hf-llama', source, '--out', out, '--config', TINY)
  assert status == 0, err
  assert set(checkpoints.stored_param_shapes(out)) == {k for k in flat_params(out) if k.startswith('llm/')}
  verified(report, 'hf-llama (LLM alone)', out, verify.SourceSpec.resolve(out))
  with pytest.raises(UserError, match=r'lacks .* params \(of ln_vision, projection, qformer, vision\)'):
    loading.load_model(out)
  exported = fresh(world, 'llama_exported')
  status, _, err = run_cli(capsys, 'export-hf', out, exported)
  assert status == 0, err
  tensors = safetensors.torch.load_file(os.path.join(exported, 'model.safetensors'))
  source_state = world.model.language_model.state_dict()
  assert sorted(tensors) == sorted(source_state)
  for name, tensor in source_state.items():
    assert torch.equal(tensors[name], tensor), name


# ------------------------------------------------------------------------------------------- strictness

def _broken_hf_dir(world, name, edit):
  directory = fresh(world, name)
  state = {k: v.clone() for k, v in world.model.state_dict().items()}
  edit(state)
  world.model.config.save_pretrained(directory)
  safetensors.torch.save_file(state, os.path.join(directory, 'model.safetensors'))
  return directory


@pytest.mark.parametrize('edit, fragments', [
    (lambda s: s.pop('language_model.model.layers.1.mlp.up_proj.weight'),
     ['missing (no source tensor for these model parameters): 1', 'llm/blocks/layers_1/mlp/up/kernel [64, 128]']),
    (lambda s: s.update({'language_model.model.layers.9.mlp.up_proj.weight': torch.zeros(128, 64)}),
     ['unused', 'language_model.model.layers.9.mlp.up_proj.weight [64, 128] (would go to '
      'llm/blocks/layers_9/mlp/up/kernel, which the model does not have)']),
    (lambda s: s.update({'language_projection.weight': torch.zeros(64, 47)}),
     ['mis-shaped', 'language_projection.weight [47, 64] -> projection/kernel expects [48, 64]']),
    (lambda s: s.update({'visual_encoder.BTAdapter_cls': torch.zeros(1, 1, 64)}),
     ['unused (no model parameter takes these source tensors): 1', 'visual_encoder.BTAdapter_cls']),
], ids=['missing', 'unused', 'mis-shaped', 'unknown-name'])
def test_a_mismatched_checkpoint_is_named_and_nothing_is_written(world, capsys, edit, fragments):
  source = _broken_hf_dir(world, 'broken', edit)
  out = fresh(world, 'broken_out')
  status, _, err = run_cli(capsys, 'hf-instructblip', source, '--out', out, '--config', TINY)
  assert_user_error(status, err, 'does not match the model', 'Nothing was written', *fragments)
  assert_nothing_written(out)


def test_user_errors_are_one_message_without_traceback(world, hf_sources, lavis_paths, capsys):
  out = fresh(world, 'errors')
  status, _, err = run_cli(capsys, 'hf-instructblip', os.path.join(world.root, 'no_such_dir'), '--out', out)
  assert_user_error(status, err, 'does not exist')
  status, _, err = run_cli(capsys, 'hf-instructblip', lavis_paths['llm'], '--out', out)
  assert_user_error(status, err, "holds a 'llama' model", 'python -m stllm_jax.convert hf-llama')
  status, _, err = run_cli(capsys, 'stllm', hf_sources['safetensors'], '--out', out)
  assert_user_error(status, err, "holds a 'instructblip' model", 'python -m stllm_jax.convert hf-instructblip')
  status, _, err = run_cli(capsys, 'hf-instructblip', hf_sources['safetensors'], '--out', out, '--mesh', 'fsdp=16')
  assert_user_error(status, err, '--mesh fsdp=16', 'xla_force_host_platform_device_count')
  assert_nothing_written(out)
  os.makedirs(out)
  with open(os.path.join(out, 'keep.txt'), 'w') as f:
    f.write('mine')
  status, _, err = run_cli(capsys, 'hf-instructblip', hf_sources['safetensors'], '--out', out)
  assert_user_error(status, err, 'already exists')
  assert os.listdir(out) == ['keep.txt']


def test_a_failure_while_writing_leaves_no_usable_directory(world, hf_sources, monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def fail(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(ocp.Checkpointer, 'save', fail)
  out = fresh(world, 'interrupted')
  with pytest.raises(OSError, match='disk full'):
    sources.convert(sources.prepare_hf_instructblip(hf_sources['safetensors'], configlib.load_config_file(TINY).model),
                    out, log=lambda message: None)
  assert_nothing_written(out)


def test_the_module_runs_as_a_program():
  result = subprocess.run([sys.executable, '-m', 'stllm_jax.convert', 'stllm', '/no/such/checkpoint', '--out', '/tmp/x'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == ["error: the ST-LLM checkpoint directory '/no/such/checkpoint' does not exist"]


# ------------------------------------------------------------------------------------- sharded writing

def test_sharded_writing_gives_per_shard_chunks_and_the_same_params(world, hf_sources, hf_converted, capsys):
  out = fresh(world, 'sharded')
  status, printed, err = run_cli(capsys, 'hf-instructblip', hf_sources['safetensors'], '--out', out, '--config',
                                 TINY, '--mesh', 'fsdp=8')
  assert status == 0, err
  assert 'sharded over mesh fsdp=8' in printed
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(os.path.join(os.path.abspath(out), 'params'))
  tree = metadata.item_metadata.tree
  # llm/embed/embedding [vocab, embed]: embed (64) over fsdp=8 -> each chunk is one device's [vocab, 8]
  assert tree['llm']['embed']['embedding'].storage.chunk_shape == (world.cfg.llm.vocab_size, 8)
  mesh = sharding.make_mesh('fsdp=8')
  loaded = loading.load_model(out, mesh)
  embedding = loaded.params['llm']['embed']['embedding']
  assert embedding.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
  expected, actual = flat_params(hf_converted), flax.traverse_util.flatten_dict(loaded.params, sep='/')
  for key in expected:
    np.testing.assert_array_equal(np.asarray(actual[key]), expected[key], err_msg=key)


def test_training_starts_from_converted_weights(world, hf_converted):
  """train.py reads a converted directory as `config.init.checkpoint` (fresh MVM head from init.new_params)."""
  config = configlib.load_config_file(TINY)
  config.model.llm.vocab_size = world.cfg.llm.vocab_size
  config.init.checkpoint = hf_converted
  model_cfg = stllm.model_config(config.model)
  mesh = sharding.make_mesh('fsdp=2')
  shardings = sharding.param_shardings(stllm.abstract_variables(model_cfg), mesh)
  messages = []
  params = loading.initial_params(config, model_cfg, shardings, messages.append)
  assert 'newly initialised: mvm_dense, mvm_norm' in messages[0]
  stored = flat_params(hf_converted)
  np.testing.assert_array_equal(np.asarray(params['qformer']['query_tokens']), stored['qformer/query_tokens'])
