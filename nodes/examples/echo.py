"""The smallest agent: ``demo.echo`` replies with what it got.

mesh node run nodes.examples.echo:node
mesh request demo.echo '{"text": "hi"}'
"""

from __future__ import annotations

from typing import Any

from nodes import Node

node = Node("echo", description="Replies with the request it received")


@node.handles("demo.echo")
async def echo(message: Any) -> Any:
    return message
