"""The site's task executor: runs fedtune's *installed* ClientApp for its SuperNode.

Why not Flower's own SuperExec: with the default isolation a SuperNode installs the app
bundle (FAB) the SuperLink sends and imports whatever code is in it, in a fresh
``flwr-clientapp`` process per message.  For a hospital that means (1) the server
operator decides what code runs next to the patient data, and (2) every message pays
a Python + torch + transformers start (≈5–10 s), which dominated Flower SecAgg+ rounds
(49–54 s for 5 nodes against 1.9 s in simulation).

So ``fedtune client`` starts the SuperNode with ``--isolation process`` and runs this
executor beside it.  It claims the SuperNode's tasks over the local Runtime API
(127.0.0.1, with a per-start SuperExec auth secret), checks that the run's app is the
fedtune publisher/name/version this site pinned, refuses anything else with a log line
and an error reply, and otherwise hands the message to the ClientApp built from the
code installed on this machine.  The FAB's own code is never imported.  The process
stays warm between messages, so key-exchange and masking stages cost milliseconds.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import httpx

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedtune.federation.protocol import FAILED_TRAINING

log = logging.getLogger(__name__)

_ACQUIRE_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})
# After a task, poll promptly this long: the next stage of a secure round follows within ~1 s.
BUSY_WINDOW_S = 2.0


@dataclass(frozen=True)
class AppPin:
    """The one app a site runs: ``publisher/name`` at ``version``."""

    publisher: str
    name: str
    version: str

    @property
    def fab_id(self) -> str:
        return f"{self.publisher}/{self.name}"

    def refusal(self, run: Run) -> Optional[str]:
        """Why this run must not execute here, or None if it is the pinned app."""
        if run.fab_id != self.fab_id or run.fab_version != self.version:
            return (f"run {run.run_id} asks for app {run.fab_id or '?'}=={run.fab_version or '?'}, but this site "
                    f"runs only {self.fab_id}=={self.version} (its installed fedtune). Refusing the run; no "
                    "code from it was loaded. If the federation upgraded, install that fedtune version here "
                    "and set app.version in site.yaml.")
        return None


# A warm executor claims a task within milliseconds, often before its SuperNode has
# finished fetching the message's objects from the SuperLink; Flower's pull then backs off
# from 1 s (made for a process that took seconds to start).  Start at 20 ms instead.
PULL_INITIAL_BACKOFF_S = 0.02
PULL_BACKOFF_CAP_S = 0.5
# One object per adapter tensor; see fedtune.deploy.processes.OBJECT_CONCURRENCY.
OBJECT_CONCURRENCY = 8


# Flower 1.42 leaves a task behind when the SuperLink stops while the SuperNode is fetching
# that task's message (its RunNotRunningException path neither deletes the message nor
# finishes the task); the message's objects then never arrive.  Flower's own pull would keep
# asking for up to 500 tries per object (minutes here, ~80 min with its 10 s cap) and the
# site would miss the next run (seen in CI after a server restart).  A healthy transfer
# delivers some object every few seconds, even for a large adapter on a slow link, so a
# task whose objects stall this long is given up and reported failed.
OBJECT_STALL_S = 30.0


def stall_guarded(pull_object: Callable[[str], bytes], stall_s: float = OBJECT_STALL_S) -> Callable[[str], bytes]:
    """``pull_object`` that gives up once no object of the message arrived for ``stall_s``."""
    last_progress = time.monotonic()
    lock = threading.Lock()

    def pull(object_id: str) -> bytes:
        nonlocal last_progress
        try:
            content = pull_object(object_id)
        except ObjectUnavailableError:
            with lock:
                stalled = time.monotonic() - last_progress
            if stalled > stall_s:
                raise ObjectPullError(object_id, f"no object of this message arrived for {stalled:.0f} s; the "
                                                 "SuperNode stopped fetching it (its run probably ended)") from None
            raise
        with lock:
            last_progress = time.monotonic()
        return content

    return pull


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """Flower's ``run_clientapp.pull_task_input`` with a short object-pull backoff."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed over a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        stall_guarded(make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_INITIAL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S,
        max_concurrent_pulls=OBJECT_CONCURRENCY,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


@dataclass
class TaskOutcome:
    run_id: int
    message_type: str
    status: str  # "completed", "refused" or "failed"
    seconds: float
    # Where the time went: fetching the task and message, fedtune's handler, sending the reply.
    pull_seconds: float = 0.0
    app_seconds: float = 0.0
    push_seconds: float = 0.0


class SiteExecutor:
    """Claims this SuperNode's ClientApp tasks and runs them in this process, one at a time."""

    def __init__(self, runtime_address: str, app: ClientApp, pin: AppPin,
                 auth_secret: Optional[bytes] = None, poll_interval_s: float = 0.05,
                 on_task: Optional[Callable[[TaskOutcome], None]] = None, idle_poll_s: float = 0.5) -> None:
        self.runtime_address = runtime_address
        self.app = app
        self.pin = pin
        self.auth_secret = auth_secret
        self.poll_interval_s = poll_interval_s
        self.idle_poll_s = max(poll_interval_s, idle_poll_s)
        self.last_task_end = -float("inf")
        self.on_task = on_task
        self.stop_event = threading.Event()

    def _client(self, interceptors: list, max_time_s: Optional[float]) -> RuntimeHttpClient:
        # The Runtime API is bound to 127.0.0.1 on this machine only; no TLS needed.  Flower's
        # default retry policy answers an HTTP 401 by sending SIGINT to its own process, which
        # would stop the whole site over one expired task token; retry transport errors only.
        def waits() -> Iterator[float]:
            while True:
                yield 0.25

        invoker = RetryInvoker(waits, httpx.TransportError, max_tries=None, max_time=max_time_s, jitter=None)
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=invoker)

    def serve_forever(self) -> None:
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.auth_secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.auth_secret,
                                                             protected_methods=_ACQUIRE_METHODS))
        # While the SuperNode restarts (see fedtune.deploy.site) the loop below keeps asking;
        # each call gives up after 5 s so that a stop request is seen promptly.
        client = self._client(interceptors, max_time_s=5.0)
        log.info("executor ready: serving %s from the local SuperNode at %s", self.pin.fab_id, self.runtime_address)
        try:
            while not self.stop_event.is_set():
                try:
                    response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except httpx.TransportError as exc:
                    # The SuperNode is (re)starting; the supervisor in fedtune.deploy.site reports that.
                    log.debug("the SuperNode is not answering (%s); retrying", exc)
                    self.stop_event.wait(1.0)
                    continue
                except Exception as exc:  # noqa: BLE001 - an HTTP error from the SuperNode; try again
                    log.warning("could not ask the SuperNode for work (%s); retrying", exc)
                    self.stop_event.wait(1.0)
                    continue
                if response.HasField("task") and response.token:
                    self.run_task(response.token)
                    self.last_task_end = time.monotonic()
                    continue
                self.stop_event.wait(self.next_poll_s())
        finally:
            client.close()

    def next_poll_s(self) -> float:
        """How long to wait before asking the SuperNode for work again.

        Right after a task the round's next stage is imminent: ask every ``poll_interval_s``.
        Idle for longer than ``BUSY_WINDOW_S`` (the server is aggregating and evaluating, or no
        run is on), ask every ``idle_poll_s``: three executors asking 20 times a second took
        CPU from the server's evaluation on a shared 2-core machine, and an idle hospital
        client should cost next to nothing.
        """
        busy = time.monotonic() - self.last_task_end < BUSY_WINDOW_S
        return self.poll_interval_s if busy else self.idle_poll_s

    def run_task(self, token: str) -> TaskOutcome:
        """Pull one message, run it (or refuse it), push the reply and the task status."""
        started = time.perf_counter()
        client = self._client([RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                               RuntimeTokenHttpInterceptor(token)], max_time_s=60.0)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context: Optional[Context] = None
        status, details = SubStatus.FAILED, "fedtune executor failed"
        outcome = TaskOutcome(run_id=-1, message_type="?", status="failed", seconds=0.0)
        try:
            message, context, run, _fab = pull_task_input(client)
            pulled = time.perf_counter()
            outcome.pull_seconds = pulled - started
            outcome.run_id, outcome.message_type = run.run_id, message.metadata.message_type
            reason = self.pin.refusal(run)
            if reason is not None:
                log.error("REFUSED: %s", reason)
                reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=reason), reply_to=message)
                outcome.status, details = "refused", reason
            else:
                try:
                    reply = self.app(message=message, context=context)
                    status, details, outcome.status = SubStatus.COMPLETED, "", "completed"
                except Exception:  # noqa: BLE001 - reported to the server as a fixed-code Error reply
                    # The exception's text may quote a record, a label, a path or the site's
                    # size: it stays in this log; the server gets a constant.
                    log.exception("the fedtune ClientApp raised while handling a %s message",
                                  message.metadata.message_type)
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=FAILED_TRAINING),
                                    reply_to=message)
                    details = FAILED_TRAINING
            replied = time.perf_counter()
            outcome.app_seconds = replied - pulled
            push_message(client, reply, context)
            outcome.push_seconds = time.perf_counter() - replied
        except Exception:  # noqa: BLE001 - never let one bad task stop the site
            log.exception("task failed before a reply could be sent")
        finally:
            try:
                push_task_output(client, context, status, details)
            finally:
                heartbeat.stop()
                client.close()
        outcome.seconds = time.perf_counter() - started
        log.info("task run=%s type=%s %s in %.2fs (pull %.2fs, fedtune %.2fs, push %.2fs)", outcome.run_id,
                 outcome.message_type, outcome.status, outcome.seconds, outcome.pull_seconds, outcome.app_seconds,
                 outcome.push_seconds)
        if self.on_task is not None:
            self.on_task(outcome)
        return outcome
