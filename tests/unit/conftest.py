"""The unit tier: no servers."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the import-graph test's worker and trainer processes early when that test will run."""
    if config.option.collectonly:
        return
    from tests.unit import test_import_graph

    if any(getattr(item, "module", None) is test_import_graph and "process_kinds" in getattr(item, "fixturenames", ())
           for item in items):
        test_import_graph.start_process_kinds()
