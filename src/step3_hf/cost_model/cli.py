"""``step3-cost``: decoding cost per 1M tokens, AFD plans and minimum MoE sparsity.

    step3-cost [cost] [--models step3 deepseek-v3 ...] [--contexts 8k 32k] [--json] [--plot FILE.png]
    step3-cost plan [--model step3] [--attention-card H800] [--ffn-card H800] [--contexts 4k 8k] [--json]
    step3-cost sparsity [--model step3] [--json]

Models are preset names or config.json paths/folders; ``--hardware-file`` adds cards (JSON).
Exit codes: 0 done; 2 a user error (bad argument, unknown model or card, invalid file), printed as one line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

from .accounting import MAX_CONTEXT, PRESETS, Quantization, model_spec
from .cost import cost_report, min_active_experts, min_sparsity
from .hardware import Card, load_cards
from .memory import KV_FORMATS, WEIGHT_FORMATS, MemoryFit, fit_layouts
from .planner import PlanAssumptions, plan_afd

__all__ = ["main", "parse_context", "parse_memory", "plot_costs"]

PLOT_CONTEXTS = tuple(4096 * 2**i for i in range(6))  # 4K .. 128K


class _UsageError(Exception):
    """A command-line error; `main` prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    # argparse would print the whole usage block and exit; one line naming the argument is enough.
    def error(self, message: str):
        raise _UsageError(message)


def parse_context(text: str) -> int:
    """'8k' / '8K' -> 8192, '128k' -> 131072, '5000' -> 5000; from 1 token to 2**40."""
    t = text.strip().lower()
    try:
        tokens = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except (ValueError, OverflowError):  # OverflowError: 'infk'
        raise argparse.ArgumentTypeError(f"context {text!r} is not a number of tokens like 8192 or 8k") from None
    if not 1 <= tokens <= MAX_CONTEXT:
        raise argparse.ArgumentTypeError(f"context {text!r} must be from 1 token to 2**40 tokens")
    return tokens


_MEMORY_UNITS = {"": 1e9, "gb": 1e9, "gib": 2.0**30, "tb": 1e12, "tib": 2.0**40, "mb": 1e6, "mib": 2.0**20}


def parse_memory(text: str, *, zero_ok: bool = False) -> float:
    """'80GB' / '80' -> 8e10 bytes, '141GiB' -> 141 * 2**30; a positive size (a bare number is GB)."""
    t = text.strip().lower()
    number = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(number):]
    try:
        value = float(number) * _MEMORY_UNITS[unit]
    except (ValueError, KeyError):
        value = -1.0
    if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
        kind = "non-negative" if zero_ok else "positive"
        raise argparse.ArgumentTypeError(f"{text!r} is not a {kind} memory size like 80GB, 141GiB or 96")
    return value


def _reserve(text: str) -> float:
    return parse_memory(text, zero_ok=True)


def _bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        bits = 0
    if not 1 <= bits <= 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bit width from 1 to 32")
    return bits


def _positive(kind: type) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {'integer' if kind is int else 'number'}")
        return value

    parse.__name__ = f"positive_{kind.__name__}"
    return parse


def _ctx_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hardware-file", action="append", default=[], metavar="JSON",
                   help="extra cards (one object or a list with name, price_per_hour_usd, bf16_flops, "
                        "fp8_flops, memory_bandwidth, nics_per_server, nic_gbps)")
    p.add_argument("--weight-bits", type=_bits, default=8, help="weight storage bits, 1-32 (default 8, as the report)")
    p.add_argument("--kv-bits", type=_bits, default=8, help="KV-cache storage bits, 1-32 (default 8, as the report)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="step3-cost", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command")

    c = sub.add_parser("cost", help="per-token figures and USD per 1M decoded tokens (report Tables 2, 3, 6)")
    c.add_argument("--models", nargs="+", default=list(PRESETS), metavar="MODEL",
                   help=f"presets ({', '.join(PRESETS)}) or config.json paths")
    c.add_argument("--contexts", nargs="+", type=parse_context, default=[8192, 32768], metavar="N")
    c.add_argument("--hardware", nargs="+", default=None, metavar="CARD", help="cards to compare (default: all)")
    c.add_argument("--plot", metavar="FILE.png", help="also draw cost per 1M tokens vs context (4K..128K)")
    _common(c)

    p = sub.add_parser("plan", help="AFD deployment plan (attention:FFN instances, micro-batch, network)")
    p.add_argument("--model", default="step3")
    p.add_argument("--attention-card", default="H800")
    p.add_argument("--ffn-card", default="H800")
    p.add_argument("--contexts", nargs="+", type=parse_context, default=[4096, 8192, 16384, 32768], metavar="N")
    p.add_argument("--tpot-ms", type=_positive(float), default=50.0)
    p.add_argument("--stages", type=_positive(int), default=3)
    p.add_argument("--gpus-per-instance", type=_positive(int), default=8)
    p.add_argument("--ffn-bandwidth-efficiency", type=float, default=0.5, help="in (0, 1]")
    p.add_argument("--micro-batch", type=_positive(int), default=None, help="fix tokens per micro-batch")
    _common(p)

    f = sub.add_parser("fit", help="which TP / EP / TP x EP / AFD layouts hold weights, KV and activations per card")
    f.add_argument("--model", default="step3", help=f"a preset ({', '.join(PRESETS)}) or a config.json path")
    f.add_argument("--card", default=None, help="a card whose memory_bytes sets the memory (default H800, 80 GB)")
    f.add_argument("--memory", type=parse_memory, default=None, metavar="SIZE",
                   help="memory per card instead of --card's, e.g. 80GB, 141GB, 96GiB")
    f.add_argument("--cards", type=_positive(int), default=8, help="number of cards (default 8)")
    f.add_argument("--weights", choices=list(WEIGHT_FORMATS), default="bf16", help="weight format (default bf16)")
    f.add_argument("--kv", choices=list(KV_FORMATS), default="bf16", help="KV-cache format (default bf16)")
    f.add_argument("--batch", type=_positive(int), default=64, help="sequences decoded together (default 64)")
    f.add_argument("--context", type=parse_context, default=8192, help="tokens per sequence (default 8k)")
    f.add_argument("--gpus-per-instance", type=_positive(int), default=None, help="AFD instance size")
    f.add_argument("--reserve", type=_reserve, default=2e9, metavar="SIZE",
                   help="per card for the CUDA context, allocator slack and communication buffers (default 2GB)")
    f.add_argument("--device-map", action="store_true",
                   help="also place the layers with accelerate (device_map='auto', meta device, needs torch)")
    f.add_argument("--hardware-file", action="append", default=[], metavar="JSON", help="extra cards")
    f.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("sparsity", help="minimum MoE sparsity per card for a 3-stage pipeline (report Table 7)")
    s.add_argument("--model", default="step3")
    s.add_argument("--hardware", nargs="+", default=None, metavar="CARD")
    _common(s)
    return ap


def _cards(args: argparse.Namespace, names: Sequence[str] | None) -> dict[str, Card]:
    cards = load_cards(args.hardware_file)
    if not names:
        return cards
    unknown = [n for n in names if n not in cards]
    if unknown:
        raise ValueError(f"unknown card(s) {', '.join(unknown)}; known: {', '.join(cards)}")
    return {n: cards[n] for n in names}


def _quant(args: argparse.Namespace) -> Quantization:
    if args.command == "fit":
        return Quantization()
    return Quantization(weight_bytes=args.weight_bits / 8, kv_bytes=args.kv_bits / 8)


# ----------------------------------------------------------------------------- cost


def _cost_records(models: Sequence[str], contexts: Sequence[int], cards: dict[str, Card],
                  quant: Quantization) -> list[dict[str, Any]]:
    out = []
    for m in models:
        spec = model_spec(m)
        sparsity = spec.ffn.sparsity
        for ctx in contexts:
            r = cost_report(spec, ctx, cards, quant)
            out.append({
                "model": spec.name,
                "context": ctx,
                "attention_family": spec.attention.family,
                "per_token": {k: v for k, v in r.per_token.to_dict().items() if k not in ("model", "context")},
                "attention_usd_per_1m": r.attention,
                "ffn_usd_per_1m": r.ffn,
                "single_card_usd_per_1m": r.single,
                "afd_usd_per_1m": r.afd,
                "afd_pair": {"attention": r.afd_attention_card, "ffn": r.afd_ffn_card},
                "moe_sparsity": sparsity,
                "min_sparsity": {n: min_sparsity(c, spec.hidden_size, spec.num_layers) for n, c in cards.items()},
            })
    return out


def _cost_table(records: list[dict[str, Any]], cards: Sequence[str]) -> str:
    lines = []
    for ctx in dict.fromkeys(r["context"] for r in records):
        rows = [r for r in records if r["context"] == ctx]
        lines.append(f"Per decoded token at {_ctx_label(ctx)} context ({ctx} tokens); 8-bit weights/KV unless set")
        lines.append(f"  {'model':<18}{'family':<7}{'KV bytes':>10}{'attn FLOPs':>12}{'linear FLOPs':>14}"
                     f"{'FFN FLOPs':>11}{'act. params':>13}{'FLOP/B':>8}")
        for r in rows:
            t = r["per_token"]
            lines.append(f"  {r['model']:<18}{r['attention_family']:<7}{t['kv_bytes']:>10.3g}"
                         f"{t['attention_flops']:>12.3g}{t['linear_flops']:>14.3g}{t['ffn_flops']:>11.3g}"
                         f"{t['activated_params'] / 1e9:>12.1f}B{t['arithmetic_intensity']:>8.0f}")
        head = "".join(f"{c:>7}" for c in cards)
        lines.append(f"USD per 1M decoded tokens at {_ctx_label(ctx)}")
        lines.append(f"  {'model':<18}| attention{' ' * max(0, 7 * len(cards) - 10)}| FFN{' ' * max(0, 7 * len(cards) - 4)}"
                     f"| {'AFD':>6}  pair (attention+FFN)")
        lines.append(f"  {'':<18}|{head}|{head}|")
        for r in rows:
            a = "".join(_usd(r["attention_usd_per_1m"][c], 7) for c in cards)
            f = "".join(_usd(r["ffn_usd_per_1m"][c], 7) for c in cards)
            pair = r["afd_pair"]
            afd = _usd(r["afd_usd_per_1m"], 6)
            lines.append(f"  {r['model']:<18}|{a}|{f}| {afd}  {pair['attention']}+{pair['ffn']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _usd(value: float, width: int) -> str:
    # Three decimals as the report; huge costs (contexts near 2**40) in short exponent form keep the columns.
    text = f"{value:.3f}"
    if len(text) >= width:
        text = f"{value:.1e}" if len(f"{value:.1e}") < width else f"{value:.0e}"
    return f"{text:>{width}}"


def plot_costs(models: Sequence[str], cards: dict[str, Card], path: str,
               quant: Quantization = Quantization(), contexts: Sequence[int] = PLOT_CONTEXTS) -> None:
    """Cost per 1M decoded tokens vs context: one panel per card (attention + FFN on it) and one for AFD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(cards) + ["AFD"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.3), sharey=True)
    axes = list(axes) if len(panels) > 1 else [axes]
    xs = [c / 1024 for c in contexts]
    for m in models:
        spec = model_spec(m)
        reports = [cost_report(spec, c, cards, quant) for c in contexts]
        for ax, panel in zip(axes, panels):
            ys = [r.afd if panel == "AFD" else r.single[panel] for r in reports]
            ax.plot(xs, ys, marker="o", ms=3, label=spec.name)
    for ax, panel in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{int(x)}K" for x in xs], fontsize=7)
        ax.set_title(panel if panel != "AFD" else "AFD (cheapest A + cheapest F)", fontsize=9)
        ax.set_xlabel("context", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("USD per 1M decoded tokens")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- plan


def _plan_table(plans: list[Any], fixed: bool = False) -> str:
    p0 = plans[0]
    # Contexts up to 2**40 give long labels, shapes and ratios: widen those columns rather than run them together.
    cw = max(8, *(len(_ctx_label(p.context)) + 1 for p in plans))
    sw = max(8, *(len(p.shape) + 1 for p in plans))
    rw = max(6, *(len(f"{p.ratio:.2g}") + 1 for p in plans))
    lines = [f"AFD plan for {p0.model}: attention on {p0.attention_card}, FFN on {p0.ffn_card}; "
             f"stage budget {p0.stage_budget_us:.0f} us per layer",
             f"  {'context':>{cw}}{'shape':>{sw}}{'A:F':>{rw}}{'tokens/mb':>10}{'B_MoE':>7}{'attn us':>9}{'FFN us':>8}"
             f"{'net us':>8}{'A->F MB':>9}{'F->A MB':>9}{'FFN NIC GB/s':>14}{'tok/s/GPU':>10}{'KV GB/GPU':>10}"
             f"{'KV fits':>8}  fits"]
    for p in plans:
        lines.append(
            f"  {_ctx_label(p.context):>{cw}}{p.shape:>{sw}}{p.ratio:>{rw}.2g}"
            f"{p.micro_batch:>10}{p.min_efficient_micro_batch:>7}"
            f"{p.attention_time_us:>9.0f}{p.ffn_time_us:>8.0f}{p.network_time_us:>8.0f}"
            f"{p.a2f_bytes_per_layer / 1e6:>9.1f}{p.f2a_bytes_per_layer / 1e6:>9.1f}"
            f"{p.ffn_server_bandwidth_needed / 1e9:>14.0f}{p.tokens_per_s_per_gpu:>10.0f}"
            f"{p.kv_bytes_per_attention_gpu / 1e9:>10.0f}{_yes_no(p.kv_fits_memory):>8}  {_yes_no(p.fits)}")
    if not p0.ffn_efficient:
        why = ("fixed by --micro-batch" if fixed else
               "the most the FFN servers' NICs carry per stage: the model is sparser than the card's minimum")
        lines.append(f"  FFN not compute-bound: {p0.micro_batch} tokens per micro-batch < B_MoE = "
                     f"{p0.min_efficient_micro_batch} ({why})")
    lines.append("  (fits: every stage within the budget at roofline speed, FFN compute-bound; KV fits: the in-flight"
                 " KV alone within the attention card's memory, weights not counted)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- fit


def _fit(args: argparse.Namespace) -> int:
    if args.memory is not None and args.card is not None:
        raise ValueError("give --card or --memory, not both")
    card_name = None
    memory = args.memory
    if memory is None:
        card_name = args.card or "H800"
        card = _cards(args, [card_name])[card_name]
        if card.memory_bytes is None:
            raise ValueError(f"card {card_name} has no memory_bytes; give --memory")
        memory = card.memory_bytes
    result = fit_layouts(args.model, memory, args.cards, weights=args.weights, kv=args.kv, batch=args.batch,
                         context=args.context, gpus_per_instance=args.gpus_per_instance, reserve_bytes=args.reserve)
    placement = None
    if args.device_map:
        from ..device_map import layer_placement  # torch and accelerate: only for this option

        placement = layer_placement(args.model, {i: memory for i in range(args.cards)}, weights=args.weights)
    if args.json:
        out = result.to_dict()
        out["card"] = card_name
        if placement is not None:
            out["device_map"] = placement.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(_fit_table(result, card_name), end="")
        if placement is not None:
            print()
            print(placement.table(), end="")
    return 0


def _fit_table(r: MemoryFit, card: str | None) -> str:
    gb = 1e9
    where = f"{r.cards} x {card} ({r.memory_bytes / gb:.1f} GB)" if card else f"{r.cards} x {r.memory_bytes / gb:.1f} GB"
    lines = [f"Memory per card for {r.model} on {where}: {r.weights} weights ({r.weight_bytes / gb:.1f} GB in all), "
             f"{r.kv} KV ({r.kv_bytes_per_sequence / gb:.2f} GB per {_ctx_label(r.context)}-token sequence), "
             f"batch {r.batch}, {r.reserve_bytes / gb:.1f} GB reserve per card",
             f"  {'layout':<18}{'cards':>6}  {'role':<15}{'weights':>9}{'KV':>8}{'act.':>7}{'total':>8}"
             f"{'headroom':>10}  fits  (GB per card)"]
    for layout in r.layouts:
        if layout.impossible:
            lines.append(f"  {layout.layout:<18}{'':>6}  {'-':<15}{'':>42}  no    {layout.impossible}")
            continue
        for i, c in enumerate(layout.loads):
            name = layout.layout if i == 0 else ""
            lines.append(f"  {name:<18}{c.cards:>6}  {c.role:<15}{c.weight_bytes / gb:>9.1f}{c.kv_bytes / gb:>8.1f}"
                         f"{c.activation_bytes / gb:>7.2f}{c.total_bytes / gb:>8.1f}{c.headroom_bytes / gb:>10.1f}"
                         f"  {_yes_no(c.fits)}")
    fitting = [layout.layout for layout in r.layouts if layout.fits]
    lines.append(f"  fits: {', '.join(fitting) if fitting else 'none of these layouts'}")
    return "\n".join(lines) + "\n"


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("cost", "plan", "fit", "sparsity", "-h", "--help"):
        argv = ["cost", *argv]  # `step3-cost` alone prints the report-style comparison
    try:
        return _run(_parser().parse_args(argv))
    # A bad argument; an unknown model or card; an unreadable file; an invalid context, config or hardware entry.
    except (_UsageError, OSError, ValueError) as err:
        print(f"step3-cost: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: Exception) -> str:
    text = err.strerror and f"{err.filename}: {err.strerror}" if isinstance(err, OSError) else str(err)
    return " ".join(str(text or err).split())


def _run(args: argparse.Namespace) -> int:
    quant = _quant(args)

    if args.command == "cost":
        cards = _cards(args, args.hardware)
        records = _cost_records(args.models, args.contexts, cards, quant)
        print(json.dumps(records, indent=2) if args.json else _cost_table(records, list(cards)), end="")
        if args.json:
            print()
        if args.plot:
            plot_costs(args.models, cards, args.plot, quant)
            print(f"wrote {args.plot}", file=sys.stderr)
        return 0

    if args.command == "plan":
        cards = _cards(args, [args.attention_card, args.ffn_card])
        assumptions = PlanAssumptions(tpot_ms=args.tpot_ms, stages=args.stages,
                                      gpus_per_instance=args.gpus_per_instance,
                                      ffn_bandwidth_efficiency=args.ffn_bandwidth_efficiency,
                                      micro_batch=args.micro_batch)
        plans = [plan_afd(args.model, cards[args.attention_card], cards[args.ffn_card], c, assumptions, quant)
                 for c in args.contexts]
        print(json.dumps([p.to_dict() for p in plans], indent=2) if args.json else _plan_table(plans, args.micro_batch is not None))
        return 0

    if args.command == "fit":
        return _fit(args)

    cards = _cards(args, args.hardware)
    spec = model_spec(args.model)
    rows = [{"card": n, "min_sparsity": min_sparsity(c, spec.hidden_size, spec.num_layers),
             "min_active_experts": min_active_experts(spec, c) if spec.ffn.moe_layers else None}
            for n, c in cards.items()]
    if args.json:
        print(json.dumps({"model": spec.name, "hidden_size": spec.hidden_size, "num_layers": spec.num_layers,
                          "moe_sparsity": spec.ffn.sparsity, "cards": rows}, indent=2))
    else:
        s = spec.ffn.sparsity
        print(f"Minimum MoE sparsity for a 3-stage AFD pipeline, H={spec.hidden_size}, L={spec.num_layers} "
              f"({spec.name} sparsity: {'dense' if s is None else f'{s:.3f}'})")
        for r in rows:
            extra = "" if r["min_active_experts"] is None else f"  (>= {r['min_active_experts']:.1f} routed experts)"
            ok = "" if s is None else ("  ok" if s >= r["min_sparsity"] else "  too sparse")
            print(f"  {r['card']:<8}{r['min_sparsity']:.3f}{extra}{ok}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
