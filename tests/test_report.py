"""The report's views that rerun the model and its routing paths: the direct logit attribution of the last
generated token and of the positions asked for (bars that sum to the model's own logit, recomputed here
from a plain forward pass), the note that stands in for them without a model, the routing-paths sections,
and ``dsv2viz report --model --attribution-positions``."""

from __future__ import annotations

import html
import re

import pytest
import torch

import dsv2viz
from dsv2viz import analysis, plots
from dsv2viz.cli import main
from dsv2viz.html_report import NEEDS_MODEL, build_sections
from dsv2viz.random_checkpoint import write_random_checkpoint
from dsv2viz.text import visible

ATTRIBUTION = re.compile(r"Direct logit attribution: what wrote “(.*)” after position (\d+)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("report") / "m", dtype=torch.float32)


@pytest.fixture(scope="module")
def model(checkpoint):
    return dsv2viz.load(checkpoint, device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def trace(model):
    return model.generate("def f(x):", 6).run()


def own_logits(model, trace) -> torch.Tensor:
    """(T, V) the model's logits over the trace's tokens, from one plain forward pass."""
    with torch.no_grad():
        return model(trace.token_ids[None])[0].double()


def attributed(sections) -> list[tuple[int, str, object]]:
    """(position, target label, figure) of each attribution section, in order."""
    out = []
    for s in sections:
        found = ATTRIBUTION.fullmatch(s.title)
        if found:
            out.append((int(found[2]), found[1], s.figure))
    return out


def test_attribution_explains_the_last_generated_token_then_each_position_asked_for(model, trace):
    T = len(trace)
    logits = own_logits(model, trace)
    shown = attributed(build_sections(trace, model, [3, T - 1]))
    assert [p for p, _, _ in shown] == [T - 2, 3, T - 1]  # the last generated token first
    targets = [int(trace.token_ids[T - 1]), int(trace.token_ids[4]), int(logits[T - 1].argmax())]
    for (p, label, fig), target in zip(shown, targets):
        assert label == visible(model.tokenizer.token_labels([target])[0])
        bars = sum(fig.data[0].x)  # the largest parts and one bar summing the rest
        assert bars == pytest.approx(float(logits[p, target]), abs=1e-4)
        assert f"sum to {float(logits[p, target]):.4f}" in fig.layout.title.subtitle.text
        alone = analysis.logit_attribution(model, trace, p).frame  # that position's largest parts, as labelled
        assert list(fig.layout.yaxis.ticktext[:5]) == alone["component"].head(5).tolist()


def test_routing_paths_sections_need_only_the_routing(trace):
    by_title = {s.title: s for s in build_sections(trace, None)}
    paths = analysis.routing_paths(trace)
    sankey = by_title["Routing paths across layers"]
    assert sankey.view == "routing" and sankey.figure == plots.routing_sankey(paths)
    rate = by_title["Same expert as the previous token"]
    assert rate.view == "routing"
    for m, layer in enumerate(trace.moe_layers):  # recounted from the first choices
        first = trace.routing(layer)[0][:, 0].tolist()
        same = sum(a == b for a, b in zip(first[1:], first[:-1])) / (len(first) - 1)
        assert rate.figure.data[0].y[m] == pytest.approx(same)


def test_without_a_model_the_views_that_rerun_it_say_to_pass_it(trace, tmp_path):
    page = dsv2viz.report(trace, tmp_path / "r.html").read_text(encoding="utf-8")
    for title in ("Logit lens", "Direct logit attribution"):
        found = re.search(rf"<section><h2>{title}</h2>(.*?)</section>", page, re.S)
        assert found and found[1] == f'<p class="missing">{NEEDS_MODEL}</p>', title
    note = html.unescape(re.sub(r"<[^>]+>", "", NEEDS_MODEL))
    assert note.endswith(
        "pass the model (dsv2viz.report(trace, path, model=model), or dsv2viz report TRACE -o FILE --model PATH, "
        "--demo-model for a trace of the bundled demo model)."
    )
    assert "what wrote" not in page


def test_bad_attribution_positions_are_refused_before_anything_is_written(model, trace, tmp_path):
    path = tmp_path / "r.html"
    with pytest.raises(ValueError, match=r"^attribution positions need the model, which attribution reruns"):
        dsv2viz.report(trace, path, attribution_positions=[2])
    with pytest.raises(ValueError, match=rf"^position {len(trace)} is outside the sequence of {len(trace)} tokens$"):
        dsv2viz.report(trace, path, model=model, attribution_positions=[1, len(trace)])
    other = dsv2viz.load(progress=False)  # the demo model: another configuration
    with pytest.raises(ValueError, match="recorded with a model of another configuration; pass that model"):
        dsv2viz.report(trace, path, model=other)
    assert not path.exists()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsv2viz report: error: "), err
    return err


def test_cli_report_with_attribution_positions(checkpoint, trace, tmp_path, capsys):
    saved = trace.save(tmp_path / "t")
    out = tmp_path / "r.html"
    assert (
        main(["report", str(saved), "-o", str(out), "--model", str(checkpoint), "--attribution-positions", "2,-1"]) == 0
    )
    page = out.read_text(encoding="utf-8")
    positions = [
        int(p) for p in re.findall(r"<h2>Direct logit attribution: what wrote “[^<]*” after position (\d+)</h2>", page)
    ]
    assert positions == [len(trace) - 2, 2, len(trace) - 1]
    capsys.readouterr()
    # the positions are checked against the trace before the model is read: a bad model folder is not reached
    assert (
        main(["report", str(saved), "-o", str(out), "--model", str(tmp_path / "nope"), "--attribution-positions", "50"])
        == 1
    )
    assert f"position 50 is outside the sequence of {len(trace)} tokens" in one_error_line(capsys)
    assert main(["report", str(saved), "-o", str(out), "--attribution-positions", "2"]) == 1
    assert "attribution positions need the model" in one_error_line(capsys)
    with pytest.raises(SystemExit) as parser_exit:  # argparse's own error, in the same one-line form
        main(["report", str(saved), "-o", str(out), "--attribution-positions", "2,x"])
    assert parser_exit.value.code == 1
    assert "expected comma-separated whole numbers such as 3,7,-1, got '2,x'" in one_error_line(capsys)
    assert out.read_text(encoding="utf-8") == page  # no failed run touched the report


def test_cli_report_of_a_demo_model_trace_with_demo_model(tmp_path, capsys):
    demo = dsv2viz.load(progress=False)
    trace = demo.generate("def 面积(w):", 4).run()
    saved = trace.save(tmp_path / "t")
    out = tmp_path / "r.html"
    assert main(["report", str(saved), "-o", str(out), "--demo-model", "--attribution-positions", "2"]) == 0
    page = out.read_text(encoding="utf-8")
    found = re.findall(r"<h2>Direct logit attribution: what wrote “([^<]*)” after position (\d+)</h2>", page)
    assert [int(p) for _, p in found] == [len(trace) - 2, 2]
    expected = analysis.logit_attribution(demo, trace, 2)  # the same model, rerun here
    assert html.unescape(found[1][0]) == visible(expected.target_text)
    assert f"sum to the model's own logit {expected.logit:.4f}" in html.unescape(page)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # one model or the other, in argparse's one-line form
        main(["report", str(saved), "-o", str(out), "--demo-model", "--model", str(tmp_path)])
    assert "not allowed with argument" in one_error_line(capsys)
