"""jaxkd.cli_flags: what every command does before its work."""
import argparse
import logging
import os

from jaxkd import cli_flags


def test_a_command_sets_transformers_quiet_before_its_work_and_leaves_logging_alone(monkeypatch):
    """predict, evaluate and export (run_main) set transformers' verbosity before it is imported
    (it announces a missing PyTorch at import otherwise); the root logger, which a caller
    running them in-process owns, is left as it was."""
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "filters", [])
    seen = {}

    def run(args):
        seen["verbosity"] = os.environ.get("TRANSFORMERS_VERBOSITY")
        return 0

    assert cli_flags.run_main(argparse.ArgumentParser(), run, []) == 0
    assert seen == {"verbosity": "error"}
    assert root.filters == []
