"""setup_logging: rank 0 logs INFO to stdout and appends to its text log; other ranks log warnings only, prefixed."""
import logging
import re

from classification.utils.logging import setup_logging

LINE = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d probe\] \(test_logging\.py \d+\) "


def test_rank_zero_logs_info_to_stdout_and_appends_to_its_file(tmp_path, isolated_logging, capsys):
    setup_logging(tmp_path / "run", rank=0, log_name="train.log")  # creates the folder
    (tmp_path / "run" / "train.log").write_text("a line of an earlier run\n")
    root = setup_logging(tmp_path / "run", rank=0, log_name="train.log")
    assert root is logging.getLogger() and root.level == logging.INFO
    logging.getLogger("probe").info("hello %d", 1)
    logging.getLogger("probe").debug("too fine")
    out, err = capsys.readouterr()
    assert re.fullmatch(LINE + r"INFO: hello 1\n", out) and err == ""
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert lines[0] == "a line of an earlier run" and len(lines) == 2
    assert re.fullmatch(LINE + "INFO: hello 1", lines[1])


def test_other_ranks_log_warnings_to_stdout_only_and_say_their_rank(tmp_path, isolated_logging, capsys):
    root = setup_logging(tmp_path, rank=2, log_name="train.log")
    assert root.level == logging.WARNING
    logging.getLogger("probe").info("not for rank 2")
    logging.getLogger("probe").warning("for every rank")
    out, err = capsys.readouterr()
    assert re.fullmatch(r"\[rank 2\] " + LINE + r"WARNING: for every rank\n", out) and err == ""
    assert not (tmp_path / "train.log").exists()


def test_a_second_set_up_closes_the_first_ones_file(tmp_path, isolated_logging):
    root = setup_logging(tmp_path, rank=0, log_name="first.log")
    (first,) = [handler for handler in root.handlers if isinstance(handler, logging.FileHandler)]
    assert first.stream is not None and not first.stream.closed
    root = setup_logging(tmp_path, rank=0, log_name="second.log")
    assert first.stream is None or first.stream.closed  # not left open (main() run again in one process)
    assert [handler.baseFilename for handler in root.handlers if isinstance(handler, logging.FileHandler)] == [
        str(tmp_path / "second.log")]
