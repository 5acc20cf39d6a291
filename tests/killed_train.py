"""`python tests/killed_train.py N --config ... [train flags]`: `python -m stllm_jax.train`, killed by SIGKILL just
before step N as a crash or a lost machine would kill it, after its earlier checkpoints are complete. The fault
is injected from here, outside the trainer: the host-side mask plan of step N dies, and checkpoint saves wait
for their write so that the step before is on disk."""

import os
import signal
import sys

from absl import app

from stllm_jax import checkpoints, masking, train


def main() -> None:
  kill_at = int(sys.argv.pop(1))
  plan, save = masking.step_mask_plan, checkpoints.RunCheckpoints.save

  def plan_or_die(step, *args, **kwargs):
    if step + 1 == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return plan(step, *args, **kwargs)

  def save_and_wait(self, *args, **kwargs):
    save(self, *args, **kwargs)
    self.wait()

  masking.step_mask_plan = plan_or_die
  checkpoints.RunCheckpoints.save = save_and_wait
  app.run(train.main, flags_parser=train.parse_flags)


if __name__ == '__main__':
  main()
