"""Repository-wide pytest configuration.

Every process of the suite, and every notebook kernel nbval starts (kernels inherit this
environment), computes on one thread. The chapters' committed outputs were produced the
same way (tools/execute.py), so a different thread count cannot change a printed digit,
and two test workers on two cores never oversubscribe them.

nbval compares every output of every chapter (strict mode), with two exemptions:

* text written to stderr (progress bars, warnings) is not compared, because tqdm's
  refresh rate and library warnings vary from run to run while the numbers do not;
* a cell that opens with ``# varies: <why>`` or ``# machine: <what>`` is run but its
  output is not compared: the book's one mechanism for outputs that differ between
  machines (see ``companion.varies`` and CONTRIBUTING.md; tests/test_portability.py
  checks that every ``# varies:`` cell is followed by an executed band check).
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import nbval.plugin  # noqa: E402  (after the thread settings, which must come first)

from companion.varies import exemption  # noqa: E402

_find_comment_markers = nbval.plugin.find_comment_markers


def find_comment_markers(cellsource):
    """nbval's own markers, plus ours: an exempt cell's output is not compared."""
    yield from _find_comment_markers(cellsource)
    if exemption(cellsource):
        yield ("check", False)


nbval.plugin.find_comment_markers = find_comment_markers

_compare_outputs = nbval.plugin.IPyNbCell.compare_outputs


def _without_stderr(outputs):
    return [o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]


def compare_outputs_ignoring_stderr(self, test, ref, skip_compare=None):
    return _compare_outputs(self, _without_stderr(test), _without_stderr(ref), skip_compare)


nbval.plugin.IPyNbCell.compare_outputs = compare_outputs_ignoring_stderr
