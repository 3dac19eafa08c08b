"""benchmarks/newest_releases.py: the parts that turn pip and pytest output into a report."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import newest_releases as nr  # noqa: E402


def test_pins_are_read_and_compared_by_normalised_name():
    tested = nr.read_pins("# comment\ntorch==2.13.0\nlm_eval==0.4.13\nPyYAML==6.0.4\n")
    newest = nr.read_pins("torch==2.14.1+cpu\nlm-eval==0.4.13\npyyaml==6.0.4\nnewdep==1.0\n")
    assert tested == {"torch": "2.13.0", "lm-eval": "0.4.13", "pyyaml": "6.0.4"}
    assert nr.version_changes(tested, newest) == [
        {"package": "newdep", "tested": None, "newest": "1.0"},
        {"package": "torch", "tested": "2.13.0", "newest": "2.14.1"},
    ]


def test_constraints_file_pins_what_pyproject_needs():
    pins = nr.read_pins((REPO / "constraints.txt").read_text())
    for name in ("torch", "transformers", "tokenizers", "lm-eval", "numpy", "ruff", "pytest"):
        assert name in pins, name
    assert "memlm" not in pins


def test_failures_are_read_from_junit_xml(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad">'
        '<failure message="AssertionError: 1 != 2">trace</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error message="">boom\nmore'
        '</error></testcase></testsuite></testsuites>')
    assert nr.failures_from_junit(xml) == [
        {"test": "tests.test_a::test_bad", "kind": "failure", "message": "AssertionError: 1 != 2"},
        {"test": "tests.test_b::test_err", "kind": "error", "message": "boom"},
    ]
    assert nr.failures_from_junit(tmp_path / "missing.xml") == []
