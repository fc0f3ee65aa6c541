"""Render one decode step's AFD timeline (the JSON `afd_decode.py --connector inprocess --trace` writes) as SVG.

One lane per phase -- attention (attention block, norm, router), wire (FP8 quantisation), FFN -- with a bar per
micro-batch and layer at its CUDA-event start and end, the first `--layers` layers only so that bars stay legible.
Written directly as SVG (no plotting library needed).

    python benchmarks/afd_timeline_svg.py afd_results/trace.json --out docs/img/afd_step_timeline.svg
"""

from __future__ import annotations

import argparse
import json
import sys
from html import escape
from pathlib import Path

LANES = [("attention", "#4C78A8"), ("wire", "#F58518"), ("ffn", "#54A24B"), ("wait", "#BAB0AC")]
WIDTH, LEFT, RIGHT, TOP, LANE_HEIGHT, GAP = 1100, 90, 20, 58, 34, 10


def render(trace: dict, layers: int) -> str:
    events = [e for e in trace["events"] if e.get("layer", 0) < layers]
    if not events:
        raise ValueError("the trace holds no events for the layers asked for")
    t0 = min(e["start_us"] for e in events)
    t1 = max(e["end_us"] for e in events)
    scale = (WIDTH - LEFT - RIGHT) / max(t1 - t0, 1e-9)
    lanes = [(name, colour) for name, colour in LANES if any(e["name"] == name for e in events)]
    height = TOP + len(lanes) * (LANE_HEIGHT + GAP) + 40
    title = (f"One decode step, first {layers} of {trace['layers']} layers: {trace['device']}, batch {trace['batch']} in "
             f"{trace['micro_batches']} micro-batches, context {trace['context']}, {trace['variant']}")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" '
        f'font-size="11">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{LEFT}" y="20" font-size="13">{escape(title)}</text>',
        f'<text x="{LEFT}" y="38" fill="#555">bars: CUDA-event start/end of each phase, labelled layer.micro-batch; '
        "both halves in one process, so they run one after the other</text>",
    ]
    for row, (name, colour) in enumerate(lanes):
        y = TOP + row * (LANE_HEIGHT + GAP)
        out.append(f'<text x="{LEFT - 8}" y="{y + LANE_HEIGHT / 2 + 4}" text-anchor="end">{name}</text>')
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y + LANE_HEIGHT}" y2="{y + LANE_HEIGHT}" stroke="#ddd"/>')
        for e in (e for e in events if e["name"] == name):
            x, w = LEFT + (e["start_us"] - t0) * scale, max((e["end_us"] - e["start_us"]) * scale, 0.5)
            label = f"{e.get('layer', '?')}.{e.get('micro_batch', '?')}"
            tip = f"{name} layer {e.get('layer')} micro-batch {e.get('micro_batch')}: {e['end_us'] - e['start_us']:.0f} us"
            out.append(f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{LANE_HEIGHT}" fill="{colour}" '
                       f'stroke="white" stroke-width="0.5"><title>{escape(tip)}</title></rect>')
            if w > 7 * len(label):
                out.append(f'<text x="{x + w / 2:.2f}" y="{y + LANE_HEIGHT / 2 + 4}" text-anchor="middle" '
                           f'fill="white">{label}</text>')
    axis_y = TOP + len(lanes) * (LANE_HEIGHT + GAP) + 5
    out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{axis_y}" y2="{axis_y}" stroke="#333"/>')
    span = t1 - t0
    tick = next((t for t in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000) if span / t <= 12), 1e5)
    value = 0.0
    while value <= span:
        x = LEFT + value * scale
        out.append(f'<line x1="{x:.2f}" x2="{x:.2f}" y1="{axis_y}" y2="{axis_y + 5}" stroke="#333"/>')
        out.append(f'<text x="{x:.2f}" y="{axis_y + 17}" text-anchor="middle">{value:g}</text>')
        value += tick
    out.append(f'<text x="{WIDTH - RIGHT}" y="{axis_y + 32}" text-anchor="end">µs from the first phase shown</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="afd_timeline_svg.py", description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="JSON written by afd_decode.py --connector inprocess --trace")
    parser.add_argument("--out", default="docs/img/afd_step_timeline.svg")
    parser.add_argument("--layers", type=int, default=2, help="layers shown (from the first)")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    try:
        trace = json.loads(Path(args.trace).read_text())
        svg = render(trace, args.layers)
    except (OSError, ValueError, KeyError) as err:
        parser.error(f"{args.trace}: {err}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(svg)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
