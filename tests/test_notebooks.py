"""The notebooks run top to bottom on the bundled demo model, and what each one claims is asserted."""

from __future__ import annotations


def test_01_quickstart(run_notebook):
    run_notebook("01_quickstart.ipynb", """
asked = dash.max_new_tokens.value
assert len(trace.generated_ids) == asked, (len(trace.generated_ids), asked)
assert dsv2viz.Trace.load(folder) == trace
html = open(report_path, encoding="utf-8").read()
assert html.count('class="plotly-graph-div"') >= 10
import re
assert not re.search(r'<script[^>]+src="https?:', html), "the report must not load scripts from the network"
""")
