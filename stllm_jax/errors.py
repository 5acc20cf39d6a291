"""Errors a user can cause and fix (missing file, bad config value, wrong checkpoint).

Command-line entry points print their message as one block, without a traceback, and exit with status 2.
"""

import logging
import sys


class UserError(Exception):
  """Something the user can fix; the message names the thing and what to do."""


def exit_with(error: UserError) -> None:
  print(f'error: {error}', file=sys.stderr)
  sys.exit(2)


def quiet_background_write_failures() -> None:
  """A failed asynchronous checkpoint write (e.g. a full disk) reaches the command as one exception, which it
  turns into one message. Hide the echoes of it that would otherwise reach the terminal first: orbax's log
  records of its background threads' tracebacks, and asyncio's 'Event loop is closed' from those threads."""
  logging.getLogger('absl').addFilter(_not_an_orbax_thread_failure)
  default_hook = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed':
      return
    default_hook(unraisable)
  sys.unraisablehook = hook


def _not_an_orbax_thread_failure(record: logging.LogRecord) -> bool:
  """False for orbax's logged tracebacks (its background threads' failures, re-raised in the main thread)."""
  return not ('orbax' in record.pathname and record.exc_info)
