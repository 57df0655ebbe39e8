"""The report: a Markdown table (stdout and results.md), results.json, results.csv and speedup.png."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["markdown", "flat_rows", "write_json", "write_csv", "plot", "write_all", "consistency_warnings"]

GIGA = 1e9


def _num(value: Optional[float], fmt: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _get(row: Dict[str, Any], *keys) -> Optional[Any]:
    for key in keys:
        if not isinstance(row, dict) or key not in row:
            return None
        row = row[key]
    return row


def _timed(row: Dict[str, Any], what: str, variant: str) -> str:
    """A time cell: the median and, from the repeats, the spread, ``12.3 (11.9-13.0)``."""
    median = _get(row, "time_ms", what, variant)
    times = _get(row, "times_ms", what, variant)
    if median is None or not times or len(times) < 2:
        return _num(median)
    return f"{_num(median)} ({_num(min(times))}-{_num(max(times))})"


def consistency_warnings(row: Dict[str, Any]) -> List[str]:
    """Where a configuration's parts do not add up: an encoder-only time above the whole step that
    contains it, or mask/map building above the time it is a part of. Both mean the timing was
    disturbed (a loaded machine), not that the code got faster or slower."""
    where = f"{row['model']} mask {row['mask_ratio']:g}"
    out = []
    for variant in ("sparse", "dense", "minkowski"):
        encoder, step = _get(row, "time_ms", "encoder", variant), _get(row, "time_ms", "step", variant)
        if encoder is not None and step is not None and encoder > step:
            out.append(f"{where}: {variant} encoder fwd+bwd {encoder:.1f} ms exceeds the whole step containing "
                       f"it ({step:.1f} ms)")
    base = row.get("maps_pct_of")
    whole = _get(row, "time_ms", base, "sparse") if base else None
    if row.get("maps_ms") is not None and whole is not None and row["maps_ms"] > whole:
        out.append(f"{where}: masks + coordinate maps {row['maps_ms']:.1f} ms exceed the sparse {base} containing "
                   f"them ({whole:.1f} ms)")
    return out


def _header(info: Dict[str, Any]) -> List[str]:
    m, s = info["machine"], info["settings"]
    gpu = m.get("gpu") or "none"
    lines = [
        "# sparse-mim bench: sparse encoder vs SparK's masked-dense simulation",
        "",
        f"- date: {m['date']}",
        f"- command: `{m['command']}`",
        f"- machine: CPU {m['cpu']} ({m['cpu_count']} logical cores), GPU {gpu}, torch {m['torch']}, "
        f"{m['threads']} threads, device {m['device']}",
        f"- load average (1/5/15 min) at start {m.get('load_average_start')}, at end {m.get('load_average_end')}",
        f"- batch {s['batch_size']}, {s['img_size']} px, {s['effective_dtype']}, warmup {s['warmup']}, "
        f"repeats {s['repeats']} (median), sparse execution `{_execution(s)}`, masked-dense baseline "
        f"{'channels_last' if s['channels_last'] else 'contiguous (NCHW)'}, same weights and masks",
    ]
    if "minkowski" in s.get("backends", ()):
        lines += ["- minkowski: the same sparse encoder on MinkowskiEngine (backend=minkowski), same weights and "
                  "masks, interleaved with the others; its map time is its first forward on a batch minus a "
                  "repeat on the same coordinate manager; no FLOP count (ME's kernels are invisible to the counter)"]
    lines += [f"- note: {n}" for n in info.get("notes", [])]
    return lines


def _execution(s: Dict[str, Any]) -> str:
    parts = [s["execution"]]
    for key, label in (("execution_depthwise", "depthwise"), ("execution_small_tiles", "small tiles")):
        if s.get(key):
            parts.append(f"{label}: {s[key]}")
    if s.get("cuda_graph"):
        parts.append("CUDA graph")
    return ", ".join(parts)


def _time_table(rows: List[Dict[str, Any]], what: List[str]) -> List[str]:
    me = any(_get(r, "time_ms", w, "minkowski") is not None for r in rows for w in what)
    variants = ("sparse", "dense", "minkowski") if me else ("sparse", "dense")
    head = ["model", "mask", "visible"]
    for w in what:
        label = "encoder fwd+bwd" if w == "encoder" else "step"
        head += [f"{label} sparse ms", f"{label} dense ms", f"{label} speedup"]
        if me:
            head += [f"{label} minkowski ms", f"{label} minkowski / sparse"]
    head += ["masks+maps ms (% of sparse)"] + (["masks+maps minkowski ms"] if me else [])
    for w in what:
        head += [f"peak MB {w} {' / '.join(variants)}"]
    head += ["check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['mask_ratio']:g}", f"{r['len_keep']}/{r['num_patches']}"]
        for w in what:
            cells += [_timed(r, w, "sparse"), _timed(r, w, "dense"), _num(_get(r, "speedup", w), "{:.2f}x")]
            if me:
                cells += [_timed(r, w, "minkowski"),
                          _num(_get(r, "minkowski_over_sparse", w), "{:.2f}x")]
        cells += [f"{_num(r.get('maps_ms'))} ({_num(r.get('maps_pct'))}% of {r.get('maps_pct_of', '-')})"]
        if me:
            cells += [_num(r.get("maps_ms_minkowski"))]
        for w in what:
            cells += [" / ".join(_num(_get(r, "memory_mb", w, v), "{:.0f}") for v in variants)]
        cells += ["parts exceed the whole: see warnings" if consistency_warnings(r) else "ok"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _flop_table(rows: List[Dict[str, Any]]) -> List[str]:
    columns = [("encoder", "fwd", "encoder fwd"), ("encoder", "fwd_bwd", "encoder fwd+bwd"),
               ("step", "fwd_bwd", "step fwd+bwd")]
    columns = [c for c in columns if any(_get(r, "flops", c[0]) for r in rows)]
    head = ["model", "mask", "ideal (visible fraction)"]
    for _, _, label in columns:
        head += [f"{label} sparse GFLOP", f"{label} dense GFLOP", f"{label} ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['mask_ratio']:g}", f"{r['visible_fraction']:.3f}"]
        for what, part, _ in columns:
            sparse, dense = _get(r, "flops", what, "sparse", part), _get(r, "flops", what, "dense", part)
            ratio = sparse / dense if sparse is not None and dense else None
            cells += [_num(sparse and sparse / GIGA), _num(dense and dense / GIGA), _num(ratio, "{:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(info: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    what = info["settings"]["what"]
    lines = _header(info)
    lines += ["", "## Wall time (median ms, min-max of the repeats in brackets) and peak memory; "
                  "speedup = dense / sparse", ""]
    lines += _time_table(rows, what)
    warnings = [w for r in rows for w in consistency_warnings(r)]
    if warnings:
        lines += ["", "Warning: these results do not add up, so the machine was disturbed while timing them; "
                      "rerun on a quiet machine (or with more repeats) before using them:", ""]
        lines += [f"- {w}" for w in warnings]
    lines += ["", "## Executed FLOPs (torch.utils.flop_counter; ratio = sparse / dense)", ""]
    lines += _flop_table(rows)
    return "\n".join(lines) + "\n"


def flat_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One CSV row per configuration: nested results as dotted column names (lists left out, the repeats
    as their min and max, the warnings joined)."""
    out = []
    for r in rows:
        flat: Dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}{k}.", v)
            elif not isinstance(value, list):
                flat[prefix[:-1]] = value

        walk("", {k: v for k, v in r.items() if k != "times_ms"})
        for what, variants in r.get("times_ms", {}).items():
            for variant, times in variants.items():
                if times:
                    flat[f"time_ms_min.{what}.{variant}"] = min(times)
                    flat[f"time_ms_max.{what}.{variant}"] = max(times)
        flat["warnings"] = "; ".join(r.get("warnings") or [])
        out.append(flat)
    return out


def write_json(path: Path, info: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    path.write_text(json.dumps({**info, "results": rows}, indent=2) + "\n")


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    flat = flat_rows(rows)
    fields: List[str] = []
    for r in flat:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)


def plot(path: Path, info: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    """Left: speedup vs mask ratio per model; right: FLOP ratio and the ideal (visible fraction).
    Encoder fwd+bwd solid with circles, full step dashed with squares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["mask_ratio"])
        x = [r["mask_ratio"] for r in mine]
        color = colors[i % len(colors)]
        for what, style, marker in (("encoder", "-", "o"), ("step", "--", "s")):
            label = "encoder fwd+bwd" if what == "encoder" else "step"
            y = [_get(r, "speedup", what) for r in mine]
            if y and all(v is not None for v in y):
                ax_t.plot(x, y, style, marker=marker, color=color, label=f"{model} {label}")
            y = [_get(r, "flop_ratio", what) for r in mine]
            if y and all(v is not None for v in y):
                ax_f.plot(x, y, style, marker=marker, color=color, label=f"{model} {label}")
    ideal = sorted({(r["mask_ratio"], r["visible_fraction"]) for r in rows})
    ax_f.plot([p[0] for p in ideal], [p[1] for p in ideal], "k:", marker="x", label="visible fraction (ideal)")
    ax_t.axhline(1.0, color="grey", lw=0.8)
    ax_t.set(xlabel="mask ratio", ylabel="speedup (masked-dense time / sparse time)", title="wall time")
    ax_f.set(xlabel="mask ratio", ylabel="sparse FLOPs / masked-dense FLOPs", title="executed FLOPs",
             ylim=(0, 1.05))
    speedups = [v for r in rows for v in r.get("speedup", {}).values() if v is not None and not math.isnan(v)]
    ax_t.set_ylim(0, 1.35 * max(speedups + [1.0]))  # head room for the legend
    for ax in (ax_t, ax_f):
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    s, m = info["settings"], info["machine"]
    where = m.get("gpu") or m["cpu"]
    fig.suptitle(f"batch {s['batch_size']}, {s['img_size']} px, {s['effective_dtype']}, {where}, "
                 f"{m['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(output_dir: Path, info: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    """Write every output; return the Markdown report."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["warnings"] = consistency_warnings(r)
    text = markdown(info, rows)
    (output_dir / "results.md").write_text(text)
    write_json(output_dir / "results.json", info, rows)
    write_csv(output_dir / "results.csv", rows)
    plot(output_dir / "speedup.png", info, rows)
    return text
