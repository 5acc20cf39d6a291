"""PyTorch weights <-> stllm_jax weights directories.

    python -m stllm_jax.convert hf-instructblip DIR --out OUT
    python -m stllm_jax.convert lavis --vit eva_vit_g.pth --instructblip instruct_blip_vicuna7b_trimmed.pth \\
        --llm vicuna-7b-v1.1/ --qformer-tokenizer bert-base-uncased/ --out OUT
    python -m stllm_jax.convert stllm DIR --qformer-tokenizer bert-base-uncased/ --out OUT
    python -m stllm_jax.convert hf-llama DIR --out OUT
        common options: --dtype float32|bfloat16, --mesh fsdp=8 (write sharded), --config FILE (the base
        config.model: the vision/Q-Former architecture of LAVIS and ST-LLM sources, scan_layers, remat)
    python -m stllm_jax.convert export-hf CKPT OUT        (a weights directory or a training workdir)
    python -m stllm_jax.convert verify CKPT [--torch DIR | --vit F --instructblip F --llm DIR]

Exit status: 0 done; 1 verify found errors above the tolerance; 2 a problem with the inputs (one message, no
traceback): a wrong path or source kind, a checkpoint that does not match the model (every missing, unused
and mis-shaped tensor listed), an existing output directory.
"""

from __future__ import annotations

import argparse
import sys

from stllm_jax.errors import UserError, exit_with

SOURCE_HELP = {
    'hf-instructblip': 'a Hugging Face InstructBlipForConditionalGeneration directory',
    'lavis': 'LAVIS InstructBLIP (eva_vit_g.pth + instruct_blip_vicuna7b_trimmed.pth) with a Vicuna directory',
    'stllm': 'a released ST-LLM checkpoint directory (sharded pytorch_model-*.bin with index; the conversation '
             'model or the QA model with its BT-Adapter)',
    'hf-llama': 'a LLaMA/Vicuna directory: the LLM alone',
}


def _add_output_options(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--out', required=True, help='the weights directory to write (must not exist)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='dtype the params are stored (and computed) in')
  parser.add_argument('--mesh', default='', help='e.g. fsdp=8: write the params sharded over this mesh, so each '
                      'host of a multi-host job restores only its shards')
  parser.add_argument('--config', default='', help='a config file (configs/*.py) whose config.model gives what the '
                      'source does not say: the vision/Q-Former architecture of LAVIS and ST-LLM sources '
                      '(default: the 7B model), scan_layers, remat_policy')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m stllm_jax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('hf-instructblip', help=SOURCE_HELP['hf-instructblip'])
  p.add_argument('source', metavar='DIR')
  p.add_argument('--llm-tokenizer', default='', help='LLM tokenizer directory (default: DIR)')
  p.add_argument('--qformer-tokenizer', default='', help='Q-Former tokenizer directory (default: DIR/qformer_tokenizer)')
  _add_output_options(p)
  p = commands.add_parser('lavis', help=SOURCE_HELP['lavis'])
  p.add_argument('--vit', required=True, help='eva_vit_g.pth')
  p.add_argument('--instructblip', required=True, help='instruct_blip_vicuna7b_trimmed.pth')
  p.add_argument('--llm', required=True, help='the Vicuna-7B v1.1 Hugging Face directory (with its tokenizer)')
  p.add_argument('--qformer-tokenizer', default='', help='a bert-base-uncased tokenizer directory ([DEC] is added)')
  p.add_argument('--trust-pickle', action='store_true', help='read .pth files that also pickle Python objects '
                 '(an optimizer state, a config object); unpickling can run code, so only for files you trust')
  _add_output_options(p)
  p = commands.add_parser('stllm', help=SOURCE_HELP['stllm'])
  p.add_argument('source', metavar='DIR')
  p.add_argument('--qformer-tokenizer', default='', help='a bert-base-uncased tokenizer directory ([DEC] is added)')
  p.add_argument('--num-local-frames', type=int, default=0,
                 help='global-local checkpoints: local frames (default: from the checkpoint, else 16)')
  _add_output_options(p)
  p = commands.add_parser('hf-llama', help=SOURCE_HELP['hf-llama'])
  p.add_argument('source', metavar='DIR')
  _add_output_options(p)
  p = commands.add_parser('export-hf', help='a weights directory or training workdir -> a Hugging Face directory')
  p.add_argument('ckpt', metavar='CKPT')
  p.add_argument('out', metavar='OUT')
  p.add_argument('--dtype', default='', choices=('', 'float32', 'bfloat16'), help='default: as stored')
  p.add_argument('--max-shard-size', default='5GB', help='largest safetensors shard, e.g. 5GB or 500MB')
  p = commands.add_parser('verify', help='compare the converted model with the PyTorch reference')
  p.add_argument('ckpt', metavar='CKPT')
  p.add_argument('--torch', default='', metavar='DIR', help='the source directory (default: the one the '
                 'conversion recorded)')
  p.add_argument('--vit', default='')
  p.add_argument('--instructblip', default='')
  p.add_argument('--llm', default='')
  p.add_argument('--trust-pickle', action='store_true', help='as for `lavis`; a conversion made with it does not '
                 'pass it on: verify unpickles only when given it here')
  p.add_argument('--frames', type=int, default=0, help='default: 2, or the local frames of global-local models')
  p.add_argument('--text-len', type=int, default=16)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--tolerance', type=float, default=None, help='largest relative logit error that passes '
                 '(default 1e-4)')
  return parser


def parse_size(text: str) -> int:
  units = {'KB': 10 ** 3, 'MB': 10 ** 6, 'GB': 10 ** 9, 'KIB': 2 ** 10, 'MIB': 2 ** 20, 'GIB': 2 ** 30, 'B': 1}
  upper = text.strip().upper()
  for unit, factor in sorted(units.items(), key=lambda item: -len(item[0])):
    if upper.endswith(unit):
      number = upper[:-len(unit)].strip()
      try:
        return int(float(number) * factor)
      except ValueError:
        break
  raise UserError(f'--max-shard-size {text!r}: write e.g. 5GB, 500MB or 2GiB')


def _base_config(path: str):
  if not path:
    return None
  from stllm_jax import configlib  # pylint: disable=g-import-not-at-top
  try:
    return configlib.load_config_file(path).model
  except (FileNotFoundError, AttributeError) as err:
    raise UserError(f'--config: {err}') from None


def run(args: argparse.Namespace) -> int:
  from stllm_jax.convert import export, sources, strict, verify  # pylint: disable=g-import-not-at-top
  try:
    if args.command == 'export-hf':
      export.export_hf(args.ckpt, args.out, parse_size(args.max_shard_size), args.dtype)
      return 0
    if args.command == 'verify':
      spec = verify.SourceSpec.resolve(args.ckpt, args.torch, args.vit, args.instructblip, args.llm,
                                       args.trust_pickle)
      result = verify.verify(args.ckpt, spec, args.frames, args.text_len, args.seed)
      tolerance = verify.DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
      print(verify.report(result, tolerance))
      return 0 if result.passed(tolerance) else 1
    base = _base_config(args.config)
    if args.command == 'hf-instructblip':
      prepared = sources.prepare_hf_instructblip(args.source, base, args.llm_tokenizer, args.qformer_tokenizer)
    elif args.command == 'lavis':
      prepared = sources.prepare_lavis(args.vit, args.instructblip, args.llm, base, args.qformer_tokenizer,
                                       args.trust_pickle)
    elif args.command == 'stllm':
      prepared = sources.prepare_stllm(args.source, base, args.qformer_tokenizer, args.num_local_frames)
    else:
      prepared = sources.prepare_hf_llama(args.source, base)
    sources.convert(prepared, args.out, args.dtype, args.mesh)
    return 0
  except strict.CheckpointMismatch as err:
    raise UserError(f'{err}\nNothing was written.') from None
  except FileExistsError as err:
    raise UserError(str(err)) from None


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  try:
    status = run(args)
  except UserError as err:
    exit_with(err)
  sys.exit(status)
