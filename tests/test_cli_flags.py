"""jaxkd.cli_flags: what every command does before its work."""
import argparse
import logging

from jaxkd import cli_flags


def test_a_command_runs_with_the_libraries_notices_off(monkeypatch):
    """predict, evaluate and export (run_main) set transformers' verbosity before it is imported
    (it announces a missing PyTorch at import otherwise) and keep a library's INFO lines on the
    root logger out of their output, its warnings in."""
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "filters", list(root.filters))
    seen = {}

    def run(args):
        import os
        seen["verbosity"] = os.environ.get("TRANSFORMERS_VERBOSITY")
        make = lambda level: logging.LogRecord("root", level, __file__, 1, "m", None, None)  # noqa: E731
        seen["info"], seen["warning"] = root.filter(make(logging.INFO)), root.filter(make(logging.WARNING))
        return 0

    assert cli_flags.run_main(argparse.ArgumentParser(), run, []) == 0
    assert seen == {"verbosity": "error", "info": False, "warning": True}
