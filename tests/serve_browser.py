"""Drives the web chat demo (stllm_jax/serve.py) in headless Chromium through Selenium, as a person would.

    start_server(checkpoint, port) -> Server          `python -m stllm_jax.serve`, waited for until it answers
    wait_until_serving(server)                        (for a server started with wait=False)
    browser() -> WebDriver                            Debian's chromium + chromium-driver, headless, offline
    upload(driver, path) -> video status text         the file into the page's upload box (send_file: only that)
    frame_captions(driver) -> ['0.2 s', ...]          the times under the thumbnails
    toast(driver) -> text                             a message Gradio pops up (a file over the upload limit)
    ask(driver, question) -> answer text              typed and sent; the streamed answer once finished
    screenshot(driver, path)                          the page from its top, as a PNG

Regenerate the README's screenshot on the demo model (after `python -m stllm_jax.demo`):
    python tests/serve_browser.py --checkpoint runs/demo --video data/demo/videos/test_0000_a.mp4 --frames 8 \\
        --question "In which direction does the square move?" --screenshot docs/serve.png
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

import jax_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = ('/usr/bin/chromium', '/usr/bin/chromium-browser')
CHROMEDRIVER = '/usr/bin/chromedriver'
WINDOW = (1400, 1000)


def browser_missing() -> str:
  """Why no browser can be driven here ('' when one can)."""
  if not any(os.path.exists(path) for path in CHROMIUM) or not os.path.exists(CHROMEDRIVER):
    return ('no chromium and chromedriver in /usr/bin: install them with `apt-get install -y chromium '
            'chromium-driver` (.ci/run does)')
  return ''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Server:
  process: subprocess.Popen
  port: int
  log: Any  # a temporary file with its output (a pipe nobody reads could fill up and stop it)

  def output(self) -> str:
    self.log.seek(0)
    return self.log.read()[-3000:]

  def stop(self) -> None:
    self.process.terminate()
    self.process.wait(timeout=30)
    self.log.close()


def start_server(checkpoint: str, port: int, *extra: str, wait: bool = True) -> Server:
  """`python -m stllm_jax.serve` on 127.0.0.1:port, waited for until its page answers unless `wait` is False."""
  env = jax_env.subprocess_env()
  log = tempfile.TemporaryFile(mode='w+')
  process = subprocess.Popen([sys.executable, '-m', 'stllm_jax.serve', '--checkpoint', checkpoint, '--port',
                              str(port), *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
  server = Server(process, port, log)
  if wait:
    wait_until_serving(server)
  return server


def wait_until_serving(server: Server, timeout: float = 120) -> None:
  """Returns once the page answers; raises with the server's output if it stops or stays silent first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if server.process.poll() is not None:
      raise RuntimeError(f'the server stopped with status {server.process.returncode}:\n{server.output()}')
    try:
      with urllib.request.urlopen(f'http://127.0.0.1:{server.port}/', timeout=2):
        return
    except OSError:
      time.sleep(0.5)
  server.stop()
  raise RuntimeError(f'the server did not answer within {timeout} s:\n{server.output()}')


def browser() -> webdriver.Chrome:
  """Headless Chromium that reaches 127.0.0.1 and nothing else (no name lookups, no background requests)."""
  options = webdriver.ChromeOptions()
  options.binary_location = next(path for path in CHROMIUM if os.path.exists(path))
  for flag in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync',
               '--disable-default-apps', '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
               f'--window-size={WINDOW[0]},{WINDOW[1]}'):
    options.add_argument(flag)
  return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def open_page(driver: webdriver.Chrome, url: str, timeout: float = 30) -> None:
  driver.get(url)
  WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, '#question textarea'))


def text_of(driver: webdriver.Chrome, elem_id: str) -> str:
  return driver.find_element(By.ID, elem_id).text.strip()


def busy(driver: webdriver.Chrome, elem_id: str) -> bool:
  """Whether Gradio shows its progress overlay on the element (an output being computed; its old text stays
  beneath it): the overlay's status tracker loses its `hide` class while it shows."""
  trackers = driver.find_elements(By.CSS_SELECTOR, f'#{elem_id} [data-testid="status-tracker"]')
  return any('hide' not in (t.get_attribute('class') or '').split() for t in trackers)


def settled_text(driver: webdriver.Chrome, elem_id: str, before: str) -> str | None:
  """The element's new text, or None while it still shows `before` or Gradio's progress overlay. The overlay is
  looked for before and after the text is read: it may appear in between, and its progress line ('processing |
  0.1/1.0s') is then part of the text."""
  if busy(driver, elem_id):
    return None
  text = text_of(driver, elem_id)
  return None if text in ('', before) or busy(driver, elem_id) else text


def send_file(driver: webdriver.Chrome, path: str) -> None:
  """`path` into the upload box, as if chosen in the file dialog."""
  driver.find_element(By.CSS_SELECTOR, '#video-upload input[type=file]').send_keys(os.path.abspath(path))


def upload(driver: webdriver.Chrome, path: str, timeout: float = 60) -> str:
  """Uploads `path`; returns the page's video status (the frames, or why the file cannot be used)."""
  before = text_of(driver, 'video-status')
  send_file(driver, path)
  return WebDriverWait(driver, timeout).until(lambda d: settled_text(d, 'video-status', before))


def frame_captions(driver: webdriver.Chrome) -> list[str]:
  """The times under the thumbnails of the frames the model sees."""
  return [e.text for e in driver.find_elements(By.CSS_SELECTOR, '#frame-strip figcaption')]


def toast(driver: webdriver.Chrome, timeout: float = 30) -> str:
  """The text of the first message Gradio pops up (e.g. a file over the upload limit)."""
  def shown(d):  # the text appears once the toast has faded in
    items = d.find_elements(By.CSS_SELECTOR, '[data-testid="toast-body"] .toast-message-item')
    return items and items[0].text.strip()
  return WebDriverWait(driver, timeout).until(shown)


def choose_frames(driver: webdriver.Chrome, spec_label: str, timeout: float = 60) -> str:
  """Clicks the frame setting whose label is `spec_label`; returns the new video status."""
  before = text_of(driver, 'video-status')
  label = driver.find_element(By.XPATH, f'//*[@id="frames"]//label[normalize-space()="{spec_label}"]')
  label.click()
  return WebDriverWait(driver, timeout).until(lambda d: settled_text(d, 'video-status', before))


def ask(driver: webdriver.Chrome, question: str, timeout: float = 120) -> str:
  """Types `question`, presses Enter and waits for the answer's speed line; returns the last answer's text."""
  box = driver.find_element(By.CSS_SELECTOR, '#question textarea')
  box.send_keys(question)
  box.send_keys(Keys.ENTER)
  WebDriverWait(driver, timeout).until(lambda d: 'tokens/s' in text_of(d, 'answer-status'))
  answers = driver.find_elements(By.CSS_SELECTOR, '#chat .bot')
  return answers[-1].text.strip() if answers else ''


def screenshot(driver: webdriver.Chrome, path: str) -> None:
  driver.find_element(By.TAG_NAME, 'body').click()  # the question box loses focus, the page scrolls back up
  driver.execute_script('window.scrollTo(0, 0)')
  driver.save_screenshot(path)


def main() -> None:
  parser = argparse.ArgumentParser(description='Screenshot of the web chat demo answering one question.')
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--video', required=True)
  parser.add_argument('--question', required=True)
  parser.add_argument('--frames', default='', help='the frame setting\'s label on the page (default: auto)')
  parser.add_argument('--screenshot', required=True)
  args = parser.parse_args()
  port = free_port()
  server = start_server(args.checkpoint, port)
  driver = browser()
  try:
    open_page(driver, f'http://127.0.0.1:{port}/')
    print(upload(driver, args.video))
    if args.frames:
      print(choose_frames(driver, f'{args.frames} frames' if args.frames.isdigit() else args.frames))
    print('answer:', ask(driver, args.question))
    print(text_of(driver, 'answer-status'))
    screenshot(driver, args.screenshot)
  finally:
    driver.quit()
    server.stop()


if __name__ == '__main__':
  main()
