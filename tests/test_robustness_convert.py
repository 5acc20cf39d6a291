"""Issue #16, a robustness review of `python -m stllm_jax.convert`: each case gives an input, the exit status
and the message the user reads.

The checkpoints are the tiny random models of tests/test_convert_cli.py (its `world` fixture), written in
each layout by tests/convert_layouts.py.
"""

import copy
import json
import os
import re

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import convert_layouts as layouts
from conftest import relative_error, torch_images
from stllm_jax import checkpoints, configlib, loading
from stllm_jax.convert import export, hf, mappings, sources, strict, verify
from stllm_jax.errors import UserError
from stllm_jax.models import stllm
from test_convert_cli import TINY, fresh, run_cli, world  # noqa: F401  (world: the module's fixture)


def one_line_error(status, err):
  """The `error: ...` message of a user error: exit status 2, one line, no traceback."""
  assert status == 2, err
  assert 'Traceback' not in err, err
  message = err[err.index('error: '):].strip()
  assert '\n' not in message, message
  return message


# ------------------------------------------------- 1. verify trusts pickles on the command line's word only

class OpensFile:
  """Unpickled, this object calls open(path, 'w'): a visible stand-in for the code a pickle can run."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return open, (self.path, 'w')


@pytest.fixture(scope='module')
def pickled_lavis(world):
  """LAVIS files whose InstructBLIP .pth also pickles an `OpensFile`, and the file it would create."""
  paths = layouts.lavis_files(os.path.join(world.root, 'lavis_pickled'), world.model, world.cfg, world.llm_tokenizer)
  marker = os.path.join(world.root, 'unpickled.marker')
  state = torch.load(paths['instructblip'], weights_only=True)
  torch.save(dict(state, config=OpensFile(marker)), paths['instructblip'])
  return paths, marker


def test_verify_unpickles_only_with_the_flag_whatever_conversion_json_says(world, pickled_lavis, capsys):
  paths, marker = pickled_lavis
  out = fresh(world, 'lavis_trusted')
  status, _, err = run_cli(capsys, 'lavis', '--vit', paths['vit'], '--instructblip', paths['instructblip'], '--llm',
                           paths['llm'], '--trust-pickle', '--out', out, '--config', TINY)
  assert status == 0, err
  assert checkpoints.conversion_info(out)['trust_pickle'] is True  # as a directory from someone else may say
  os.remove(marker)

  status, _, err = run_cli(capsys, 'verify', out)
  message = one_line_error(status, err)
  assert message == (f'error: {paths["instructblip"]} pickles Python objects besides tensors (e.g. '
                     f'{open.__module__}.open), so it is not loaded. If you trust the file (unpickling it can run '
                     'code), pass --trust-pickle.')
  assert not os.path.exists(marker)

  status, printed, err = run_cli(capsys, 'verify', out, '--trust-pickle', '--tolerance', '1e-5')
  assert status == 0 and 'OK' in printed, printed + err
  assert os.path.exists(marker)


# ------------------------------------------------ 2. an exported model runs `generate` in transformers

def test_an_exported_model_generates_in_transformers_with_our_logits(world, capsys, parity):
  source = layouts.hf_dir(fresh(world, 'hf_for_export'), world.model, 'safetensors', world.llm_tokenizer,
                          world.qformer_tokenizer)
  converted, exported = fresh(world, 'for_export'), fresh(world, 'exported')
  assert run_cli(capsys, 'hf-instructblip', source, '--out', converted, '--config', TINY)[0] == 0
  status, printed, err = run_cli(capsys, 'export-hf', converted, exported)
  assert status == 0, err
  vocab = world.cfg.llm.vocab_size
  assert f'<image> (id {vocab})' in printed

  model = transformers.InstructBlipForConditionalGeneration.from_pretrained(exported, dtype=torch.float32).eval()
  image_id = model.config.image_token_index
  assert image_id == vocab and model.config.text_config.vocab_size == vocab + 1  # a new token, as Hugging Face's
  assert transformers.AutoTokenizer.from_pretrained(exported).convert_tokens_to_ids('<image>') == image_id
  with open(os.path.join(exported, 'stllm_config.json')) as f:
    info = json.load(f)
  assert (info['image_token'], info['image_token_index']) == ('<image>', image_id)

  loaded = loading.load_model(converted)
  cfg = stllm.model_config(loaded.model_config)
  batch = verify.random_batch(loaded.model_config, num_frames=1, text_len=6, qformer_text_len=5, seed=0)
  ours = np.asarray(jax.jit(lambda p, b: stllm.STLLM(cfg).apply({'params': p}, b))(loaded.params, batch))
  visual = cfg.qformer.num_query_tokens
  inputs = dict(pixel_values=torch_images(batch['frames'][:, 0]),
                qformer_input_ids=torch.tensor(batch['qformer_input_ids']).long(),
                qformer_attention_mask=torch.tensor(batch['qformer_attention_mask']).long(),
                input_ids=torch.tensor([[image_id] * visual + batch['input_ids'][0].tolist()]),  # [V : text]
                attention_mask=torch.ones(1, visual + batch['input_ids'].shape[1], dtype=torch.long))
  with torch.no_grad():
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=[image_id],
                               output_logits=True, return_dict_in_generate=True)
  assert parity('export-hf -> transformers forward (tiny)', 'float32', ours, logits[..., :vocab]) <= 1e-5
  assert relative_error(ours[:, -1], generated.logits[0][:, :vocab]) <= 1e-5
  assert generated.sequences.shape[1] == inputs['input_ids'].shape[1] + 2
  assert image_id not in generated.sequences[0, -2:]


# ------------------------------------------- 3. a non-zero k bias of the ViT is dropped: softmax cancels it

def with_k_bias(model, layer, seed):
  """A copy of `model` whose ViT block `layer` has a random k third in its fused qkv bias."""
  model = copy.deepcopy(model)
  bias = model.vision_model.encoder.layers[layer].self_attn.qkv.bias
  width = bias.shape[0] // 3
  k_bias = torch.randn(width, generator=torch.Generator().manual_seed(seed)) * 0.5
  with torch.no_grad():
    bias[width:2 * width] = k_bias
  return model, float(k_bias.abs().max())


def test_a_nonzero_k_bias_converts_exactly_with_a_note_and_exports_as_zeros(world, capsys):
  model, k_max = with_k_bias(world.model, layer=1, seed=3)
  source = layouts.hf_dir(fresh(world, 'hf_k_bias'), model, 'safetensors', world.llm_tokenizer,
                          world.qformer_tokenizer)
  out = fresh(world, 'k_bias')
  status, printed, err = run_cli(capsys, 'hf-instructblip', source, '--out', out, '--config', TINY)
  assert status == 0, err
  note = (f'the k third of vision_model.encoder.layers.N.self_attn.qkv.bias is not zero in 1 of '
          f'{world.cfg.vision.depth} layers (N = 1; max |k| {k_max:.3g}): dropped, exactly')
  assert f'note: {note}' in printed, printed
  assert 'vision/blocks/layers_N/attn/q_bias' in printed
  assert any(n.startswith(note) for n in checkpoints.conversion_info(out)['notes'])
  result = verify.verify(out, verify.SourceSpec('hf-instructblip', {'source': source}), log=lambda message: None)
  assert result.relative_error <= 1e-5, result

  exported = fresh(world, 'k_bias_exported')
  status, _, err = run_cli(capsys, 'export-hf', out, exported)
  assert status == 0, err
  written = safetensors.torch.load_file(os.path.join(exported, 'model.safetensors'))
  name = 'vision_model.encoder.layers.1.self_attn.qkv.bias'
  q, k, v = written[name].chunk(3)
  q_source, _, v_source = model.state_dict()[name].chunk(3)
  assert torch.equal(q, q_source) and torch.equal(v, v_source) and not k.any()


# ----------------------------------------- 4. a tensor the source lacks is named by its source name too

def without(state, name):
  return {k: v for k, v in state.items() if k != name}


def hf_source_without(world, name):
  directory = fresh(world, 'hf_without')
  world.model.config.save_pretrained(directory)
  safetensors.torch.save_file(without(world.model.state_dict(), name), os.path.join(directory, 'model.safetensors'))
  return ['hf-instructblip', directory]


def lavis_source_without(world, name):
  paths = layouts.lavis_files(fresh(world, 'lavis_without'), world.model, world.cfg, world.llm_tokenizer)
  torch.save(without(torch.load(paths['vit'], weights_only=True), name), paths['vit'])
  return ['lavis', '--vit', paths['vit'], '--instructblip', paths['instructblip'], '--llm', paths['llm']]


def stllm_source_without(world, name):
  directory = fresh(world, 'stllm_without')
  layouts.write_config(directory, dict(world.model.config.text_config.to_dict(), model_type='st_llm_hf'))
  layouts.save_bin_shards(directory, without(layouts.stllm_state(world.model, world.cfg), name), 2)
  return ['stllm', directory]


@pytest.mark.parametrize('source, dropped, lines', [
    (hf_source_without, 'language_model.model.layers.1.mlp.up_proj.weight',
     ['language_model.model.layers.1.mlp.up_proj.weight -> llm/blocks/layers_1/mlp/up/kernel [64, 128]']),
    (hf_source_without, 'vision_model.encoder.layers.0.self_attn.qkv.bias',
     ['vision_model.encoder.layers.0.self_attn.qkv.bias -> vision/blocks/layers_0/attn/q_bias [4, 16]',
      'vision_model.encoder.layers.0.self_attn.qkv.bias -> vision/blocks/layers_0/attn/v_bias [4, 16]']),
    (hf_source_without, 'qformer.encoder.layer.0.crossattention.attention.key.bias',
     ['qformer.encoder.layer.0.crossattention.attention.key.bias -> '
      'qformer/layers_0/cross_attention/key/bias [4, 12]']),
    (lavis_source_without, 'blocks.1.norm2.weight',
     ['visual_encoder.blocks.1.norm2.weight -> vision/blocks/layers_1/norm2/scale [64]']),
    (stllm_source_without, 'model.stllm_model.Qformer.bert.encoder.layer.1.output_query.dense.weight',
     ['model.stllm_model.Qformer.bert.encoder.layer.1.output_query.dense.weight -> '
      'qformer/layers_1/query_ffn/fc2/kernel [96, 48]']),
], ids=['hf-llm', 'hf-fused-qkv-bias', 'hf-qformer', 'lavis-vit', 'stllm-qformer'])
def test_a_dropped_source_tensor_is_named_beside_its_parameter(world, capsys, source, dropped, lines):
  out = fresh(world, 'without_out')
  status, _, err = run_cli(capsys, *source(world, dropped), '--out', out, '--config', TINY)
  assert status == 2 and 'Traceback' not in err, err
  listed = [line.strip() for line in err[err.index('error: '):].splitlines()]
  assert listed[1] == f'missing (no source tensor for these model parameters): {len(lines)}', err
  assert listed[2:2 + len(lines)] == lines, err
  assert listed[-1] == 'Nothing was written.'


def test_the_notes_name_the_source_tensors_a_conversion_drops(world):
  base = configlib.load_config_file(TINY).model
  paths = layouts.lavis_files(fresh(world, 'lavis_notes'), world.model, world.cfg, world.llm_tokenizer)
  notes = sources.prepare_lavis(paths['vit'], paths['instructblip'], paths['llm'], base).notes
  assert ('EVA-ViT-g block 2 (the checkpoint\'s last) is dropped: its tensors visual_encoder.blocks.2.* fill no '
          'parameter (BLIP-2 uses the 2 blocks before it, vision/blocks/layers_0..1)') in notes
  source = layouts.stllm_dir(fresh(world, 'stllm_notes'), world.model, world.cfg, world.llm_tokenizer)
  notes = sources.prepare_stllm(source, base).notes
  assert ('the second copy of the LLM embedding, model.stllm_model.embed_tokens.weight, is checked equal to '
          'model.embed_tokens.weight (-> llm/embed/embedding) and not stored') in notes


def layout_tensors_and_rules(world, layout):
  """({source name: tensor}, rules) of `layout`, for the tiny model of `world`."""
  inv_freq = hf.rope_inv_freq_check(world.cfg.llm)
  state = world.model.state_dict()
  if layout == 'hf-instructblip':
    return state, mappings.hf_instructblip_rules(inv_freq)
  if layout == 'lavis':
    return layouts.lavis_tensors(state), mappings.lavis_rules(world.cfg.vision.depth, inv_freq, 0)
  if layout == 'stllm':
    return (layouts.stllm_state(world.model, world.cfg, global_local=True, mvm_head=True, bt_adapter_depth=2),
            mappings.stllm_rules(inv_freq, 4))
  return world.model.language_model.state_dict(), mappings.llama_rules('', 'llm/', inv_freq)


@pytest.mark.parametrize('layout', ['hf-instructblip', 'lavis', 'stllm', 'hf-llama'])
def test_every_parameter_names_the_source_tensor_that_fills_it(world, layout):
  tensors, rules = layout_tensors_and_rules(world, layout)
  named = 0
  for name, tensor in tensors.items():
    m, transform = next((m, fn) for pattern, fn in rules if (m := re.fullmatch(pattern, name)))
    for path, _ in transform(m, strict.to_numpy(tensor)):
      if not path.startswith(strict.SAME_AS):
        assert strict.expected_source(rules, path) == name, path
        named += 1
  assert named >= 20


def test_an_export_that_does_not_fit_names_the_hugging_face_tensor_and_our_param():
  get = export.ReadOnce({'projection/kernel': np.zeros((48, 64), np.float32),
                         'projection/bias': np.zeros((64,), np.float32)})
  rules = mappings.hf_instructblip_rules()
  with pytest.raises(UserError) as err:
    export.dry_run([('language_projection.weight', (64, 47)), ('language_projection.bias', (64,))],
                   lambda name, shape: mappings.export_tensor(rules, name, shape, get), get)
  assert str(err.value).splitlines() == [
      'the weights do not map onto the Hugging Face layout:',
      '  language_projection.weight (from projection/kernel [48, 64]): cannot reshape array of size 3072 into '
      'shape (47,64)']
