"""Loading a node from ``module:attribute`` and serving it until told to stop."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import signal
import sys
from collections.abc import Callable

from mesh import MeshClient, Tracing
from mesh._errors import AppNotFound
from nodes._node import Node
from nodes._runtime import NodeRuntime

log = logging.getLogger("mesh.node")


def load_node(spec: str) -> Node:
    """Import ``module:attribute`` and return the :class:`Node` it names.

    The attribute may also be a function taking no arguments that returns a Node.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppNotFound(spec, "expected MODULE:ATTRIBUTE, e.g. nodes.examples.echo:node")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppNotFound(spec, f"no module named {exc.name!r}") from None
        raise AppNotFound(spec, f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:  # the user's module raised while importing: say where
        raise AppNotFound(
            spec, f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppNotFound(spec, f"module {module_name!r} has no attribute {attr!r}") from None
    if callable(target) and not isinstance(target, Node):
        # Only a factory taking no arguments is called: calling a class or a function
        # that needs arguments would end in a TypeError traceback, not a usable error.
        if isinstance(target, type) or not _takes_no_arguments(target):
            what = "a class" if isinstance(target, type) else "a callable that needs arguments"
            raise AppNotFound(
                spec,
                f"{attr!r} is {what}, not a nodes.Node "
                "(or a function taking no arguments that returns one)",
            )
        target = target()
    if not isinstance(target, Node):
        raise AppNotFound(spec, f"{attr!r} is a {type(target).__name__}, not a nodes.Node")
    if not target.handlers:
        raise AppNotFound(spec, f"node {target.name!r} has no handlers")
    return target


def _takes_no_arguments(func: Callable[..., object]) -> bool:
    try:
        inspect.signature(func).bind()
    except (TypeError, ValueError):  # needs arguments, or has no inspectable signature
        return False
    return True


async def serve(
    node: Node,
    url: str,
    *,
    stop: asyncio.Event,
    tracing: Tracing | None = None,
    on_ready: Callable[[NodeRuntime], None] | None = None,
    register: bool = True,
) -> None:
    """Connect, run ``node`` until ``stop`` is set, then drain and close."""
    client = await MeshClient.connect(url, name=node.name, tracing=tracing)
    async with client, NodeRuntime(node, client, register=register) as runtime:
        if on_ready is not None:
            on_ready(runtime)
        await stop.wait()


def run_process(
    node: Node,
    url: str,
    *,
    tracing: Tracing | None = None,
    on_ready: Callable[[NodeRuntime], None] | None = None,
) -> None:
    """Serve ``node`` in this process until SIGTERM or SIGINT; a second signal exits at once."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second signal: exiting without draining")
                sys.exit(128 + signum)
            log.info("draining on %s", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await serve(node, url, stop=stop, tracing=tracing, on_ready=on_ready)

    try:
        asyncio.run(main())
    finally:
        if tracing is not None:
            tracing.shutdown()
