"""Repository-wide pytest configuration.

nbval compares every output of every chapter (strict mode). One deliberate exemption:
text written to stderr (progress bars, warnings) is not compared, because tqdm's
refresh rate and library warnings vary from run to run while the numbers do not.
"""

import nbval.plugin

_compare_outputs = nbval.plugin.IPyNbCell.compare_outputs


def _without_stderr(outputs):
    return [o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]


def compare_outputs_ignoring_stderr(self, test, ref, skip_compare=None):
    return _compare_outputs(self, _without_stderr(test), _without_stderr(ref), skip_compare)


nbval.plugin.IPyNbCell.compare_outputs = compare_outputs_ignoring_stderr
