"""Run the app under uvicorn with a graceful SIGTERM: drain in-flight requests, then exit 0."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import sys
import threading
from typing import Callable, Iterator

import uvicorn
from fastapi import FastAPI

from serve.engine import Engine

logger = logging.getLogger(__name__)


class _GracefulServer(uvicorn.Server):
  """uvicorn's server, but a caught SIGINT/SIGTERM is not raised again after the drain.

  uvicorn re-raises the signal once it has shut down, so the process would end by the
  signal (status 143 for SIGTERM) even after a clean drain. Here `on_signal` runs first
  (the engine stops accepting requests), uvicorn stops listening and waits for open
  requests, and `serve` returns normally.
  """

  def __init__(self, config: uvicorn.Config, on_signal: Callable[[int], None]):
    super().__init__(config)
    self._on_signal = on_signal

  @contextlib.contextmanager
  def capture_signals(self) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)

  def handle_exit(self, sig: int, frame) -> None:
    if not self.should_exit:
      self._on_signal(sig)
    super().handle_exit(sig, frame)


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def bind_socket(host: str, port: int) -> socket.socket:
  """Bind a listening TCP socket; port 0 picks a free port (read it back with getsockname)."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as error:
    sock.close()
    raise OSError(f"cannot listen on {host}:{port}: {error}; choose another --port or --host") from error
  sock.set_inheritable(True)
  return sock


def serve_app(app: FastAPI, engine: Engine, *, host: str = "127.0.0.1", port: int = 8000,
              drain_timeout: float = 30.0, announce: bool = True) -> None:
  """Serve until SIGINT/SIGTERM, then drain: open requests get up to `drain_timeout` s to finish.

  Prints "listening on http://HOST:PORT" on stdout once bound (with the real port when
  `port` is 0), so scripts and tests can find the server.
  """
  sock = bind_socket(host, port)
  bound_port = sock.getsockname()[1]
  config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=drain_timeout, lifespan="off")

  def on_signal(sig: int) -> None:
    logger.info("received %s: draining %d running and %d waiting requests", signal.Signals(sig).name,
                engine.stats().running, engine.stats().waiting)
    engine.stop_accepting()

  server = _GracefulServer(config, on_signal)
  if announce:
    print(f"listening on http://{host}:{bound_port}", flush=True)
  logger.info("serving on http://%s:%d", host, bound_port)
  try:
    server.run(sockets=[sock])
  finally:
    sock.close()
    engine.stop(drain=True, timeout=drain_timeout)
  sys.stdout.flush()
