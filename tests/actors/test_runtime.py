"""The dispatcher runtime keeps pykka's semantics without a thread per actor."""

from __future__ import annotations

import gc
import os
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pykka
import pytest
from pykka._envelope import Envelope

from actors.runtime import ActorCrashedError, DispatchedActor, Dispatcher, _Inbox


class Recorder(DispatchedActor):
    def __init__(self, dispatcher: Dispatcher, log: list[Any]) -> None:
        super().__init__(dispatcher)
        self.log = log

    def on_start(self) -> None:
        self.log.append(("start", self.actor_urn))

    def on_receive(self, message: Any) -> Any:
        if message == "boom":
            raise ValueError("boom")
        self.log.append(message)
        return f"got {message}"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_messages_are_handled_in_the_order_they_were_sent(dispatcher: Dispatcher) -> None:
    """Across actors, steps run in global send order, each actor one message at a time."""
    log: list[Any] = []
    a = Recorder.start(dispatcher, log)
    b = Recorder.start(dispatcher, log)
    for i in range(3):
        a.tell(("a", i))
        b.tell(("b", i))
    dispatcher.run_until_idle()
    assert [m for m in log if m[0] != "start"] == [
        ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)
    ]  # fmt: skip


def test_many_actors_share_one_thread(dispatcher: Dispatcher) -> None:
    """Starting thousands of actors starts no thread."""
    before = threading.active_count()
    refs = [Recorder.start(dispatcher, []) for _ in range(2000)]
    dispatcher.run_until_idle()
    assert threading.active_count() == before
    assert all(ref.is_alive() for ref in refs)


def test_ask_from_another_thread_gets_the_reply(dispatcher: Dispatcher) -> None:
    """Embedding code asks actors from its own thread while the dispatcher runs."""
    dispatcher.start()
    try:
        ref = Recorder.start(dispatcher, [])
        assert ref.ask("hi", timeout=5) == "got hi"
    finally:
        dispatcher.stop()


def test_failed_ask_returns_the_error_and_the_actor_lives(dispatcher: Dispatcher) -> None:
    """An exception in an ask goes to the asker, as in pykka."""
    ref = Recorder.start(dispatcher, [])
    future = ref.ask("boom", block=False)
    dispatcher.run_until_idle()
    with pytest.raises(ValueError, match="boom"):
        future.get(timeout=0)
    assert ref.is_alive()


def test_failed_tell_is_a_crash_the_loop_reports(dispatcher: Dispatcher) -> None:
    """A tell that raises kills the actor and surfaces as a crash, never silently."""
    ref = Recorder.start(dispatcher, [])
    ref.tell("boom")
    with pytest.raises(ActorCrashedError):
        dispatcher.run_until_idle()
    assert not ref.is_alive()


def test_stop_answers_queued_asks_with_actor_dead(dispatcher: Dispatcher) -> None:
    """Asks behind a stop are answered, so no caller waits forever."""
    ref = Recorder.start(dispatcher, [])
    stop = ref.ask(pykka.messages._ActorStop(), block=False)
    late = ref.ask("late", block=False)
    dispatcher.run_until_idle()
    assert stop.get(timeout=0) is None
    with pytest.raises(pykka.ActorDeadError, match=r"Recorder \(urn:lockd:\d+\) stopped"):
        late.get(timeout=0)


def test_timers_fire_in_deadline_order_and_can_be_cancelled() -> None:
    """call_later runs callbacks when their time comes, on the dispatcher."""
    clock = Clock()
    d = Dispatcher(clock=clock)
    fired: list[str] = []
    d.call_later(2.0, lambda: fired.append("late"))
    d.call_later(1.0, lambda: fired.append("early"))
    cancelled = d.call_later(1.5, lambda: fired.append("never"))
    cancelled.cancel()
    d.run_until_idle()
    assert fired == []
    clock.now = 1.0
    d.run_until_idle()
    assert fired == ["early"]
    clock.now = 5.0
    d.run_until_idle()
    assert fired == ["early", "late"]
    d.close()


class _Held:
    """Stands for what a timer's closure keeps alive (a connection's ref and inbox)."""


def test_cancelled_timers_let_go_at_once_and_the_rest_fire_in_order() -> None:
    """Thousands of long timers cancelled (closed connections' idle checks): what each
    would have run is freed at the cancel, not at its deadline, and every timer not
    cancelled still fires once, in deadline order, however the queue was cut down."""
    clock = Clock()
    d = Dispatcher(clock=clock)
    fired: list[int] = []
    held: list[weakref.ref[_Held]] = []

    def later(i: int) -> Any:
        thing = _Held()
        held.append(weakref.ref(thing))

        def run() -> None:
            assert thing is not None
            fired.append(i)

        return d.call_later(60.0 + (i * 7919 % 3000) / 100, run)

    timers = [later(i) for i in range(3000)]
    kept = {i for i in range(3000) if i % 10 == 3}
    for i, timer in enumerate(timers):
        if i not in kept:
            timer.cancel()
            timer.cancel()  # twice: harmless
    gc.collect()
    assert [i for i, ref in enumerate(held) if ref() is not None] == sorted(kept)
    clock.now = 200.0
    d.run_until_idle()
    assert fired == sorted(kept, key=lambda i: (i * 7919 % 3000, i))
    timers[3].cancel()  # after it ran: harmless
    d.close()


def test_tell_to_a_stopped_actor_raises_actor_dead(dispatcher: Dispatcher) -> None:
    """A tell after the stop is refused at once, as pykka's own refs refuse it."""
    ref = Recorder.start(dispatcher, [])
    ref.stop(block=False)
    dispatcher.run_until_idle()
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("late")


def test_tells_and_asks_interleave_in_send_order(dispatcher: Dispatcher) -> None:
    """Tells (queued bare) and asks (queued with their future) keep one order."""
    log: list[Any] = []
    ref = Recorder.start(dispatcher, log)
    ref.tell(1)
    future = ref.ask(2, block=False)
    ref.tell(3)
    dispatcher.run_until_idle()
    assert log[1:] == [1, 2, 3]
    assert future.get(timeout=0) == "got 2"


def test_a_tell_from_another_thread_wakes_the_waiting_loop() -> None:
    """The loop waits in select with no timeout; another thread's tell must end the wait."""
    d = Dispatcher()
    log: list[Any] = []
    ref = Recorder.start(d, log)
    d.run_until_idle()

    def tell_once_waiting() -> None:
        while not d.selecting:
            threading.Event().wait(0.001)
        ref.tell("from another thread")

    teller = threading.Thread(target=tell_once_waiting)
    teller.start()
    try:
        started = time.monotonic()
        d.run_once(timeout=20.0)  # returns at once when woken, else after the timeout
        assert time.monotonic() - started < 10.0, "the tell did not wake the loop"
        d.run_until_idle()
        assert log[1:] == ["from another thread"]
    finally:
        teller.join(timeout=60)
        d.stop_all()
        d.run_until_idle()
        d.close()


def test_a_wake_up_being_written_as_the_loop_closes_is_written_before_the_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread that found the wake-up pipe open (a tell from an embedding program's thread
    as its service stops) writes to it before the loop's close, never to its closed fd
    number (EBADF then, or a byte into whatever file the program opened under it)."""
    d = Dispatcher()
    d.selecting = True
    wake_fd = d._wake_w
    writing, go_on = threading.Event(), threading.Event()
    failed: list[OSError] = []
    write = os.write

    def slow_write(fd: int, data: bytes) -> int:
        if fd == wake_fd and threading.current_thread() is not threading.main_thread():
            writing.set()
            go_on.wait(30)
        return write(fd, data)

    def wake() -> None:
        try:
            d.wake()
        except OSError as exc:
            failed.append(exc)

    monkeypatch.setattr(os, "write", slow_write)
    waker = threading.Thread(target=wake)
    waker.start()
    assert writing.wait(30)
    closer = threading.Thread(target=d.close)
    closer.start()
    closer.join(0.2)  # unfixed, it closed the pipe here; fixed, it waits for the write
    go_on.set()
    waker.join(30)
    closer.join(30)
    assert failed == []
    d.wake()  # closed: nothing written, nothing raised


def test_a_stopped_actor_is_freed_without_the_cyclic_collector(dispatcher: Dispatcher) -> None:
    """Once stopped and unreferenced, an actor is gone at once (one per released lease)."""
    gc.disable()
    try:
        ref = Recorder.start(dispatcher, [])
        actor = weakref.ref(ref._actor_weakref())
        ref.stop(block=False)
        dispatcher.run_until_idle()
        del ref
        assert actor() is None
    finally:
        gc.enable()


def test_an_ask_that_races_the_stop_is_answered(dispatcher: Dispatcher) -> None:
    """An ask queued after the actor stopped (another thread passed the alive check
    just before) gets ActorDeadError, not a wait until its timeout."""
    ref = Recorder.start(dispatcher, [])
    ref.stop(block=False)
    dispatcher.run_until_idle()
    late: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
    ref.actor_inbox.put(Envelope("late", reply_to=late))
    dispatcher.run_until_idle()
    with pytest.raises(pykka.ActorDeadError):
        late.get(timeout=0)


class Quiet(DispatchedActor):
    def on_receive(self, message: Any) -> Any:
        return message


def test_a_running_actor_is_four_objects_for_the_collector(dispatcher: Dispatcher) -> None:
    """A lease actor lives as long as its lease (16,384 at the scale target), and a full
    collection, which stops every request, walks every tracked object: an actor is
    itself, its ref, its inbox (also its stopped flag and its step) and the ref's
    weakref to it; no bound methods, partials or flag objects besides."""
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        refs = [Quiet.start(dispatcher) for _ in range(200)]
        dispatcher.run_until_idle()
        per_actor = (len(gc.get_objects()) - before - 1) / len(refs)  # the list itself
        assert per_actor <= 4
        futures = [ref.ask("still served?", block=False) for ref in refs]
        dispatcher.run_until_idle()
        assert {future.get(timeout=0) for future in futures} == {"still served?"}
    finally:
        gc.enable()


def test_tells_sent_before_an_actor_is_bound_wait_for_its_start(dispatcher: Dispatcher) -> None:
    """A message that reaches an actor while it is still being started (its __init__
    handed its ref out) is handled after on_start, never before, and never lost."""
    log: list[Any] = []

    class Eager(Recorder):
        def __init__(self, dispatcher: Dispatcher, log: list[Any]) -> None:
            super().__init__(dispatcher, log)
            self.actor_ref.tell("sent during __init__")

    ref = Eager.start(dispatcher, log)
    dispatcher.run_until_idle()
    assert log == [("start", ref.actor_urn), "sent during __init__"]


def test_an_actor_whose_start_fails_is_a_crash_and_is_let_go(dispatcher: Dispatcher) -> None:
    """on_start raising stops the actor (pykka's semantics) and, like a failed tell, is a
    crash the loop reports: whoever waits for the actor's reply must not wait forever.
    Neither its inbox nor the dispatcher holds it any more (the log record of the error
    may, for a while); a tell to it says it is dead."""

    class Broken(Recorder):
        def on_start(self) -> None:
            raise RuntimeError("cannot start")

    ref = Broken.start(dispatcher, [])
    with pytest.raises(ActorCrashedError):
        dispatcher.run_until_idle()
    dispatcher.crashes.clear()
    inbox = ref.actor_inbox
    assert isinstance(inbox, _Inbox)
    assert inbox.actor is None
    assert not dispatcher.actors
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("anyone?")


def test_fd_watches_report_readiness_and_one_callback_can_unwatch_another(
    dispatcher: Dispatcher,
) -> None:
    """Two sockets ready in one wait, and the first callback closes the other connection
    (a re-exec's or a disconnect's doing): the closed one's callback must not run, on a
    socket that is closed, or whose fd number is already another connection's."""
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    calls: list[tuple[str, int]] = []

    def closing(name: str, other: socket.socket) -> Callable[[int], None]:
        def callback(mask: int) -> None:
            calls.append((name, mask))
            dispatcher.unwatch(other.fileno())

        return callback

    try:
        dispatcher.watch(first.fileno(), selectors.EVENT_READ, closing("first", second))
        dispatcher.watch(second.fileno(), selectors.EVENT_READ, closing("second", first))
        first_peer.send(b"x")
        second_peer.send(b"x")
        dispatcher.run_once(timeout=1.0)
        assert len(calls) == 1
        assert calls[0][1] == selectors.EVENT_READ
        # Watching again replaces the events and the callback; a hang-up wakes a reader.
        fd = first.fileno() if calls[0][0] == "first" else second.fileno()
        peer = first_peer if calls[0][0] == "first" else second_peer
        dispatcher.watch(fd, selectors.EVENT_WRITE, lambda mask: calls.append(("w", mask)))
        dispatcher.run_once(timeout=1.0)
        assert calls[-1] == ("w", selectors.EVENT_WRITE)
        dispatcher.watch(fd, selectors.EVENT_READ, lambda mask: calls.append(("r", mask)))
        peer.close()
        dispatcher.run_once(timeout=1.0)
        assert calls[-1] == ("r", selectors.EVENT_READ)
        dispatcher.unwatch(fd)
        dispatcher.unwatch(fd)  # harmless twice
        assert not dispatcher.watching(fd)
    finally:
        for s in (first, first_peer, second, second_peer):
            s.close()


def test_a_negative_timeout_polls_without_waiting_as_selectors_did() -> None:
    """``run_once(timeout)`` with a deadline already past (a negative timeout) polls and
    returns, as it did on ``selectors``, which takes any timeout <= 0 as "do not wait".
    ``epoll.poll`` takes a negative one as "wait for ever": with nothing ready the loop
    hung until some fd or another thread's tell woke it."""
    d = Dispatcher()
    loop = threading.Thread(target=d.run_once, kwargs={"timeout": -1.0})
    try:
        loop.start()
        loop.join(timeout=30)  # returns at once; 30 s only bounds a hang
        assert not loop.is_alive(), "run_once(-1.0) waited for I/O"
    finally:
        while loop.is_alive():  # wake a hung poll so the thread ends
            d._wake()
            loop.join(timeout=1)
        d.close()
