"""Peak host memory of a conversion, measured on a random model of about 1B parameters (run by hand).

    python -m stllm_jax.convert.memory_check --workdir /tmp/stllm_convert_memory

Writes random checkpoints of a model with the 7B model's vision tower (EVA-ViT-g, 1.0 B params) and Q-Former
and a small LLaMA (1.2 B params in all) in two source layouts, then converts each in a child process under
`/usr/bin/time -v` and reports its peak resident memory ("Maximum resident set size") against the size of
the output:
  one float32 model.safetensors (memory-mapped)                 -> float32
  bfloat16 pytorch_model-*.bin shards + index (as ST-LLM ships)  -> bfloat16
  the same, written sharded over fsdp=8 simulated CPU devices (--mesh fsdp=8)
The ratio includes the fixed cost of the process (Python, JAX, PyTorch, transformers, tokenizers), measured
on a tiny model and also reported subtracted.
Nothing here runs in the tests: it takes minutes and about 3x the model size on disk.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

import numpy as np

from stllm_jax.convert import hf
from stllm_jax.convert.tensor_files import format_bytes, write_safetensors
from stllm_jax.models import stllm


def model_config():
  """The 7B model's vision tower and Q-Former with a small LLaMA: about 1.2 B params."""
  cfg = stllm.default_config()
  cfg.llm.update(vocab_size=32001, width=1024, num_layers=4, num_heads=16, num_kv_heads=16, mlp_dim=2816)
  return cfg


def tiny_config():
  """A model of a few hundred thousand params: its conversion's peak RSS is the fixed cost of the process."""
  cfg = stllm.default_config()
  cfg.vision.update(image_size=56, width=64, depth=2, num_heads=4, mlp_dim=128)
  cfg.qformer.update(width=48, num_layers=2, num_heads=4, mlp_dim=96, vocab_size=128, max_positions=64,
                     num_query_tokens=8)
  cfg.llm.update(vocab_size=256, width=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=128)
  return cfg


def hf_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
  from stllm_jax.convert import export  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.InstructBlipConfig(**{k: v for k, v in hf.hf_instructblip_config(cfg).items()
                                              if k != 'model_type'})
  return export.hf_tensor_specs(transformers.InstructBlipForConditionalGeneration, config), config


def random_tensor(name: str, shape: tuple[int, ...], dtype, rng: np.random.Generator) -> np.ndarray:
  if name.endswith('qkv.bias'):  # BLIP's zero k bias
    third = shape[0] // 3
    return np.concatenate([rng.standard_normal(third), np.zeros(third), rng.standard_normal(third)]).astype(dtype)
  return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)


def write_hf_safetensors(directory: str, cfg) -> None:
  specs, config = hf_specs(cfg)
  os.makedirs(directory)
  config.save_pretrained(directory)
  rng = np.random.default_rng(0)
  shapes = dict(specs)
  write_safetensors(os.path.join(directory, 'model.safetensors'), [(n, s, np.float32) for n, s in specs],
                    lambda n: random_tensor(n, shapes[n], np.float32, rng), {'format': 'pt'})


def write_hf_bin_shards(directory: str, cfg, num_shards: int = 3) -> None:
  """The same model as bfloat16 pytorch_model-*.bin shards with an index (the layout of the ST-LLM release)."""
  import json  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  specs, config = hf_specs(cfg)
  os.makedirs(directory)
  config.save_pretrained(directory)
  rng = np.random.default_rng(0)
  weight_map = {}
  for i, group in enumerate(np.array_split(np.arange(len(specs)), num_shards)):
    filename = f'pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin'
    shard = {specs[j][0]: torch.from_numpy(random_tensor(*specs[j], np.float32, rng)).to(torch.bfloat16)
             for j in group}
    torch.save(shard, os.path.join(directory, filename))
    weight_map.update({name: filename for name in shard})
    del shard
  with open(os.path.join(directory, 'pytorch_model.bin.index.json'), 'w') as f:
    json.dump({'weight_map': weight_map}, f)


def measure(command: list[str], env: dict[str, str]) -> int:
  """Peak RSS (bytes) of `command` under /usr/bin/time -v."""
  result = subprocess.run(['/usr/bin/time', '-v', *command], capture_output=True, text=True, env=env)
  if result.returncode:
    raise RuntimeError(f'{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
  kib = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)', result.stderr).group(1))
  return kib * 1024


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/stllm_convert_memory')
  args = parser.parse_args()
  if not os.path.exists('/usr/bin/time'):
    sys.exit('error: /usr/bin/time is missing (apt-get install time)')
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  cfg = model_config()
  template = stllm.abstract_variables(cfg)
  import jax  # pylint: disable=g-import-not-at-top
  num_params = sum(int(np.prod(x.value.shape)) for x in jax.tree_util.tree_leaves(
      template, is_leaf=lambda x: hasattr(x, 'value')))
  print(f'model: {num_params / 1e9:.2f} B params')
  safetensors_dir, bin_dir = os.path.join(args.workdir, 'safetensors'), os.path.join(args.workdir, 'bin')
  tiny_dir = os.path.join(args.workdir, 'tiny')
  write_hf_safetensors(tiny_dir, tiny_config())
  write_hf_safetensors(safetensors_dir, cfg)
  write_hf_bin_shards(bin_dir, cfg)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  convert = [sys.executable, '-m', 'stllm_jax.convert', 'hf-instructblip']
  runs = [('model.safetensors float32 -> float32', [*convert, safetensors_dir], 4),
          ('3 .bin shards bfloat16 -> bfloat16', [*convert, bin_dir, '--dtype', 'bfloat16'], 2),
          ('3 .bin shards bfloat16 -> bfloat16, --mesh fsdp=8', [*convert, bin_dir, '--dtype', 'bfloat16',
                                                                  '--mesh', 'fsdp=8'], 2)]
  fixed = measure([*convert, tiny_dir, '--out', os.path.join(args.workdir, 'tiny_out')], env)
  print(f'fixed cost (peak RSS converting a tiny model): {format_bytes(fixed)}')
  print(f'{"conversion":<50} {"peak RSS":>10} {"output":>10} {"ratio":>6} {"(peak - fixed) / output":>24}')
  for i, (name, command, itemsize) in enumerate(runs):
    out = os.path.join(args.workdir, f'out{i}')
    peak = measure([*command, '--out', out], env)
    size = num_params * itemsize
    print(f'{name:<50} {format_bytes(peak):>10} {format_bytes(size):>10} {peak / size:6.2f} '
          f'{(peak - fixed) / size:24.2f}')
    shutil.rmtree(out)


if __name__ == '__main__':
  main()
