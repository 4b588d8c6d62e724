"""Many pykka actors on one dispatcher thread, with fd watches and timers.

pykka's ``ThreadingActor`` gives each actor an OS thread. lockd runs one actor
per lease and per connection (16,384 leases and 4,096 connections at the scale
target), so instead every actor here is a pykka ``Actor`` whose inbox feeds a
shared :class:`Dispatcher`. The dispatcher runs one message of one actor at a
time, in the global order the messages were sent, and the same thread waits on
sockets, pidfds and timers. A hop between actors costs a deque append, not a
thread wake-up, and tests can drive everything step by step with
:meth:`Dispatcher.run_until_idle` on the test thread.

pykka semantics are kept: an exception in an ask goes back to the asker and
the actor lives on; an exception in a tell (or in ``on_start``) kills the
actor, and the dispatcher then records it as a crash so the daemon fails fast
instead of running with a dead actor (pykka has no supervision). Handlers
must never block, and never ``get()`` a future of another actor: the
dispatcher is the thread that would have to answer it.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import math
import os
import select
import selectors
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pykka
from pykka import ActorDeadError, ThreadingFuture
from pykka._envelope import Envelope
from pykka.messages import ProxyCall, ProxyGetAttr, ProxySetAttr, _ActorStop

Step = Callable[[], None]

_PYKKA_MESSAGES = frozenset({_ActorStop, ProxyCall, ProxyGetAttr, ProxySetAttr})
"""Messages pykka itself handles (stop and proxy calls), matched by exact type."""

_NOT_PLAIN = _PYKKA_MESSAGES | {Envelope}
"""What a step cannot hand straight to ``on_receive``: pykka's messages and asks."""


class ActorCrashedError(RuntimeError):
    """An actor died from an exception raised while handling a tell."""


def _cancelled() -> None:
    """What a cancelled timer would run: nothing (its callback is let go)."""


class Timer:
    """Handle of a scheduled callback; :meth:`cancel` makes it never run."""

    __slots__ = ("_dispatcher", "callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Step, dispatcher: Dispatcher | None) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False
        self._dispatcher = dispatcher
        """Whose queue the timer waits in (None once it ran or was cancelled)."""

    def cancel(self) -> None:
        """Stop the callback from running; harmless after it ran.

        The callback is let go at once (with whatever its closure holds, an actor's
        ref for one), and the dispatcher drops cancelled timers from its queue once
        they are most of it, instead of keeping each until its deadline."""
        self.cancelled = True
        self.callback = _cancelled
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher._timer_cancelled()


class Dispatcher:
    """Runs actor steps, fd callbacks and timers on one thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ready: collections.deque[Step] = collections.deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled_timers = 0
        """How many of :attr:`_timers` are cancelled (see :meth:`_timer_cancelled`)."""
        self._counter = itertools.count()
        self._epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
        self._watched: dict[int, tuple[int, Callable[[int], None]]] = {}
        """fd -> (selectors events, callback). epoll itself, not ``selectors``: its
        ``select`` builds a key tuple per ready fd and maps events through several calls,
        about 170 bytecodes per pair of a daemon's 8,400 (and two ``epoll_ctl`` calls
        where one ``modify`` does)."""
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._closed = False
        self._closing = threading.RLock()
        """Held by a wake-up's write and by :meth:`close`: a thread that found the pipe
        open wrote to it before its close, never after (when its fd number may be a file
        of the program's, or none: an embedded client's call as the service stopped met
        EBADF). Reentrant: a signal handler's :meth:`wake` may interrupt one."""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.selecting = False
        """True while the loop waits in ``select``: only then does a new step need a wake-up.

        Set before the loop's last look at the ready queue and cleared as soon as
        ``select`` returns, so a step queued by another thread is either seen by
        that look or wakes the wait (the GIL orders the two threads' reads and
        writes). Steps queued by the loop's own callbacks, one per request,
        cost no ``write`` to the wake-up pipe.
        """
        self.crashes: list[BaseException] = []
        self.actors: set[DispatchedActor] = set()
        """Actors started on this dispatcher and not stopped (see :meth:`stop_all`)."""

    # -- scheduling -----------------------------------------------------------
    def submit(self, step: Step) -> None:
        """Queue a step; safe from any thread."""
        self._ready.append(step)
        if self.selecting:
            self._wake()

    def wake(self) -> None:
        """Interrupt the loop's wait (signal handlers: they run on the loop's own thread)."""
        self._wake()

    def _wake(self) -> None:
        with self._closing:
            if self._closed:  # its pipe's fd number may be another file's by now
                return
            # A full pipe already holds a pending wake-up, which is all we need.
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def now(self) -> float:
        """The dispatcher's clock (monotonic; the one timers' deadlines use)."""
        return self._clock()

    def call_later(self, delay: float, callback: Step) -> Timer:
        """Run ``callback`` on the dispatcher after ``delay`` seconds. Loop thread only."""
        timer = Timer(self._clock() + max(0.0, delay), callback, self)
        heapq.heappush(self._timers, (timer.deadline, next(self._counter), timer))
        return timer

    def _timer_cancelled(self) -> None:
        """A queued timer was cancelled: past half the queue (and a few), drop them all.

        Each connection cancels its ``idle_timeout`` check (60 s) as it closes: kept
        until their deadlines, a minute's worth of closed connections' timers stayed
        queued, about 1.6 KiB each with the closures they held (98 MiB at 1,000
        connections a second). Dropped this way the queue is never more than twice
        the timers still to run, and the work is paid once per that many cancels."""
        self._cancelled_timers += 1
        if self._cancelled_timers > max(64, len(self._timers) // 2):
            self._timers = [item for item in self._timers if not item[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def watch(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(ready_events)`` when ``fd`` is ready (``events``: selectors'
        ``EVENT_READ``/``EVENT_WRITE``); watched already, its events and callback are
        replaced. Loop thread only."""
        mask = (select.EPOLLIN if events & selectors.EVENT_READ else 0) | (
            select.EPOLLOUT if events & selectors.EVENT_WRITE else 0
        )
        if fd in self._watched:
            try:
                self._epoll.modify(fd, mask)
            except FileNotFoundError:  # closed and its number reused without an unwatch
                self._epoll.register(fd, mask)
        else:
            self._epoll.register(fd, mask)
        self._watched[fd] = (events, callback)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd``; harmless if it was not watched, or closed already."""
        if self._watched.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def watching(self, fd: int) -> bool:
        """Whether ``fd`` is watched (for tests and assertions)."""
        return fd in self._watched

    def stop_all(self) -> None:
        """Ask every running actor to stop (they stop as the loop runs their inboxes)."""
        for actor in list(self.actors):
            if not actor.actor_stopped.is_set():
                actor.actor_ref.tell(_ActorStop())

    def report_crash(self, exc: BaseException) -> None:
        """Record an actor death; the loop raises it once the current step ends."""
        self.crashes.append(exc)

    # -- running --------------------------------------------------------------
    def _run_due_timers(self) -> None:
        now = self._clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                self._cancelled_timers -= 1
            else:
                timer._dispatcher = None  # out of the queue: a cancel now counts nothing
                self._ready.append(timer.callback)

    def _run_ready(self, limit: int) -> None:
        # Every actor hop passes here: locals, not attribute lookups, per step,
        # and the bound kept by the loop itself, not by a counter of our own.
        ready, crashes = self._ready, self.crashes
        popleft = ready.popleft
        for _ in range(limit):
            if not ready:
                return
            popleft()()
            if crashes:
                raise ActorCrashedError("an actor died") from crashes[0]

    def _poll(self, timeout: float | None) -> None:
        self.selecting = True
        try:
            if self._ready:
                timeout = 0.0  # queued by another thread before the flag went up
            if timeout is None:
                timeout = -1.0
            elif timeout > 0.0:
                timeout = math.ceil(timeout * 1e3) * 1e-3  # epoll waits in whole ms: not less
            else:  # a deadline past: epoll would take a negative timeout as "for ever"
                timeout = 0.0
            ready = self._epoll.poll(timeout, len(self._watched) + 1)
        finally:
            self.selecting = False
        watched, wake_r = self._watched, self._wake_r
        for fd, got in ready:
            # Looked up now, not before the first callback: one that unwatched (and
            # closed) another ready fd must not have that fd's callback run.
            entry = watched.get(fd)
            if entry is not None:
                # As selectors maps them: an error or hang-up wakes readers and writers.
                events = (0 if got == select.EPOLLIN else selectors.EVENT_WRITE) | (
                    0 if got == select.EPOLLOUT else selectors.EVENT_READ
                )
                entry[1](events & entry[0])
            elif fd == wake_r:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass

    def run_once(self, timeout: float | None = None) -> None:
        """One loop turn: due timers, ready steps (bounded, so I/O is not starved), then I/O."""
        self._run_due_timers()
        self._run_ready(limit=1024)
        if self._ready:
            wait: float | None = 0.0
        elif self._timers:
            wait = max(0.0, self._timers[0][0] - self._clock())
            wait = wait if timeout is None else min(wait, timeout)
        else:
            wait = timeout
        self._poll(wait)

    def run_until_idle(self, *, poll_io: bool = True) -> None:
        """Run until nothing is ready and no timer is due: deterministic tests, no thread."""
        while True:
            self._run_due_timers()
            if poll_io:
                self._poll(0)
            if not self._ready:
                return
            self._run_ready(limit=1 << 30)

    def run_forever(self) -> None:
        """Serve until :meth:`stop`; re-raises actor crashes."""
        while not self._stopping.is_set():
            self.run_once(timeout=1.0)

    def start(self, name: str = "lockd-dispatcher") -> None:
        """Run the loop on a new thread (for embedding and threaded tests)."""
        self._thread = threading.Thread(target=self._thread_main, name=name, daemon=True)
        self._thread.start()

    def _thread_main(self) -> None:
        try:
            self.run_forever()
        except BaseException as exc:  # noqa: BLE001 - kept for the thread that stops us
            self.crashes.append(exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait for its thread; fail loudly if it will not stop."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("dispatcher thread did not stop")

    def close(self) -> None:
        """Release the wake-up pipe and the selector; harmless twice."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def tell_if_alive(ref: pykka.ActorRef[Any] | None, message: Any) -> None:
    """Send a reply that may outlive its addressee (a connection that closed meanwhile).

    ``ActorRef.tell`` raises on a stopped actor; a reply nobody waits for any
    more is simply dropped, and must not kill the actor that sends it.
    """
    if ref is not None:
        try:  # noqa: SIM105 - not contextlib.suppress: a context manager per reply costs
            ref.tell(message)
        except ActorDeadError:
            pass


class _Inbox(collections.deque[Any]):
    """One dispatched actor's pykka inbox, its stopped flag and its step, in one object.

    It holds what :class:`DispatchedRef` tells as the bare message and what
    pykka asks (proxy calls, stop) as an ``Envelope`` with its future: most
    hops are tells, and each skips building an envelope. Each message
    submits the inbox itself to the dispatcher, and calling it handles one
    message. An actor is started and stopped per autocreated lease, and
    16,384 lease actors live at the scale target: every object an actor
    needs is one more allocation per acquire and one more for a full
    collection to walk (which stops every request). So the inbox is also
    the ``actor_stopped`` flag pykka reads, and no bound method, partial or
    flag object exists per actor.
    """

    __slots__ = ("_kind", "_live", "_set", "_urn", "actor", "dispatcher")

    def __init__(self) -> None:
        super().__init__()
        self._set = False
        """Stopped (pykka's ``actor_stopped.is_set()``)."""
        self.dispatcher: Dispatcher | None = None
        """Set by :meth:`bind`; until then messages wait without a step submitted."""
        self.actor: DispatchedActor | None = None
        """The actor whose step this runs; None once it stopped (see :meth:`unbind`)."""
        self._live: DispatchedActor | None = None
        """``actor`` while it runs: None once it is stopped, even before it is unbound
        (one test per step instead of two)."""
        self._kind = ""
        self._urn = ""
        """Who it was, once unbound: named only if a late ask needs it."""

    # -- pykka's actor_stopped (a threading.Event there) --
    def set(self) -> None:
        self._set = True
        self._live = None

    def is_set(self) -> bool:
        return self._set

    # -- pykka's ActorInbox protocol --
    def put(self, envelope: Envelope[Any], /) -> None:
        self.append(envelope)
        if self.dispatcher is not None:
            self.dispatcher.submit(self)

    # get and empty complete pykka's ActorInbox protocol; the step reads the
    # deque itself.
    def get(self) -> Envelope[Any]:
        item = self.popleft()
        return item if type(item) is Envelope else Envelope(item)

    def empty(self) -> bool:
        return not self

    def bind(self, actor: DispatchedActor) -> None:
        """Start running ``actor``'s messages, those already queued included."""
        if not self._set:  # not already stopped (a failed on_start, run on another thread)
            self.actor = self._live = actor
        self.dispatcher = dispatcher = actor.dispatcher
        for _ in range(len(self)):
            dispatcher.submit(self)

    def unbind(self, actor: DispatchedActor) -> None:
        """The actor stopped: answer what still arrives without it.

        While bound, the actor holds this inbox and this inbox holds the
        actor: a reference cycle, which only the cyclic collector frees, and
        a full collection stalls every request (40-60 ms with 16,384 leases
        held). Unbound, a stopped actor is freed as soon as its last
        reference goes. An ask that raced the stop is still answered.
        """
        # Every release stops a lease actor: keep the parts of its name, and
        # format it only for the rare ask that arrives too late.
        self._kind, self._urn = type(actor).__name__, actor.actor_urn
        self.actor = self._live = None

    def __call__(self) -> None:
        """Handle one message, exactly as pykka's threaded loop handles an envelope."""
        if not self:
            return
        item = self.popleft()
        actor = self._live
        if actor is not None and type(item) not in _NOT_PLAIN:
            # A tell of an actor's own message to a live actor, as almost every
            # hop is: the same steps as below, without the reply to see to.
            try:
                actor.on_receive(item)
            except Exception:  # noqa: BLE001 - pykka semantics: a failed tell kills the actor
                _crashed(actor)
            except BaseException:
                actor._stop()
                raise
            return
        actor = self.actor
        if type(item) is Envelope:
            message, reply_to = item.message, item.reply_to
        else:
            message, reply_to = item, None
        if actor is None or self._set:
            if reply_to is not None:
                name = f"{self._kind} ({self._urn})" if actor is None else str(actor.actor_ref)
                _answer_dead(message, reply_to, name)
            return
        try:
            # pykka's _handle_receive tests four control types before calling
            # on_receive; one set lookup does that for every ordinary message.
            if type(message) in _PYKKA_MESSAGES:
                response = actor._handle_receive(message)
            else:
                response = actor.on_receive(message)
            if reply_to is not None:
                reply_to.set(response)
        except Exception:  # noqa: BLE001 - pykka semantics: any handler error goes to the asker
            if reply_to is not None:
                reply_to.set_exception()
            else:
                _crashed(actor)
        except BaseException:
            actor._stop()
            raise


def _crashed(actor: DispatchedActor) -> None:
    """A tell failed (called in its except block): pykka stops the actor and calls
    ``on_failure``; the dispatcher then records the crash (see the module docstring)."""
    exc = sys.exc_info()[1]
    actor._handle_failure(*sys.exc_info())
    try:
        actor.on_failure(*sys.exc_info())
    finally:
        assert exc is not None
        actor.dispatcher.report_crash(exc)


def _answer_dead(message: Any, reply_to: pykka.Future[Any] | None, name: str) -> None:
    """pykka's answer to a message its actor will never handle."""
    if reply_to is None:
        return
    if isinstance(message, _ActorStop):
        reply_to.set(None)
    else:
        reply_to.set_exception(exc_info=(ActorDeadError, ActorDeadError(f"{name} stopped"), None))


class DispatchedRef(pykka.ActorRef[Any]):
    """An ``ActorRef`` whose ``tell`` goes straight to the dispatcher.

    pykka's ``tell`` costs eight Python calls (``is_alive``, the event,
    the envelope, the inbox, the scheduling); a pair of requests makes
    thirteen hops, so this one does the same in two: check the stopped
    flag, queue the message, submit the step.
    """

    def __init__(self, actor: DispatchedActor) -> None:
        super().__init__(actor)
        self._inbox = actor.actor_inbox

    def tell(self, message: Any) -> None:
        """Queue ``message`` for the actor; raise ``ActorDeadError`` if it stopped."""
        inbox = self._inbox
        if inbox._set:
            raise ActorDeadError(f"{self} not found")
        inbox.append(message)
        dispatcher = inbox.dispatcher
        if dispatcher is not None:  # Dispatcher.submit, inlined: one call less per hop
            dispatcher._ready.append(inbox)
            if dispatcher.selecting:
                dispatcher.wake()


_urns = itertools.count(1)


class DispatchedActor(pykka.Actor):
    """A pykka actor that runs on a shared :class:`Dispatcher` instead of its own thread."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        # pykka.Actor.__init__ builds exactly these four fields; this builds
        # cheaper equivalents (as pykka's own actor types customise the inbox
        # and futures): a process-unique URN, and our inbox, which is also
        # the stopped flag (pykka's is a threading.Event: a Condition and a
        # Lock per actor, a tenth of recovery's start-up of 16,384 lease actors).
        self.actor_urn = f"urn:lockd:{next(_urns)}"
        inbox = self._create_actor_inbox()
        self.actor_inbox: _Inbox = inbox
        self.actor_stopped: _Inbox = inbox  # type: ignore[assignment]
        self._actor_ref = DispatchedRef(self)
        self.dispatcher = dispatcher

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> pykka.ActorRef[Any]:
        """Start the actor on its dispatcher, without entering pykka's ActorRegistry.

        The registry keeps every actor in one list under a lock and removes
        stopped ones by linear search: with an actor per lease (16,384 at the
        scale target) each stop would scan them all. Nothing here looks
        actors up globally; refs are passed in messages.
        """
        obj = cls(*args, **kwargs)
        obj.dispatcher.actors.add(obj)
        obj._start_actor_loop()
        return obj.actor_ref

    def _stop(self) -> None:
        self.actor_stopped.set()
        self._let_go()
        try:
            self.on_stop()
        except Exception:  # noqa: BLE001 - pykka semantics: on_stop failures are logged
            self._handle_failure(*sys.exc_info())

    def _actor_loop_setup(self) -> None:
        # pykka stops an actor whose on_start raises, and nothing else happens:
        # whoever waits for its reply would wait forever. Like a failed tell, it
        # is a crash the loop reports (the daemon fails fast).
        try:
            self.on_start()
        except Exception as exc:  # noqa: BLE001 - reported, and re-raised by the loop
            self._handle_failure(*sys.exc_info())
            self.dispatcher.report_crash(exc)
        except BaseException:
            self._stop()
            raise

    def _handle_failure(self, *exc_info: Any) -> None:
        super()._handle_failure(*exc_info)  # logs it and sets the stopped flag
        self._let_go()

    def _let_go(self) -> None:
        """Stopped: the inbox and the dispatcher no longer hold this actor."""
        self.actor_inbox.unbind(self)
        self.dispatcher.actors.discard(self)

    @staticmethod
    def _create_actor_inbox() -> _Inbox:
        return _Inbox()

    @staticmethod
    def _create_future() -> ThreadingFuture[Any]:
        return ThreadingFuture()

    def _start_actor_loop(self) -> None:
        self.dispatcher.submit(self._actor_loop_setup)
        self.actor_inbox.bind(self)
