"""`opd-toys bench` rewrites its generated sections and keeps the hand-written reading."""

from toys.bench import READING_MARKER, _keep_reading


def test_rewrite_keeps_the_hand_written_reading(tmp_path):
    out = tmp_path / "benchmarks.md"
    assert _keep_reading(out, "# new numbers\n") == "# new numbers\n"  # no file yet: just the report
    out.write_text(f"# old numbers\n\n{READING_MARKER}\n## Reading\nwhat it means\n")
    text = _keep_reading(out, "# new numbers\n")
    assert text.startswith("# new numbers\n")
    assert "old numbers" not in text
    assert text.endswith(f"{READING_MARKER}\n## Reading\nwhat it means\n")
    out.write_text("# old numbers without a reading\n")
    assert _keep_reading(out, "# new numbers\n") == "# new numbers\n"
