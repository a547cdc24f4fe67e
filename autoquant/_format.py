"""Small formatting helpers for tables people read."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain, aligned text table (numbers right-aligned)."""
    cols = list(zip(header, *rows)) if rows else [(h,) for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]

    def fmt(row):
        cells = []
        for value, width in zip(row, widths):
            s = str(value)
            numeric = s.replace(".", "").replace(",", "").replace("%", "").replace("-", "") \
                .replace(" ", "").rstrip("BKMGiT").isdigit()
            cells.append(s.rjust(width) if numeric else s.ljust(width))
        return "  ".join(cells).rstrip()

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in rows]
    return "\n".join(out)
