"""Fault injection for the tests: inert unless ``DALI_OBJCROP_FAULT`` is set.

A test that must interrupt a job at a known point (a kill after the first chunk, a job paused while it
holds its lock) sets ``DALI_OBJCROP_FAULT=<point>:<n>:<action>`` in the job's environment instead of
polling for files and racing the job with a signal.  The job calls :func:`point` at a few named places;
the ``n``-th time (counted from 1, per process) it reaches the named point, the action runs:

* ``kill``: SIGKILL this process (as ``kill -9``: no cleanup, no ``finally``);
* ``stop``: SIGSTOP this process (the test sees it stopped, e.g. with ``os.waitpid(pid, os.WUNTRACED)``,
  does what it must while the job is frozen at that point, then sends SIGCONT or kills it);
* ``raise``: raise :class:`InjectedFault` (a crash the job's own error handling sees).

Points (each reached by the process that runs the job's main loop, never by a worker process):

* ``proposals.chunk``: a proposals job counted a finished chunk (its file is written);
* ``pack.shard``: ``pack`` wrote a shard and its index;
* ``pretrain.checkpoint``: the trainer's master rank saved its checkpoint(s) of a step.
"""
from __future__ import annotations

import os
import signal

ENV = "DALI_OBJCROP_FAULT"
ACTIONS = ("kill", "stop", "raise")
_seen: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """The ``raise`` action's exception."""


def point(name: str) -> None:
    """Reached the named point: run the action ``DALI_OBJCROP_FAULT`` asks for here, if any."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, rest = spec.partition(":")
    if where != name:
        return
    count, _, action = rest.partition(":")
    if not count.isdigit() or action not in ACTIONS:
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<n>:<{'|'.join(ACTIONS)}>")
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != int(count):
        return
    if action == "raise":
        raise InjectedFault(f"{ENV}: injected fault at {name} #{count}")
    os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
