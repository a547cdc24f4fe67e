"""Small helpers for the sizes and tables people read and type."""

from __future__ import annotations

from ._errors import InputError


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


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(text: str) -> tuple[str, float]:
    """``("bytes", n)``, ``("share", 0.35)`` or ``("bpw", 4.25)`` from 6GB, 5.5GiB, 35%, 4.25bpw."""
    import re

    t = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(%|bpw|[kmgt]?i?b)?", t)
    if not m:
        raise InputError(f"budget {text!r}: use bytes (6GB, 5.5GiB, 800MiB), a share of "
                         f"full precision (35%) or bits per weight (4.25bpw)")
    value, unit = float(m.group(1)), m.group(2) or "b"
    if unit == "%":
        if not 0 < value <= 100:
            raise InputError(f"budget {text!r}: a share must be in (0, 100]%")
        return "share", value / 100
    if unit == "bpw":
        if not 0 < value <= 32:
            raise InputError(f"budget {text!r}: bits per weight must be in (0, 32]")
        return "bpw", value
    if value <= 0:
        raise InputError(f"budget {text!r}: bytes must be positive")
    return "bytes", value * _UNITS[unit]
