"""Example agents: ``echo``, and a planner/researcher/writer pipeline (``pipeline``)."""
