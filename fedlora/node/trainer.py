"""``fedlora trainer``: a deployed node's warm trainer, serving ``fedlora.v1.Trainer``.

Why: a deployed ClientApp is a fresh process per message, which would import
the training stack, load the base model and read the node's data every round
(BENCHMARKS.md, "Deployment"). The trainer is one long-lived process per node
that does that once; the node's ClientApp forwards each message to it
(``fedlora.node.trainer_link``) and returns its answer.

What it keeps, per process, exactly as a simulation's Ray worker does
(``fedlora.node.client_loop`` and ``fedlora.learning.features`` cache them): the base model
with its adapter (on the GPU when there is one), the node's tokenised data
(``--data-path``), and each run's client memory. What must outlive the
process, the client state (DP accountant, error feedback, personal tensors),
goes to ``--state-dir``, one directory per run (``fedlora.node.client_state``),
after every training message: a restarted trainer carries on from it. Only
its caches are lost (the base-weight copy of FLoRA and FedEx): the server
rejects that one reply and sends the whole change next time.

Safety:

* every call must carry the secret of ``--secret-file`` (``Bearer`` in the
  ``authorization`` metadata); others are refused with UNAUTHENTICATED and
  logged with the caller's address. Listen on the node's private network or
  a unix socket (``--listen unix:/run/fedlora/trainer.sock``): the secret is
  not encrypted in transit;
* messages are handled one at a time (the model is one, shared by every
  run); two runs at once on one trainer wait for each other, message by
  message, and keep their client memory and state files apart (by Flower run
  id, and by the run's own id on disk);
* a message the client loop fails (bad data, a malformed request) is
  answered with FAILED_PRECONDITION / INVALID_ARGUMENT and its one-line
  reason, anything unexpected with INTERNAL; the trainer keeps serving.

The listening socket is up within a second of the start; the training stack
is imported in the background meanwhile, and calls wait for it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from concurrent import futures
from pathlib import Path

import grpc
from flwr.app import Context, RecordDict
from flwr.common import MessageType

from fedlora.node import trainer_link
from fedlora.runtime import quiet
from fedlora.v1 import trainer_pb2, trainer_pb2_grpc

LOGGER = logging.getLogger("fedlora.node.trainer")
RUNS_REMEMBERED = 8  # client memories kept (run, node); an older run's is rebuilt from disk
STOP_GRACE_S = 5.0


class TrainerService(trainer_pb2_grpc.TrainerServicer):
    """The ``fedlora.v1.Trainer`` service over this node's data and state."""

    def __init__(self, data_path: Path, state_dir: Path, secret: str,
                 ready: threading.Event) -> None:
        self.node_config = {"data-path": str(data_path), "state-dir": str(state_dir)}
        self._secret = secret
        self._ready = ready  # set once the training stack is imported
        self._one_at_a_time = threading.Lock()
        self._memory: OrderedDict[tuple[int, int], RecordDict] = OrderedDict()

    def Train(self, request: trainer_pb2.TaskRequest,  # noqa: N802 (gRPC's name)
              context: grpc.ServicerContext) -> trainer_pb2.TaskReply:
        return self._handle(request, context, MessageType.TRAIN)

    def Evaluate(self, request: trainer_pb2.TaskRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> trainer_pb2.TaskReply:
        return self._handle(request, context, MessageType.EVALUATE)

    def _memory_of(self, run_id: int, node_id: int) -> RecordDict:
        key = (run_id, node_id)
        memory = self._memory.pop(key, None)
        self._memory[key] = memory = RecordDict() if memory is None else memory
        while len(self._memory) > RUNS_REMEMBERED:
            self._memory.popitem(last=False)
        return memory

    def _handle(self, request: trainer_pb2.TaskRequest, context: grpc.ServicerContext,
                message_type: str) -> trainer_pb2.TaskReply:
        if not trainer_link.secret_matches(dict(context.invocation_metadata()), self._secret):
            LOGGER.warning("refused a call from %s: no or wrong secret", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no or wrong trainer secret")
        self._ready.wait()
        from fedlora.core.config import ConfigError
        from fedlora.learning.models import lora_model
        from fedlora.node.client_loop import handle_evaluate, handle_train
        from fedlora.wire.codec import PayloadError

        handler = handle_train if message_type == MessageType.TRAIN else handle_evaluate
        with self._one_at_a_time:
            if not context.is_active():  # its deadline passed while another run's trained
                LOGGER.warning("run %d: message for node %d given up: its caller stopped "
                               "waiting", request.run_id, request.node_id)
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "waited past its deadline")
            started = time.perf_counter()
            try:
                message = trainer_link.message_of(request, message_type)
                memory = self._memory_of(request.run_id, request.node_id)
                reply = handler(message, Context(request.run_id, request.node_id,
                                                 dict(self.node_config), memory, {}))
                answer = trainer_link.to_reply(reply)
            except (ConfigError, trainer_link.TrainerError) as err:
                self._fail(context, grpc.StatusCode.FAILED_PRECONDITION, err, request)
            except (PayloadError, ValueError) as err:
                self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, err, request)
            except Exception as err:  # noqa: BLE001 - any failure is one reply, not the service
                LOGGER.exception("run %d: %s failed", request.run_id, message_type)
                self._fail(context, grpc.StatusCode.INTERNAL, err, request)
        LOGGER.info("run %d: %s for node %d in %.2f s (base models loaded by this "
                    "trainer: %d)", request.run_id, message_type, request.node_id,
                    time.perf_counter() - started, lora_model.cache_info().misses)
        return answer

    @staticmethod
    def _fail(context: grpc.ServicerContext, code: grpc.StatusCode, err: Exception,
              request: trainer_pb2.TaskRequest) -> None:
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err) else ''}"
        LOGGER.warning("run %d: message failed: %s", request.run_id, reason)
        context.abort(code, reason)


def _warm_up(device: str, ready: threading.Event) -> None:
    """Import the training stack (and check the device) while the socket is
    already listening; a node that cannot train ends the process in one line."""
    started = time.perf_counter()
    try:
        import torch

        import fedlora.node.client_loop  # noqa: F401 - the import is the warm-up

        quiet.libraries()
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is visible to this process")
    except Exception as err:  # noqa: BLE001 - one line, then the process ends
        print(f"fedlora trainer: error: {err}", file=sys.stderr, flush=True)
        os._exit(2)
    LOGGER.info("training stack ready in %.1f s (device: %s)", time.perf_counter() - started,
                "cuda" if torch.cuda.is_available() else "cpu")
    ready.set()


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedlora trainer", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--listen", required=True, metavar="ADDR",
                        help="HOST:PORT on the node's private network, or unix:PATH")
    parser.add_argument("--data-path", required=True, type=Path,
                        help="this node's data directory (as a node's data-path)")
    parser.add_argument("--state-dir", required=True, type=Path,
                        help="where client state is kept across restarts and resumes")
    parser.add_argument("--secret-file", required=True, type=Path,
                        help="the secret callers must present (deploy/make-certs.sh)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU when there is one (default)")
    return parser.parse_args(argv)


def _checked(args: argparse.Namespace) -> str:
    """The secret; ``TrainerError`` (one line) for a flag that cannot work."""
    if not args.data_path.is_dir():
        raise trainer_link.TrainerError(f"--data-path {args.data_path}: not a directory")
    try:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise trainer_link.TrainerError(f"--state-dir {args.state_dir}: cannot be made "
                                        f"({err.strerror or err})") from None
    return trainer_link.read_secret(args.secret_file, "--secret-file")


def main(argv: list[str]) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean stop, 2 on bad flags."""
    args = _arguments(argv)
    try:
        secret = _checked(args)
    except trainer_link.TrainerError as err:
        print(f"fedlora trainer: error: {err}", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    quiet.environment()
    quiet.fedlora_logger("fedlora trainer")

    ready = threading.Event()
    # no SO_REUSEPORT (gRPC's default on Linux): with it a second trainer on a
    # port in use (a restart while the old one lingers) binds too, and the kernel
    # splits the node's calls between the two processes and their state
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=(*trainer_link.CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)))
    trainer_pb2_grpc.add_TrainerServicer_to_server(
        TrainerService(args.data_path.resolve(), args.state_dir.resolve(), secret, ready),
        server)
    try:
        server.add_insecure_port(args.listen)
    except RuntimeError as err:
        print(f"fedlora trainer: error: --listen {args.listen}: cannot listen ({err})",
              file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    LOGGER.info("listening on %s (data %s, state %s)", args.listen, args.data_path,
                args.state_dir)
    threading.Thread(target=_warm_up, args=(args.device, ready), daemon=True,
                     name="warm-up").start()
    while not stop.wait(0.5):  # a plain wait() would not see the signal promptly
        pass
    server.stop(STOP_GRACE_S).wait()
    LOGGER.info("stopped")
    return 0
