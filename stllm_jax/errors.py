"""Errors a user can cause and fix (missing file, bad config value, wrong checkpoint).

Command-line entry points print their message as one block, without a traceback, and exit with status 2.
"""

import sys


class UserError(Exception):
  """Something the user can fix; the message names the thing and what to do."""


def exit_with(error: UserError) -> None:
  print(f'error: {error}', file=sys.stderr)
  sys.exit(2)
