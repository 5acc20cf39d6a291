"""Shared fixtures: tiny configs, tiny random Hugging Face reference models, and a parity report.

8 simulated CPU devices are requested before JAX is imported, so sharding tests can build a 2x2x2 mesh;
single-device code runs on the first of them. Programs compile fast (see jax_env.py).
"""

import json
import os
import tempfile

import jax_env

os.environ.setdefault('XLA_FLAGS', jax_env.xla_flags(device_count=8))
# One compilation cache for the session and the subprocesses it starts, of every program however quickly it
# compiles: a program compiles once (the processes of the multi-process and SIGKILL tests compile alike).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='stllm_jax_test_xla_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from stllm_jax.convert import hf  # noqa: E402
from stllm_jax.models import stllm  # noqa: E402

jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
torch.set_num_threads(2)
transformers.logging.set_verbosity_error()

_REPORT = {}  # section -> lines, printed at the end of the run (measured numbers worth reading)


def relative_error(ours, reference) -> float:
  """||ours - reference|| / ||reference||, in float64."""
  ours = np.asarray(ours, np.float64)
  reference = np.asarray(reference.detach().float().numpy() if hasattr(reference, 'detach') else reference,
                         np.float64)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


PARITY_SECTION = 'parity against Hugging Face PyTorch: ||jax - torch|| / ||torch||'


@pytest.fixture
def report():
  """report(section, line): a line for the summary printed after the tests."""
  return lambda section, line: _REPORT.setdefault(section, []).append(line)


@pytest.fixture
def parity(report):
  """parity(component, dtype, ours, reference) -> relative error, also listed in the summary."""
  def record(component, dtype, ours, reference):
    err = relative_error(ours, reference)
    report(PARITY_SECTION, f'{component:<52} {dtype:<9} {err:.2e}')
    return err
  return record


# The test files that take longest (seconds on one of 2 pytest-xdist workers), handed out first so that no long
# file is left running alone at the end; the others follow in name order. Tests keep their order within a file.
LONGEST_FIRST = ('test_demo.py', 'test_robustness.py', 'test_benchmark.py', 'test_multiprocess.py', 'test_generate.py',
                 'test_convert_cli.py', 'test_step.py', 'test_bt_adapter.py', 'test_train.py', 'test_evaluate.py',
                 'test_serve.py', 'test_tower_pretraining.py')


def pytest_collection_modifyitems(items):
  rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session):
  """Under pytest-xdist, a worker hands its report lines to the controller, which prints them."""
  if hasattr(session.config, 'workeroutput'):
    session.config.workeroutput['report'] = json.dumps(_REPORT)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  for section, lines in json.loads(node.workeroutput.get('report', '{}')).items():
    _REPORT.setdefault(section, []).extend(lines)


def pytest_terminal_summary(terminalreporter):
  for section, lines in sorted(_REPORT.items()):
    terminalreporter.write_sep('-', section)
    for line in lines:
      terminalreporter.write_line(line)


def tiny_hf_instructblip_config(num_kv_heads=2, tie_word_embeddings=False):
  """A tiny InstructBLIP with every structural feature of the 7B one (GQA in the LLM for coverage)."""
  return transformers.InstructBlipConfig(
      vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         image_size=28, patch_size=14, layer_norm_eps=1e-6),
      qformer_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                          vocab_size=60, max_position_embeddings=40, encoder_hidden_size=48,
                          cross_attention_frequency=2),
      text_config=dict(model_type='llama', vocab_size=80, hidden_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=num_kv_heads, intermediate_size=96,
                       max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
                       rope_parameters=dict(rope_type='default', rope_theta=10000.0)),
      num_query_tokens=4, image_token_index=79)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter random (HF initialises some to zeros or ones, which would hide mapping mistakes)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('qkv.bias'):  # keep BLIP's structural zero k bias
        d = p.shape[0] // 3
        p[:d] = torch.randn(d, generator=gen) * 0.1
        p[2 * d:] = torch.randn(d, generator=gen) * 0.1
      elif 'norm' in name.lower() and name.endswith('weight'):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
  return model.eval()


@pytest.fixture(scope='session')
def hf_instructblip():
  torch.manual_seed(0)
  model = transformers.InstructBlipForConditionalGeneration(tiny_hf_instructblip_config())
  return randomize_(model, seed=1)


def convert(hf_model, **overrides):
  """(our config.model, params) from a HF InstructBLIP; `overrides` set non-architecture fields
  (e.g. dtype='bfloat16', vision={'scan_layers': False})."""
  base = stllm.default_config()
  for key, value in overrides.items():
    if isinstance(value, dict):
      base[key].update(value)
    else:
      base[key] = value
  return hf.load_hf_instructblip(hf_model.state_dict(), hf_model.config, base=base)


@pytest.fixture(scope='session')
def converted(hf_instructblip):
  """(our config.model, params) converted from the tiny HF InstructBLIP."""
  return convert(hf_instructblip)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def random_batch(rng, cfg, batch_size=2, num_frames=1, text_len=6, qformer_text_len=5):
  """Random normalised frames and ids, with right padding in the last sample of both texts."""
  size = cfg.vision.image_size
  qmask = np.ones((batch_size, qformer_text_len), np.int32)
  qmask[-1, qformer_text_len // 2 + 1:] = 0
  mask = np.ones((batch_size, text_len), np.int32)
  mask[-1, text_len // 2 + 1:] = 0
  return dict(
      frames=rng.standard_normal((batch_size, num_frames, size, size, 3)).astype(np.float32),
      qformer_input_ids=rng.integers(1, cfg.qformer.vocab_size, (batch_size, qformer_text_len)).astype(np.int32),
      qformer_attention_mask=qmask,
      input_ids=rng.integers(1, cfg.llm.vocab_size - 1, (batch_size, text_len)).astype(np.int32),
      attention_mask=mask)


def torch_images(frames):
  """[N, H, W, 3] channels-last numpy -> NCHW torch."""
  return torch.tensor(np.asarray(frames).transpose(0, 3, 1, 2))


def hf_visual_tokens(model, batch):
  """Hugging Face reference for every frame: vision -> Q-Former(+instruction) -> projection; [B, T, K, D]."""
  frames = batch['frames']
  b, t = frames.shape[:2]
  with torch.no_grad():
    image_tokens = model.vision_model(pixel_values=torch_images(frames.reshape(b * t, *frames.shape[2:])))[0]
    return hf_frame_tokens(model, image_tokens, batch)


def hf_frame_tokens(model, image_tokens, batch):
  """Hugging Face Q-Former(+instruction) and projection of every frame's image tokens [B*T, P, Dv] (after
  ln_vision); [B, T, K, D]. Differentiable (callers choose no_grad)."""
  b, t = batch['frames'].shape[:2]
  k = model.config.num_query_tokens
  qids = torch.tensor(batch['qformer_input_ids']).repeat_interleave(t, 0)
  qmask = torch.tensor(batch['qformer_attention_mask']).long().repeat_interleave(t, 0)
  queries = model.qformer(
      input_ids=qids, attention_mask=torch.cat([torch.ones(b * t, k, dtype=torch.long), qmask], 1),
      query_embeds=model.query_tokens.expand(b * t, -1, -1), encoder_hidden_states=image_tokens,
      encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long))[0][:, :k]
  tokens = model.language_projection(queries)
  return tokens.reshape(b, t, k, -1)


def hf_llm_logits(model, visual_tokens, batch):
  """Hugging Face LLaMA on [visual tokens : text embeddings] as inputs_embeds."""
  with torch.no_grad():
    lm = model.language_model
    text = lm.get_input_embeddings()(torch.tensor(batch['input_ids']).long())
    embeds = torch.cat([visual_tokens, text], 1)
    mask = torch.cat([torch.ones(visual_tokens.shape[:2], dtype=torch.long),
                      torch.tensor(batch['attention_mask']).long()], 1)
    return lm(inputs_embeds=embeds, attention_mask=mask).logits


@pytest.fixture(scope='session')
def tiny_config():
  """configs/tiny.py (a fresh copy per use: callers may change it)."""
  from stllm_jax import configlib  # pylint: disable=g-import-not-at-top
  return lambda: configlib.load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py'))


@pytest.fixture(scope='session')
def tiny_params(tiny_config):
  """Random params of the tiny model (with the MVM head), initialised once per session."""
  return stllm.init_params(tiny_config().model, jax.random.key(0))
