"""Node processes: one agent per process, its handlers, lifecycle and registration.

    from nodes import Node

    node = Node("echo")

    @node.handles("demo.echo")
    async def echo(message: dict) -> dict:
        return message

Run it with ``mesh node run mymodule:node``.
"""

from nodes._node import Context, Handler, HandlerStats, Node
from nodes._registry import NodeInfo, list_nodes
from nodes._runner import load_node, serve
from nodes._runtime import NodeRuntime

__all__ = [
    "Context",
    "Handler",
    "HandlerStats",
    "Node",
    "NodeInfo",
    "NodeRuntime",
    "list_nodes",
    "load_node",
    "serve",
]
