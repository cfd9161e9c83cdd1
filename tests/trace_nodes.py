"""Nodes for the tracing tests: ``trace.plan`` → planner → ``trace.work`` → worker.

The planner asks the worker (request/reply) and announces ``trace.done``
(an event the worker also consumes), so one task crosses every span kind.
"""

from __future__ import annotations

from typing import Any

from nodes import Context, Node

planner = Node("planner")
worker = Node("worker")


@planner.handles("trace.plan")
async def plan(task: dict[str, Any], ctx: Context) -> dict[str, Any]:
    result = await ctx.request("trace.work", {"n": task["n"]})
    await ctx.publish("trace.done", {"n": task["n"]})
    return {"planned": task["n"], "result": result}


@worker.handles("trace.work")
async def work(task: dict[str, Any]) -> dict[str, Any]:
    return {"doubled": task["n"] * 2}


@worker.handles("trace.done")
async def done(event: dict[str, Any]) -> None:
    return None
