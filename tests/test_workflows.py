"""The bundled ComfyUI workflows (UI / litegraph format): every node exists, every link joins matching types,
no required input is left unconnected (no red inputs), widget values match INPUT_TYPES (order, types,
choices, ranges), and the graph runs on the tiny embedded model with a small step count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttt_video.nodes import NODE_CLASS_MAPPINGS

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    return [(name, s, section) for section in ("required", "optional") for name, s in spec.get(section, {}).items()]


def _is_widget(s) -> bool:
    return isinstance(s[0], list) or s[0] in WIDGET_TYPES


def expected_widgets(cls):
    """(input name, spec) per widgets_values entry, as ComfyUI's frontend lays them out: widget inputs in
    declaration order, plus the 'control after generate' combo right after an INT that asks for one."""
    out = []
    for name, s, _ in _inputs(cls):
        if not _is_widget(s):
            continue
        out.append((name, s))
        opts = s[1] if len(s) > 1 else {}
        # ComfyUI's frontend adds the control widget for this option and for inputs named seed / noise_seed
        if s[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
            out.append((name + ":control_after_generate", (["fixed", "increment", "decrement", "randomize"], {})))
    return out


def check_widget_value(node_type, name, s, value):
    opts = s[1] if len(s) > 1 else {}
    kind = s[0]
    where = f"{node_type}.{name} = {value!r}"
    if isinstance(kind, list):
        assert value in kind, f"{where} is not one of {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert opts.get("min", -(2**64)) <= value <= opts.get("max", 2**64), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert opts.get("min", -1e30) <= value <= opts.get("max", 1e30), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where


def load(path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4
    return wf


def test_there_are_two_workflows():
    names = {p.name for p in WORKFLOWS}
    assert {"ttt_one_minute_text_to_video.json", "ttt_9s_preview.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_consistent(path):
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"])
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(l[0] for l in wf["links"])
    for n in wf["nodes"]:
        assert n["type"] in NODE_CLASS_MAPPINGS, f"missing node type {n['type']}"
        cls = NODE_CLASS_MAPPINGS[n["type"]]
        assert len(n["pos"]) == 2 and len(n["size"]) == 2
        widgets = expected_widgets(cls)
        values = n["widgets_values"]
        assert len(values) == len(widgets), f"{n['type']}: {len(values)} widget values for {[w[0] for w in widgets]}"
        for (name, s), value in zip(widgets, values):
            check_widget_value(n["type"], name, s, value)
        # sockets: the node's non-widget inputs, in order, with their types
        sockets = [(name, s[0], section) for name, s, section in _inputs(cls) if not _is_widget(s)]
        assert [(i["name"], i["type"]) for i in n["inputs"]] == [(a, b) for a, b, _ in sockets]
        for inp, (_, _, section) in zip(n["inputs"], sockets):
            if section == "required":
                assert inp["link"] is not None, f"{n['type']}.{inp['name']} is not connected (red input)"
        outs = list(zip(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), cls.RETURN_TYPES))
        assert [(o["name"], o["type"]) for o in n["outputs"]] == outs

    link_ids = set()
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        link_ids.add(link_id)
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == typ == inp["type"], f"link {link_id}: {out['type']} -> {inp['type']} ({typ})"
        assert link_id in (out["links"] or []) and inp["link"] == link_id
    # every link referenced by a node exists
    for n in wf["nodes"]:
        for i in n["inputs"]:
            assert i["link"] is None or i["link"] in link_ids
        for o in n["outputs"]:
            assert all(l in link_ids for l in (o["links"] or []))


# ------------------------------------------------------------------------------------------------------
# run the graph the way ComfyUI's executor would (topological order, widgets -> kwargs, links -> values)
# ------------------------------------------------------------------------------------------------------
def run_workflow(wf, overrides=None):
    overrides = overrides or {}
    nodes = {n["id"]: n for n in wf["nodes"]}
    link_src = {l[0]: (l[1], l[2]) for l in wf["links"]}
    results: dict[int, tuple] = {}
    ui = {}

    def run(nid):
        if nid in results:
            return results[nid]
        n = nodes[nid]
        cls = NODE_CLASS_MAPPINGS[n["type"]]
        kwargs = {}
        for (name, _), value in zip(expected_widgets(cls), n["widgets_values"]):
            if not name.endswith(":control_after_generate"):
                kwargs[name] = value
        for inp in n["inputs"]:
            if inp["link"] is not None:
                src, slot = link_src[inp["link"]]
                kwargs[inp["name"]] = run(src)[slot]
        kwargs.update(overrides.get(n["type"], {}))
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            ui[nid] = out.get("ui")
            out = out["result"]
        results[nid] = out
        return out

    for nid in nodes:
        run(nid)
    return results, ui


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_on_tiny_model(path, tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    monkeypatch.setenv("TTT_VIDEO_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("TTT_VIDEO_CACHE_DIR", str(tmp_path / "cache"))
    wf = load(path)
    results, _ = run_workflow(wf, {"TTTOneMinuteSampler": {"steps": 2}, "TTTModelLoader": {"device": "cpu"}})
    decoder = next(n for n in wf["nodes"] if n["type"] == "TTTSegmentDecoder")
    loader = next(n for n in wf["nodes"] if n["type"] == "TTTStoryboardLoader")
    video_path, images, frame_count, info = results[decoder["id"]]
    segments = results[loader["id"]][1]
    assert frame_count == 1 + 4 * (13 + 12 * (segments - 1) - 1)
    assert str(frame_count) in info
    assert Path(video_path).is_file() and str(tmp_path / "output") in video_path
    with av.open(video_path) as c:
        stream = c.streams.video[0]
        frames = sum(1 for _ in c.decode(video=0))
        assert (stream.codec_context.width, stream.codec_context.height) == (96, 64)
        assert stream.average_rate == 16
    assert frames == frame_count
    assert images.shape == (1, 64, 96, 3)  # return_images off: first frame only
