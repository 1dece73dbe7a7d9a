"""Plot a training log (``log.jsonl``: one JSON object per logged step) to PNG."""

from __future__ import annotations

import json
from pathlib import Path

from .codec.errors import SpeechLMError


def plot_log(log_path: str | Path, out_png: str | Path, keys: list[str] | None = None) -> Path:
    """One panel per metric against step; all numeric keys except step/time/lr when ``keys`` is None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(log_path)
    if not p.is_file():
        raise SpeechLMError(f"log not found: {p}")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise SpeechLMError(f"{p}:{n}: not a JSON line") from None
    if not rows:
        raise SpeechLMError(f"log is empty: {p}")
    if keys is None:
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in ("step", "time")})
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(str(p))
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
