"""pytest plugin: one line per skip reason with its count, after the run (scripts/run_tests.sh loads it with
``-p skip_summary``), so that a CPU run says why its GPU tests did not run without listing each one."""

from __future__ import annotations

from collections import Counter


def skip_reason(report) -> str:
    """The reason of a skipped test's report (``longrepr`` is ``(path, line, "Skipped: reason")``)."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter) -> None:
    reasons = Counter(skip_reason(report) for report in terminalreporter.stats.get("skipped", []))
    if not reasons:
        return
    terminalreporter.section(f"{sum(reasons.values())} skipped, by reason")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:6d}  {reason}")
