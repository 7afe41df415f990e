"""Results as a terminal table, JSON (every raw number + environment), Markdown and PNG."""

from __future__ import annotations

import json
from pathlib import Path


def _shape(row) -> str:
    if row["suite"] == "plain":
        return f"N={row['N']} C={row['C']} {row['dtype']}"
    return f"N={row['N']} D={row['D']} V={row['V']} {row['dtype']}"


def _mib(value) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def _err(value) -> str:
    return "" if value is None else f"{value:.1e}"


COLUMNS = ["suite", "shape", "implementation", "ms", "x floor", "temp MiB", "peak MiB",
           "loss err", "grad err"]  # fmt: skip


def table_rows(rows):
    for r in rows:
        ratio = r.get("ratio")
        yield [
            r["suite"], _shape(r), r["implementation"], f"{r['seconds'] * 1e3:.2f}",
            "" if ratio is None else f"{ratio:.2f}", _mib(r.get("temp_bytes")),
            _mib(r.get("peak_bytes")), _err(r.get("loss_rel_err")), _err(r.get("grad_rel_err")),
        ]  # fmt: skip


def terminal(rows) -> str:
    body = [COLUMNS, *table_rows(rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     for line in body)  # fmt: skip


def markdown(rows, env) -> str:
    head = (
        f"Device: {env['device']} · jax {env['jax']} · jaxlib {env['jaxlib']} · "
        f"command: `{env['command']}`\n\n"
        "Times are medians of forward+backward; `x floor` is the time over the floor "
        "measured in the same run (plain: one read+write pass over the logits; linear: "
        "the three matmuls). Errors are ‖a−b‖/‖b‖ against the reference of each suite.\n\n"
    )
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    return head + "\n".join(lines) + "\n"


def chart(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("ratio") is not None]
    if not timed:
        return
    labels = [f"{_shape(r)}\n{r['implementation']}" for r in timed]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(timed) + 1.5), sharey=True)
    ax1.barh(labels, [r["ratio"] for r in timed], color="tab:blue")
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set_xlabel("time / floor (lower is better)")
    ax2.barh(labels, [(r.get("temp_bytes") or 0) / 2**20 for r in timed], color="tab:orange")
    ax2.set_xscale("symlog")
    ax2.set_xlabel("compiled temp memory, MiB")
    ax1.invert_yaxis()
    ax1.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(rows, env, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))


def write(rows, env, out: Path) -> None:
    write_json(rows, env, out)
    (out / "results.md").write_text(markdown(rows, env))
    chart(rows, out / "results.png")
