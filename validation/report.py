"""artifacts/<slug>/report/: report.json (everything), report.md (one table to read in ten seconds) and
report.html (self-contained: inline CSS, plots as base64 PNGs).

`validate` and `bench` each save their piece (validation.json, bench.json) into the report folder;
`write_report` merges whatever pieces exist with the machine's description and renders the three files.
Every file is written to a temporary name and moved into place, so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from exporters.artifact import VERSIONED_PACKAGES, library_versions
from model.files import write_atomic
from validation.baselines import RATIO_METRICS

RESULT_PIECES = ("validation", "bench")
PIECES = (*RESULT_PIECES, "timings")  # timings: written by `gemma-export all` (its stages)
ZERO_DIFFERENCE_FLOOR = 1e-9  # where an exact 0 is drawn on the log axis
EXTRA_VERSIONED_PACKAGES = ("numpy", "tokenizers", "matplotlib", "click")


def report_dir(artifacts_root: Path, slug: str) -> Path:
    return Path(artifacts_root) / slug / "report"


def json_safe(value: Any) -> Any:
    """NaN and ±Inf (a runner that produced non-finite logits) as null: strict JSON readers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def json_text(data: dict[str, Any]) -> str:
    return json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"


def save_piece(folder: Path, name: str, data: dict[str, Any]) -> None:
    write_atomic(folder / f"{name}.json", json_text(data))


def load_pieces(folder: Path) -> dict[str, Any]:
    return {name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
            for name in PIECES if (folder / f"{name}.json").is_file()}


# ------------------------------------------------------------------------------------------------ machine

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "ram_bytes": psutil.virtual_memory().total, "os": platform.platform(), "machine": platform.machine()}


def versions() -> dict[str, str]:
    return library_versions((*VERSIONED_PACKAGES, *EXTRA_VERSIONED_PACKAGES))


def build_report(folder: Path) -> dict[str, Any]:
    pieces = load_pieces(folder)
    model = next((piece["model"] for piece in pieces.values() if "model" in piece), {})
    return {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": model,
            "machine": machine_info(), "versions": versions(), **pieces}


# ------------------------------------------------------------------------------------------------- table

def rows_by_runner(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per runner: its validation result with its benchmark beside it (under "bench")."""
    speed = {row["runner"]: row for row in report.get("bench", {}).get("runners", [])}
    rows = [dict(row, bench=speed.pop(row["runner"], {})) for row in report.get("validation", {}).get("runners", [])]
    rows += [{"runner": name, "backend": row["backend"], "precision": row["precision"], "device": row["device"],
              "verdict": "not validated", "failures": [], "bench": row} for name, row in speed.items()]
    return rows


def number(value: Any, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def size_text(size: Any) -> str:
    return "—" if size is None else f"{size / 2**20:.1f} MiB"


def has_nonfinite_logits(row: dict[str, Any]) -> bool:
    return bool(row.get("nonfinite_logits"))


def verdict_text(row: dict[str, Any]) -> str:
    """The verdict, with NaN named: its distances are NaN (null in report.json), which alone would read '—'."""
    return f"{row['verdict']} (NaN/Inf logits)" if has_nonfinite_logits(row) else row["verdict"]


def speed(row: dict[str, Any]) -> dict[str, Any]:
    """A runner's bench numbers, none for one whose logits hold NaN/Inf: the speed of a wrong answer is no speed."""
    return {} if has_nonfinite_logits(row) else row["bench"]


def summary_cells(row: dict[str, Any]) -> list[str]:
    bench = speed(row)
    greedy = (f"{row['greedy_match_steps']}/{row['greedy_steps']}" if "greedy_match_steps" in row else "—")
    top1 = row.get("top1_agreement")
    return [row["backend"], row["precision"], row["device"], verdict_text(row),
            number(row.get("max_abs_logit_diff"), ".2e"), number(row.get("mean_kl_divergence"), ".2e"),
            "—" if top1 is None else f"{100 * top1:.1f}", greedy, number(row.get("perplexity_ratio"), ".4f"),
            number(bench.get("decode_tokens_per_second"), ".1f"), number(bench.get("percent_of_ceiling"), ".0f"),
            size_text(row.get("size_bytes", row["bench"].get("size_bytes")))]


SUMMARY_HEADER = ["backend", "precision", "device", "verdict", "max abs Δlogit", "mean KL", "top-1 %",
                  "greedy match", "perplexity ratio", "decode tok/s", "% ceiling", "size"]


def skipped_by_reason(report: dict[str, Any]) -> dict[str, list[str]]:
    """The runners validate or bench skipped, grouped under each reason (one line per reason). A skip is left
    out where the same command has a row for that runner (or backend): a skip of another of its runs. bench's
    deliberate skips of runners that validate judged (the MIL interpreter) stay, with their reason."""
    grouped: dict[str, list[str]] = {}
    for piece in PIECES:
        ran = {name for row in report.get(piece, {}).get("runners", []) for name in (row["runner"], row["backend"])}
        for entry in report.get(piece, {}).get("skipped", []):
            if entry["runner"] in ran:
                continue
            runners = grouped.setdefault(entry["reason"], [])
            if entry["runner"] not in runners:
                runners.append(entry["runner"])
    return grouped


def markdown(report: dict[str, Any]) -> str:
    model = report.get("model", {})
    lines = [f"# Validation report: {model.get('slug', '?')}", "",
             f"Model `{model.get('model_id', '?')}` · {report['machine']['cpu']} · {report['generated_at']}", "",
             "| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    rows = rows_by_runner(report)
    lines += ["| " + " | ".join(summary_cells(row)) + " |" for row in rows]
    failing = [row for row in rows if row["failures"]]
    if failing:
        lines += ["", "## Failures", ""]
        lines += [f"- **{row['runner']}**: {'; '.join(row['failures'])}" for row in failing]
    skipped = skipped_by_reason(report)
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {reason}: {', '.join(runners)}" for reason, runners in skipped.items()]
    gate_rows = gate_baseline_rows(report)
    if gate_rows:
        lines += ["", "## Baselines on the same tokens", "", GATE_BASELINE_NOTE, ""]
        lines += markdown_table(GATE_BASELINE_HEADER, gate_rows)
    baselines = report.get("bench", {}).get("baselines", [])
    if baselines:
        lines += ["", "## Against the baselines", "", baseline_note(report), ""]
        lines += markdown_table(BASELINE_HEADER, [baseline_cells(row) for row in baselines])
        ratio_rows = ratio_table_rows(report)
        if ratio_rows:
            lines += [""] + markdown_table(RATIO_HEADER, ratio_rows)
    notes, shortened = shortened_notes(report), shortened_lines(report)
    if notes:
        lines += ["", "## Shortened measurements", "", *notes, ""] + [f"- {line}" for line in shortened]
    timings = timing_rows(report)
    if timings:
        lines += ["", "## Where the time went", "", TIMING_NOTE, ""] + markdown_table(TIMING_HEADER, timings)
    return "\n".join(lines) + "\n"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |"
                                                                              for row in rows]


# ---------------------------------------------------------------------------------------------- baselines

BASELINE_NOTE = ("What a user would run instead, measured in the same run on the same machine. × = runner ÷ "
                 "baseline: decode and prefill above 1 mean the runner is faster; TTFT and peak RSS below 1 mean it "
                 "answers sooner and uses less memory.")
BASELINE_HEADER = ["baseline", "precision", "load s", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS",
                   "size", "error"]


def baseline_note(report: dict[str, Any]) -> str:
    rounds = report.get("bench", {}).get("settings", {}).get("rounds", 1)
    if rounds == 1:
        return BASELINE_NOTE
    return (f"{BASELINE_NOTE} Medians of {rounds} rounds (each measures every runner and baseline once, in fresh "
            "processes, in alternating order); a ratio is the median of the rounds' ratios, peak RSS the highest.")


RATIO_HEADER = ["runner", "vs baseline", "decode ×", "prefill ×", "TTFT ×", "peak RSS ×"]  # as RATIO_METRICS


def baseline_cells(row: dict[str, Any]) -> list[str]:
    ttft = row.get("time_to_first_token_seconds")
    return [row["backend"], row["precision"], number(row.get("load_seconds"), ".2f"),
            "—" if ttft is None else f"{1000 * ttft:.1f}", number(row.get("prefill_tokens_per_second"), ".0f"),
            number(row.get("decode_tokens_per_second"), ".1f"), size_text(row.get("peak_rss_bytes")),
            size_text(row.get("size_bytes")), row.get("error", "")]


def ratio_table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per (runner, baseline) pair with the runner ÷ baseline ratios bench saved."""
    return [[row["runner"], baseline, *(number(ratio.get(metric), ".2f") for metric in RATIO_METRICS)]
            for row in report.get("bench", {}).get("runners", [])
            for baseline, ratio in row.get("vs_baselines", {}).items()]


# ------------------------------------------------------------------------------ baselines on the same tokens

GATE_BASELINE_NOTE = ("The baselines through the same gate as every runner: the same prompts and held-out text, "
                      "teacher-forced, against the same fp32 reference. No floor applies to a baseline: it shows how "
                      "close what a user would run instead is to the model.")
GATE_BASELINE_HEADER = ["baseline", "precision", "steps", "mean KL", "top-1 %", "perplexity ratio", "max abs Δlogit",
                        "greedy match", "error"]


def gate_baseline_cells(row: dict[str, Any]) -> list[str]:
    top1 = row.get("top1_agreement")
    greedy = f"{row['greedy_match_steps']}/{row['greedy_steps']}" if "greedy_match_steps" in row else "—"
    return [row["backend"], row["precision"], number(row.get("teacher_forced_steps"), "d"),
            number(row.get("mean_kl_divergence"), ".2e"), "—" if top1 is None else f"{100 * top1:.1f}",
            number(row.get("perplexity_ratio"), ".4f"), number(row.get("max_abs_logit_diff"), ".2e"), greedy,
            "; ".join(row["failures"]) if row["verdict"] == "FAIL" else ""]


def gate_baseline_rows(report: dict[str, Any]) -> list[list[str]]:
    return [gate_baseline_cells(row) for row in report.get("validation", {}).get("baselines", [])]


# ----------------------------------------------------------------------------------- shortened measurements

SHORTENED_NOTE = ("Where a runner is too slow for every timed run within the bench budget ({budget:g} s per "
                  "measurement), it got fewer runs or decode tokens: its numbers are medians of what is listed.")
INTERPRETER_NOTE = ("coreml-mil runs the Core ML program with numpy (validation/mil.py) to check its numerics here; "
                    "its speed is an interpreter's, not Core ML's on a device.")


TWIN_NOTE = ("A torch.export program whose greedy tokens and teacher-forced logits equal its TorchScript twin's "
             "bit for bit on the probe prompt (past the sliding window) takes the twin's numbers for its other steps "
             "(validate); one bit off and it is judged on every step.")


def shortened_lines(report: dict[str, Any]) -> list[str]:
    """Each validated or benched row with something shortened, by stage."""
    return [f"{stage}: {row['runner']}: {'; '.join(row['shortened'])}"
            for stage in ("validate", "bench") for row in stage_rows(report, stage) if row.get("shortened")]


def stage_piece(report: dict[str, Any], stage: str) -> dict[str, Any]:
    """The report's part for a stage of the command ("validate" is written under "validation")."""
    return report.get("validation" if stage == "validate" else stage, {})


def stage_rows(report: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    piece = stage_piece(report, stage)
    return [*piece.get("runners", []), *piece.get("baselines", [])]


def shortened_notes(report: dict[str, Any]) -> list[str]:
    """The notes that go with the shortened lines and with interpreter speeds, where they apply."""
    bench = report.get("bench", {})
    notes = []
    if any(row.get("shortened") for row in stage_rows(report, "validate")):
        notes.append(TWIN_NOTE)
    if any(row.get("shortened") for row in stage_rows(report, "bench")):
        notes.append(SHORTENED_NOTE.format(budget=bench.get("settings", {}).get("budget_s", 0)))
    if any(row.get("backend") == "coreml-mil" for row in bench.get("runners", [])):
        notes.append(INTERPRETER_NOTE)
    return notes


# ------------------------------------------------------------------------------------------------ timings

TIMING_NOTE = ("Wall time of each stage and of each runner in it (a runner's validation: opening it and every "
               "prompt and the held-out text; its bench: its own process, every round).")
TIMING_HEADER = ["stage", "part", "seconds", "% of stage"]
# The "part" of a stage's own total and of the whole command's, in the timing rows.
WHOLE_STAGE, WHOLE_COMMAND = "(whole stage)", "(the whole command)"


def timing_rows(report: dict[str, Any]) -> list[list[str]]:
    """Stage totals, each followed by its parts: the exports per format, validate and bench per runner."""
    rows = []
    exports = report.get("timings", {}).get("exports", {})
    if exports:
        rows += part_rows("export", sum(exports.values()), exports)
    for stage in ("validate", "bench"):
        seconds = stage_piece(report, stage).get("seconds")
        if seconds is not None:
            parts = {row["runner"]: row["seconds"] for row in stage_rows(report, stage)
                     if row.get("seconds") is not None}
            rows += part_rows(stage, seconds, parts)
    total = report.get("timings", {}).get("total_seconds")
    if total is not None:
        rows.append(["all", WHOLE_COMMAND, f"{total:.0f}", ""])
    return rows


def part_rows(stage: str, seconds: float, parts: dict[str, float]) -> list[list[str]]:
    share = (lambda value: f"{100 * value / seconds:.0f}") if seconds else (lambda value: "—")
    return [[stage, WHOLE_STAGE, f"{seconds:.0f}", ""],
            *([stage, name, f"{value:.0f}", share(value)] for name, value in parts.items())]


# ------------------------------------------------------------------------------------------------- plots

def figure_png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def new_figure(height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(10, height))
    axes.grid(True, alpha=0.3)
    return figure, axes


def close(figure: Any) -> None:
    from matplotlib import pyplot

    pyplot.close(figure)


def logit_difference_plot(rows: Sequence[dict[str, Any]]) -> str | None:
    """Max |Δlogit| per teacher-forced step, the prompts one after another, one line per runner."""
    compared = [row for row in rows if any(prompt.get("steps") for prompt in row.get("prompts", []))]
    if not compared:
        return None
    figure, axes = new_figure()
    for row in compared:
        # A NaN step is null in report.json: a gap in the line, and the runner's label says why.
        values = [math.nan if step["max_abs_logit_diff"] is None else max(step["max_abs_logit_diff"],
                                                                          ZERO_DIFFERENCE_FLOOR)
                  for prompt in row["prompts"] for step in prompt["steps"]]
        label = row["runner"] + (" (NaN/Inf logits)" if has_nonfinite_logits(row) else "")
        axes.plot(range(len(values)), values, marker=".", label=label)
    offset = 0
    for prompt in compared[0]["prompts"]:
        axes.axvline(offset - 0.5, color="grey", linestyle=":")
        axes.text(offset, 1.02, prompt["prompt"], transform=axes.get_xaxis_transform(), fontsize=8)
        offset += len(prompt["steps"])
    axes.set_yscale("log")
    axes.set_xlabel("teacher-forced step (prompts in order)")
    axes.set_ylabel("max |Δlogit| vs reference")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    try:
        return figure_png(figure)
    finally:
        close(figure)


def finished_bar_plot(figure: Any, axes: Any, xlabel: str, legend: bool = False) -> str:
    """The common end of every horizontal-bar plot: first row on top, the axis label, the legend outside on the
    right, rendered to a PNG data URI and the figure closed (pyplot keeps every open figure alive)."""
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    if legend:
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    try:
        return figure_png(figure)
    finally:
        close(figure)


def top1_plot(rows: Sequence[dict[str, Any]]) -> str | None:
    compared = [row for row in rows if row.get("top1_agreement") is not None and row.get("thresholds")]
    if not compared:
        return None
    figure, axes = new_figure(0.45 * len(compared) + 1.2)
    names = [row["runner"] for row in compared]
    values = [100 * row["top1_agreement"] for row in compared]
    colors = ["#2e7d32" if row["verdict"] == "PASS" else "#c62828" for row in compared]
    axes.barh(names, values, color=colors)
    for index, row in enumerate(compared):
        floor = row["thresholds"].get("min_top1_agreement")
        if floor is not None:
            axes.plot([100 * floor] * 2, [index - 0.4, index + 0.4], color="black", linewidth=2)
        axes.text(101, index, f"{values[index]:.1f} %", va="center", fontsize=8)
    axes.set_xlim(0, 110)
    return finished_bar_plot(figure, axes, "top-1 agreement with the reference, % of steps (black tick: required)")


def decode_speed_plot(rows: Sequence[dict[str, Any]], baselines: Sequence[dict[str, Any]] = ()) -> str | None:
    """Decode tok/s of every runner (blue) and baseline (grey) against its memory-bandwidth ceiling."""
    measured = [row for row in [*rows, *({"runner": f"{b['runner']} (baseline)", "bench": b} for b in baselines)]
                if speed(row).get("decode_tokens_per_second") is not None]
    if not measured:
        return None
    figure, axes = new_figure(0.45 * len(measured) + 1.2)
    names = [row["runner"] for row in measured]
    axes.barh(names, [row["bench"]["decode_tokens_per_second"] for row in measured], label="decode tok/s (median)",
              color=["#757575" if row["runner"].endswith("(baseline)") else "#1565c0" for row in measured])
    for index, row in enumerate(measured):
        ceiling = row["bench"]["ceiling_tokens_per_second"]
        axes.plot([ceiling] * 2, [index - 0.45, index + 0.45], color="#e65100", linewidth=2.5,
                  label="memory-bandwidth ceiling" if index == 0 else None)
    axes.set_xscale("log")
    return finished_bar_plot(figure, axes, "tokens per second (log)", legend=True)


def baseline_ratio_plot(report: dict[str, Any]) -> str | None:
    """Bars of runner ÷ baseline, one group per (runner, baseline) pair, with the line of parity at 1."""
    pairs = [(f"{row['runner']} vs {baseline}", ratio) for row in report.get("bench", {}).get("runners", [])
             for baseline, ratio in row.get("vs_baselines", {}).items()]
    if not pairs:
        return None
    figure, axes = new_figure(0.9 * len(pairs) + 1.2)
    labels = {"decode_tokens_per_second": "decode tok/s ×", "prefill_tokens_per_second": "prefill tok/s ×",
              "time_to_first_token_seconds": "TTFT × (lower is better)"}
    height = 0.8 / len(labels)
    for offset, (metric, label) in enumerate(labels.items()):
        positions = [index + (offset - 1) * height for index in range(len(pairs))]
        values = [ratio.get(metric) or 0.0 for _, ratio in pairs]
        axes.barh(positions, values, height=height, label=label)
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_yticks(range(len(pairs)), [name for name, _ in pairs])
    return finished_bar_plot(figure, axes, "runner ÷ baseline (1 = parity)", legend=True)


# -------------------------------------------------------------------------------------------------- html

STYLE = """
body { font: 14px/1.45 -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 24px auto; max-width: 1150px;
       color: #1b1b1b; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #555; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
table.details { font-size: 12px; }
th, td { padding: 4px 6px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { white-space: normal; vertical-align: bottom; }
th:nth-child(-n+4), td:nth-child(-n+4) { text-align: left; }
th { background: #f3f3f3; }
.PASS { color: #2e7d32; font-weight: 600; } .FAIL { color: #c62828; font-weight: 600; }
.reference { color: #555; font-weight: 600; }
img { max-width: 100%; }
li { margin: 2px 0; }
"""

DETAIL_HEADER = ["backend", "precision", "device", "verdict", "max abs Δlogit", "mean abs Δlogit", "min cosine",
                 "mean KL", "max KL", "top-1 %", "top-5 overlap", "NaN/Inf", "greedy match", "steps",
                 "perplexity", "perplexity ratio", "load s", "TTFT ms", "prefill tok/s", "decode tok/s", "% ceiling",
                 "peak RSS", "size"]


def detail_cells(row: dict[str, Any]) -> list[str]:
    bench = speed(row)
    summary = dict(zip(SUMMARY_HEADER, summary_cells(row)))
    ttft = bench.get("time_to_first_token_seconds")
    rss = bench.get("peak_rss_bytes")
    return [*(summary[name] for name in SUMMARY_HEADER[:5]), number(row.get("mean_abs_logit_diff"), ".2e"),
            number(row.get("min_cosine"), ".6f"), summary["mean KL"], number(row.get("max_kl_divergence"), ".2e"),
            summary["top-1 %"], number(row.get("top5_overlap"), ".2f"), number(row.get("nonfinite_logits"), "d"),
            summary["greedy match"], number(row.get("teacher_forced_steps"), "d"),
            number(row.get("perplexity"), ".2f"), summary["perplexity ratio"],
            number(bench.get("load_seconds"), ".2f"), "—" if ttft is None else f"{1000 * ttft:.1f}",
            number(bench.get("prefill_tokens_per_second"), ".0f"), summary["decode tok/s"], summary["% ceiling"],
            size_text(rss), summary["size"]]


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], verdict_column: int | None = 3) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f'<td class="{html.escape(cell)}">{html.escape(cell)}</td>'
                                    if index == verdict_column
                                    else f"<td>{html.escape(cell)}</td>" for index, cell in enumerate(row)) + "</tr>"
                   for row in rows)
    return (f"<div class='scroll'><table class='details'><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table></div>")


def html_list(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def html_plot(title: str, png: str | None, caption: str) -> str:
    if png is None:
        return ""
    return (f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
            f"<p class='meta'>{html.escape(caption)}</p>")


def html_table_section(title: str, note: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A titled table with its note, or nothing when it has no rows."""
    if not rows:
        return ""
    return (f"<h2>{html.escape(title)}</h2><p class='meta'>{html.escape(note)}</p>"
            + html_table(header, rows, verdict_column=None))


def html_shortened(report: dict[str, Any]) -> str:
    notes = shortened_notes(report)
    if not notes:
        return ""
    return ("<h2>Shortened measurements</h2>" + "".join(f"<p class='meta'>{html.escape(note)}</p>" for note in notes)
            + html_list([html.escape(line) for line in shortened_lines(report)]))


def html_baselines(report: dict[str, Any]) -> str:
    baselines = report.get("bench", {}).get("baselines", [])
    if not baselines:
        return ""
    ratio_rows = ratio_table_rows(report)
    return ("<h2>Against the baselines</h2>" f"<p class='meta'>{html.escape(baseline_note(report))}</p>"
            + html_table(BASELINE_HEADER, [baseline_cells(row) for row in baselines], verdict_column=None)
            + (html_table(RATIO_HEADER, ratio_rows, verdict_column=None) if ratio_rows else "")
            + html_plot("Runner ÷ baseline", baseline_ratio_plot(report),
                        "Decode and prefill: above 1 the runner is faster. TTFT: below 1 it answers sooner."))


def html_report(report: dict[str, Any]) -> str:
    model, machine = report.get("model", {}), report["machine"]
    rows = rows_by_runner(report)
    validation, bench = report.get("validation", {}), report.get("bench", {})
    failing = [f"<b>{html.escape(row['runner'])}</b>: {html.escape('; '.join(row['failures']))}"
               for row in rows if row["failures"]]
    skipped = [f"{html.escape(reason)}: <i>{html.escape(', '.join(runners))}</i>"
               for reason, runners in skipped_by_reason(report).items()]
    prompts = [f"{html.escape(p['prompt'])}: {p['prompt_tokens']} tokens"
               f"{' (crosses the sliding window)' if p['crosses_window'] else ''}"
               for p in (rows[0]["prompts"] if rows and rows[0].get("prompts") else [])]
    bandwidth = bench.get("read_bandwidth_bytes_per_second")
    machine_line = (f"{machine['cpu']} · {machine['logical_cores']} logical cores · "
                    f"{machine['ram_bytes'] / 2**30:.0f} GiB RAM · {machine['os']}"
                    + (f" · read bandwidth {bandwidth / 1e9:.1f} GB/s (best of "
                       f"{len(bench.get('read_bandwidth_by_kernel', {})) or 1} read kernels and sizes)"
                       if bandwidth else ""))
    parts = [
        f"<h1>Validation report: {html.escape(model.get('slug', '?'))}</h1>",
        f"<p class='meta'>Model <code>{html.escape(model.get('model_id', '?'))}</code> · "
        f"{html.escape(machine_line)} · {html.escape(report['generated_at'])}</p>",
        html_table(DETAIL_HEADER, [detail_cells(row) for row in rows]),
        "<h2>Failures</h2>" + html_list(failing) if failing else "",
        "<h2>Skipped</h2>" + html_list(skipped) if skipped else "",
        html_plot("Max |Δlogit| per step", logit_difference_plot(rows),
                  f"Teacher forcing: every runner is fed the reference's greedy tokens. Log scale; exact zeros are "
                  f"drawn at {ZERO_DIFFERENCE_FLOOR:g}."),
        html_plot("Top-1 agreement", top1_plot(rows),
                  "Over every teacher-forced step (the prompts', then the held-out text's). Green: PASS, red: FAIL."),
        html_plot("Decode speed", decode_speed_plot(rows, bench.get("baselines", [])),
                  "Orange: the memory-bandwidth ceiling, read bandwidth ÷ weight bytes read per token. Grey: "
                  "baselines."),
        html_table_section("Baselines on the same tokens", GATE_BASELINE_NOTE, GATE_BASELINE_HEADER,
                           gate_baseline_rows(report)),
        html_baselines(report),
        html_shortened(report),
        html_table_section("Where the time went", TIMING_NOTE, TIMING_HEADER, timing_rows(report)),
        "<h2>Prompts</h2>" + html_list(prompts) if prompts else "",
        f"<h2>Versions</h2><p class='meta'>{html.escape(', '.join(f'{k} {v}' for k, v in report['versions'].items()))}"
        f"</p>",
        f"<p class='meta'>Steps per prompt: {validation.get('max_new_tokens', '—')} · held-out tokens "
        f"(teacher-forced, perplexity): {validation.get('heldout_tokens', '—')} · bench settings: "
        f"{html.escape(json.dumps(bench.get('settings', {})))}</p>",
    ]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Validation report "
            f"{html.escape(model.get('slug', ''))}</title><style>{STYLE}</style></head><body>"
            + "\n".join(part for part in parts if part) + "</body></html>\n")


def write_report(folder: Path) -> dict[str, Path]:
    """Merge the saved pieces in `folder` into report.json, report.md and report.html; return their paths."""
    report = build_report(folder)
    paths = {"json": folder / "report.json", "md": folder / "report.md", "html": folder / "report.html"}
    write_atomic(paths["json"], json_text(report))
    write_atomic(paths["md"], markdown(report))
    write_atomic(paths["html"], html_report(report))
    return paths
