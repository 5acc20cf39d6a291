"""The benchmark's commands on the tiny config (no timing assertions), its FLOP counter against a hand
count, the memory plan's per-device bytes, and its one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax_env

from stllm_jax import configlib
from stllm_jax.benchmark import cli, devices, flops, profile_bench
from stllm_jax.errors import UserError
from stllm_jax.models import stllm

REPO = os.path.join(os.path.dirname(__file__), '..')
TINY = os.path.join(REPO, 'configs', 'tiny.py')
ONE_DEVICE = '--config.mesh=fsdp=1'


def run(tmp_path, *argv):
  out = str(tmp_path / 'result.json')
  result = cli.main([*argv, '--out', out])
  with open(out) as f:
    assert json.load(f)['command'] == argv[0]
  return result


def check_train(result, steps):
  assert result['setup']['steps'] == steps
  assert result['compiled_programs'] >= 1
  assert result['step_time']['median_s'] > 0 and result['step_time']['n'] >= 1
  assert result['tokens_per_s'] > 0 and result['frames_per_s'] > 0
  assert result['flops_per_step_analytic_mean'] > 0
  cost = result['cost_check']
  assert cost['xla_flops'] > 0 and 0.5 < cost['analytic_over_xla'] < 1.5
  assert result['tflops_per_s'] > 0
  assert result['mfu'] is None  # CPU: no peak in the table
  assert cost['memory_analysis']['total_bytes'] > 0


def test_train_two_steps(tmp_path, report):
  result = run(tmp_path, 'train', '--config', TINY, '--steps', '2', '--mask', 'both', '--mask-rate', '0.5', ONE_DEVICE)
  check_train(result, 2)
  assert result['setup']['mvm'] and all(r['n_keep'] == 16 and r['n_slots'] == 18 and r['unmasked_s'] > 0
                                        for r in result['steps_log'])  # 32 - int(0.5 * 32) kept in 18 slots
  assert result['compiled_programs'] == 2 <= result['bucket_combinations'] == 4 * 2  # (13, 18, 23, 32) x (16, 24)
  assert result['unmasked']['masked_over_unmasked_median'] > 0
  assert result['cost_check']['program'].startswith('unrolled variant')  # configs/tiny.py scans its layers
  report('benchmark (tiny, 2 steps, smoke only)',
         f"train: analytic / XLA FLOPs {result['cost_check']['analytic_over_xla']:.3f}")


def test_train_against_torch_two_steps(tmp_path):
  result = run(tmp_path, 'train', '--config', TINY, '--steps', '2', '--mask', 'off', '--against', 'torch', ONE_DEVICE)
  check_train(result, 2)
  assert not result['setup']['mvm']  # the A/B runs without MVM on both sides
  assert all(r['n_keep'] == 32 and r['torch_s'] > 0 for r in result['steps_log'])
  assert result['torch']['jax_over_torch_median'] > 0
  assert result['device']['cpu_isa']['xla'] and result['device']['cpu_isa']['torch']  # both sides' vector ISA


def test_profile_sums_the_traced_operations_by_kind(tmp_path):
  trace_dir = str(tmp_path / 'trace')
  result = run(tmp_path, 'profile', '--config', TINY, '--steps', '1', '--warmup', '1', '--top', '4',
               '--trace-dir', trace_dir, ONE_DEVICE)
  assert len(result['untraced_step_s']) == len(result['traced_step_s']) == 1
  assert result['setup']['n_keep'] == 16 and result['setup']['mask_rate'] == 0.5  # 32 - int(0.5 * 32)
  top = result['top_ops']
  assert len(top) == 4 and [op['thread_ms_per_step'] for op in top] == sorted(
      (op['thread_ms_per_step'] for op in top), reverse=True)
  assert all('.' not in op['kind'] and 0 < op['share'] <= 1 for op in top)
  assert 0 < result['matmul_wall_ms_per_step'] <= result['execution_wall_ms_per_step']
  assert result['execution_wall_ms_per_step'] <= 1000 * result['traced_step_s'][0]
  assert os.path.isdir(trace_dir)


def test_profile_summary_of_hand_made_events():
  events = [
      {'ph': 'X', 'name': 'ynn_fusion.3', 'ts': 0, 'dur': 400},  # matmuls: [0, 400) and [300, 700) overlap
      {'ph': 'X', 'name': 'ynn_fusion.7', 'ts': 300, 'dur': 400},
      {'ph': 'X', 'name': 'copy_bitcast_fusion', 'ts': 800, 'dur': 200},
      {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'ts': 0, 'dur': 5000},  # runtime span: not an operation
      {'ph': 'X', 'name': '$train_bench.py:41 __call__', 'ts': 0, 'dur': 5000},  # Python frame
      {'ph': 'i', 'name': 'dot.1', 'ts': 10},  # not a complete event
  ]
  summary = profile_bench.summarise_events(events, steps=2, top=5)
  assert summary['matmul_wall_ms_per_step'] == pytest.approx(0.35)  # 700 us over 2 steps
  assert summary['execution_wall_ms_per_step'] == pytest.approx(0.45)
  assert summary['op_thread_ms_per_step'] == pytest.approx(0.5)
  assert [(op['kind'], op['count_per_step'], op['matmul']) for op in summary['top_ops']] == [
      ('ynn_fusion', 1.0, True), ('copy_bitcast_fusion', 0.5, False)]
  with pytest.raises(UserError, match='no XLA operations'):
    profile_bench.summarise_events(events[3:], steps=1, top=5)


def test_generate_against_torch(tmp_path):
  result = run(tmp_path, 'generate', '--config', TINY, '--frames', '2', '--new-tokens', '16', '--repeats', '2',
               '--against', 'torch', ONE_DEVICE)
  assert result['setup']['prefix_len'] == 2 * 8 + 32
  for side in ('jax', 'torch'):
    assert result[side]['prefill_s'] > 0 and result[side]['total_s'] > 0
  # None only where timer noise exceeds 15 tokens of decoding (a loaded host); no timing is asserted
  assert result['decode_speedup_over_torch'] is None or result['decode_speedup_over_torch'] > 0
  assert result['prefill_speedup_over_torch'] > 0
  assert result['prefill_flops'] > 0


def test_plan_per_device_bytes_add_up(tmp_path):
  result = run(tmp_path, 'plan', '--config', TINY, '--mesh', 'fsdp=8', '--batch-size', '16', '--grad-accum', '2',
               '--text-len', '24')
  assert result['devices'] == 8 and result['micro_batch_per_device'] == 1
  trainable, per_device = result['trainable_params_total_bytes'], result['trainable_params_bytes_per_device']
  # Every matrix of the tiny model splits 8 ways along `embed`; only norms and biases are replicated.
  assert trainable / 8 <= per_device < 1.1 * trainable / 8
  assert result['optimizer_state_bytes_per_device'] >= 2 * per_device  # Adam's two moments (+ the count)
  assert result['gradients_bytes_per_device'] == per_device
  analysis = result['memory_analysis']
  inputs = (per_device + result['frozen_params_bytes_per_device'] + result['optimizer_state_bytes_per_device']
            + result['batch_bytes_per_device'])
  assert 0 <= analysis['argument_bytes'] - inputs <= 64  # + the step counter and the PRNG key
  assert analysis['temp_bytes'] > 0
  assert result['fits'] == {'40GiB': True, '80GiB': True}


def test_flops_match_a_hand_count():
  """configs/tiny.py: batch 2, 4 frames of 56x56 (16 patches + CLS = 17 tokens), Q-Former text 8, LLM text 16,
  13 of the 32 visual tokens kept, MVM on. Every matmul written out; 2 FLOPs per multiply-add."""
  from stllm_jax import configlib  # pylint: disable=g-import-not-at-top
  cfg = stllm.model_config(configlib.load_config_file(TINY).model)
  frames = 2 * 4
  # EVA-ViT per frame: width 64, 2 blocks, MLP 128, 17 tokens, bidirectional attention.
  patch_embed = 2 * 16 * (14 * 14 * 3) * 64
  vit_block = (2 * 17 * 64 * (3 * 64)  # qkv
               + 2 * 17 * 17 * 64  # scores
               + 2 * 17 * 17 * 64  # values
               + 2 * 17 * 64 * 64  # out
               + 2 * 17 * 64 * 128  # fc1
               + 2 * 17 * 128 * 64)  # fc2
  vision = frames * (patch_embed + 2 * vit_block)
  # Q-Former per frame: width 48, 2 layers, FFN 96, 8 queries + 8 text tokens; cross-attention in layer 0 only.
  self_attention = 4 * (2 * 16 * 48 * 48) + 2 * (2 * 16 * 16 * 48)
  cross_attention = (2 * 8 * 48 * 48  # query
                     + 2 * 17 * 64 * 48  # key from the 17 image tokens of width 64
                     + 2 * 17 * 64 * 48  # value
                     + 2 * (2 * 8 * 17 * 48)  # scores and values
                     + 2 * 8 * 48 * 48)  # out
  ffns = 2 * (2 * 8 * 48 * 96) + 2 * (2 * 8 * 48 * 96)  # query FFN on 8, text FFN on 8
  qformer = frames * (2 * (self_attention + ffns) + cross_attention)
  projection = frames * 8 * (2 + 2) * 48 * 64  # forward + weight gradient (its input is frozen)
  # LLaMA: width 64, 4 heads of 16, 2 KV heads, MLP 128, 2 layers; sequence 13 + 16 = 29; training = 3x forward.
  per_token_layer = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)
  llm = 2 * 3 * 29 * 2 * per_token_layer
  attention = 2 * 3 * 2 * (2 * 29 * 29 * 64 + 2 * 29 * 29 * 64) // 2  # causal: half of scores and values
  lm_head = 2 * 3 * 16 * 2 * 64 * 256  # text positions only
  mvm_head = 2 * 3 * 13 * 2 * 64 * 64
  teacher = 2 * (32 * 2 * per_token_layer + 2 * (2 * 32 * 32 * 64 + 2 * 32 * 32 * 64) // 2)
  expected = vision + qformer + projection + llm + attention + lm_head + mvm_head + teacher
  got = flops.train_step_flops(cfg, batch_size=2, num_frames=4, text_len=16, qformer_text_len=8, n_keep=13, mvm=True)
  assert got['vision_forward'] == vision
  assert got['qformer_forward'] == qformer
  assert got['llm_train'] + got['llm_attention_train'] == llm + attention
  assert got['teacher_forward'] == teacher
  assert got['total'] == expected


@pytest.mark.parametrize('mask', ['none', 'causal', 'padding'])
def test_attention_times_each_implementation_that_runs_here(tmp_path, mask, capsys):
  result = run(tmp_path, 'attention', '--shape', '2,10,2,8', '--mask', mask, '--rounds', '2')
  timings = result['forward_backward']
  assert set(timings) == {'explicit', 'xla'} and result['fastest'] in timings  # no cuDNN on a CPU
  assert all(t['n'] == 2 and t['median_s'] > 0 for t in timings.values())
  assert result['flops_per_call'] == 12 * 2 * 2 * 10 * 10 * 8
  table = capsys.readouterr().out
  assert '| explicit |' in table and '| xla |' in table and f'mask {mask}' in table


@pytest.mark.parametrize('argv, message', [
    (['bogus'], "unknown subcommand 'bogus'"),
    ([], 'unknown subcommand'),
    (['train', '--config', 'configs/missing.py'], 'does not exist'),
    (['plan', '--config', TINY, '--mesh', 'fsdp=two'], 'bad mesh spec'),
    (['plan', '--config', TINY, '--remat', 'full,bogus'], "unknown --remat 'bogus': choose among none, full, dots, "
                                                           'dots_with_no_batch_dims, save_qkv_proj, minimal (or all)'),
    (['train', '--config', TINY, '--steps', '1'], 'give at least 2'),
    (['profile', '--config', TINY, '--steps', '0'], 'give at least 1 each'),
    (['profile', '--config', TINY, '--mask-rate', '1.5'], '--mask-rate 1.5: give a rate in [0, 1)'),
    (['train', '--config', TINY, '--config.train.nope=1'], 'no field'),
    (['attention', '--shape', '8,192,8'], "--shape '8,192,8': give batch,tokens,heads,head_dim"),
    (['attention', '--rounds', '0'], '--rounds 0: give at least 1'),
])
def test_errors_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert message in err and err.startswith('error:') and len(err.splitlines()) == 1, err


def test_peak_and_bandwidth_tables_match_device_kinds():
  assert devices.peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert devices.peak_tflops('NVIDIA H100 PCIe') == 756.0
  assert devices.peak_tflops('NVIDIA A100-SXM4-80GB') == 312.0
  assert devices.peak_tflops('NVIDIA H200') == 989.0
  assert devices.peak_tflops('TPU v4') == 275.0
  assert devices.peak_tflops('TPU v5 lite') == 197.0
  assert devices.peak_tflops('TPU v5p') == 459.0
  assert devices.peak_tflops('cpu') is None
  assert devices.hbm_bandwidth_gbps('NVIDIA A100-SXM4-40GB') == 1555.0
  assert devices.hbm_bandwidth_gbps('NVIDIA A100-SXM4-80GB') == 2039.0
  assert devices.hbm_bandwidth_gbps('NVIDIA A100 80GB PCIe') == 1935.0
  assert devices.hbm_bandwidth_gbps('NVIDIA H100 80GB HBM3') == 3350.0
  assert devices.hbm_bandwidth_gbps('NVIDIA H100 PCIe') == 2000.0
  assert devices.hbm_bandwidth_gbps('NVIDIA H200') == 4800.0
  assert devices.hbm_bandwidth_gbps('TPU v4') == 1200.0
  assert devices.hbm_bandwidth_gbps('TPU v5 lite') == 819.0
  assert devices.hbm_bandwidth_gbps('TPU v5p') == 2765.0
  assert devices.hbm_bandwidth_gbps('cpu') is None


def test_the_cpu_isa_names_the_host_and_what_each_framework_is_capped_to(monkeypatch):
  """XLA_FLAGS=--xla_cpu_max_isa and ATEN_CPU_CAPABILITY (read by torch at import, so here the imported torch's
  own answer) show in the benchmark's device record and its one-line description; so does YNNPACK's ISA, which
  XLA_FLAGS does not limit (test_isa_cap.py: --cpu-isa avx2 does)."""
  import torch  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX2')
  isa = devices.cpu_isa()
  assert isa['host'] in ('AVX-512', 'AVX2', 'AVX', 'NEON', 'SSE4.2', 'unknown') and isa['xla'] == 'AVX2'
  assert isa['torch'] == {'AVX512': 'AVX-512', 'AVX2': 'AVX2', 'DEFAULT': 'none'}.get(
      torch.backends.cpu.get_cpu_capability(), torch.backends.cpu.get_cpu_capability())
  if isa['host'] in ('AVX-512', 'AVX2') and 'ynnpack' in isa:  # x86-64 Linux: XLA's cap leaves its matmuls alone
    assert isa['ynnpack'] == isa['host']
  monkeypatch.setenv('XLA_FLAGS', '')
  assert devices.cpu_isa()['xla'] == isa['host']
  assert devices.describe_isa({'host': 'AVX-512', 'xla': 'AVX-512', 'torch': 'AVX-512'}) == 'AVX-512'
  assert devices.describe_isa({'host': 'AVX-512', 'xla': 'AVX2', 'torch': 'AVX2'}) == 'AVX-512 host, XLA AVX2, PyTorch AVX2'
  assert devices.describe_isa({'host': 'AVX2', 'xla': 'AVX2'}) == 'AVX2'
  assert devices.describe_isa({'host': 'AVX-512', 'xla': 'AVX2', 'ynnpack': 'AVX-512', 'torch': 'AVX2'}) == (
      'AVX-512 host, XLA AVX2, YNNPACK AVX-512, PyTorch AVX2')
  assert 'cpu_isa' in devices.describe()


def test_device_line_says_whether_freed_host_memory_is_kept():
  device = {'host_cpu': 'AMD EPYC', 'host_cores': 2, 'cpu_isa': {'host': 'AVX-512', 'xla': 'AVX-512'}}
  assert devices.describe_host({**device, 'host_malloc': 'kept'}) == 'AMD EPYC, 2 cores, AVX-512, freed memory kept'
  assert devices.describe_host({**device, 'host_malloc': 'system'}) == 'AMD EPYC, 2 cores, AVX-512'
  assert devices.describe()['host_malloc'] in ('kept', 'system')


def test_bt_adapter_flops_match_a_hand_count_and_xla(tmp_path, report):
  config = configlib.load_config_file(TINY)
  config.model.vision.bt_adapter.depth = 2
  cfg = stllm.model_config(config.model)
  # ViT width 64, MLP 128, 17 tokens (16 patches + CLS); 4 frames.
  temporal = 2 * 16 * 4 * 5 * 64 * 64 + 16 * 2 * 2 * 4 * 4 * 64  # qkv, out, temporal_fc; attention over 4 frames
  spatial = 4 * (2 * 17 * (4 * 64 * 64 + 2 * 64 * 128) + 2 * 2 * 17 * 17 * 64)  # an EVA block per frame
  assert flops.bt_adapter_forward_per_video(cfg, 4) == 2 * (temporal + spatial)
  got = flops.train_step_flops(cfg, batch_size=2, num_frames=4, text_len=16, qformer_text_len=8, n_keep=13, mvm=True)
  assert got['bt_adapter_train'] == 2 * 3 * 2 * (temporal + spatial)
  assert got['qformer_input_gradient'] == got['qformer_forward']
  # Layers unrolled and one micro-batch: XLA's cost analysis reads the step itself (test_train_two_steps covers
  # the unrolled variant compiled for a scanning config).
  result = run(tmp_path, 'train', '--config', TINY, '--steps', '2', '--mask-rate', '0.5', ONE_DEVICE,
               '--config.model.vision.bt_adapter.depth=2', '--config.model.qformer.dropout=0.1',
               '--config.model.vision.scan_layers=False', '--config.model.llm.scan_layers=False',
               '--config.train.grad_accum_steps=1')
  assert result['cost_check']['program'] == 'the train step itself'
  assert 0.8 < result['cost_check']['analytic_over_xla'] < 1.2
  report('benchmark (tiny + 2-layer BT-Adapter, 2 steps)',
         f"train: analytic / XLA FLOPs {result['cost_check']['analytic_over_xla']:.3f}")


def test_gpu_report_smoke(tmp_path, report):
  """The GPU session's one command on CPU with tiny shapes, as a GPU session runs it but with --smoke: every part
  runs (cuDNN rows give their one-line error here). A subprocess, on one device as a GPU session has it."""
  env = jax_env.subprocess_env()
  done = subprocess.run([sys.executable, '-m', 'stllm_jax.benchmark', 'gpu-report', '--smoke', '--out', str(tmp_path),
                         '--deadline-s', '3600'], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / 'gpu_report.json') as f:
    result = json.load(f)
  assert result['smoke'] and result['argv'][3:5] == ['gpu-report', '--smoke']
  no_cudnn = "cuDNN flash attention needs an NVIDIA GPU; JAX's backend here is 'cpu'"
  assert result['parity']['bf16_xla']['relative_error'] < 3e-2 and result['parity']['positions'] > 0
  assert no_cudnn in result['parity']['bf16_cudnn']['error']
  train = {(r['attention'], r['remat']): r for r in result['train']}
  assert list(train) == [('xla', 'full'), ('cudnn', 'full'), ('cudnn', 'minimal'), ('xla', 'minimal')]
  for remat in ('full', 'minimal'):
    measured = train['xla', remat]
    assert measured['step_time']['n'] == 1 and measured['tokens_per_s'] > 0 and measured['flops_per_step'] > 0
    assert measured['mfu'] is None and all(np.isfinite(measured['losses']))
    assert no_cudnn in train['cudnn', remat]['error']
  assert [r['batch'] for r in result['decode']] == [1, 8]
  for r in result['decode']:
    assert r['weight_bytes_per_token'] > 0 and r['bandwidth_limit_tokens_per_s'] is None  # CPU: no HBM in the table
  table = (tmp_path / 'gpu_report.md').read_text()
  assert table.count('| train step, ') == 4 and table.count('| decode, ') == 2 and '| logits, bf16 with' in table
  report('benchmark gpu-report --smoke (CPU, tiny shapes)',
         f"{result['elapsed_s']:.0f} s; bf16 vs float32 logits {result['parity']['bf16_xla']['relative_error']:.2e}")


def test_gpu_report_budget_skips_what_no_longer_fits_and_records_failures():
  from stllm_jax.benchmark import gpu_report  # pylint: disable=g-import-not-at-top
  budget = gpu_report.Budget(deadline_s=100.0)
  budget.estimates['train'] = 150.0
  assert 'train needs about 150 s' in budget.run('train', lambda: pytest.fail('must not run'))['skipped']
  failed = budget.run('parity', lambda: {}['missing'])
  assert failed['error'] == "KeyError: 'missing'" and budget.estimates['parity'] == failed['wall_s'] < 1
  assert budget.run('decode', lambda: {'rate': 1.0})['rate'] == 1.0
