"""One look for every figure in the book, sized for its text column.

The rendered book's column is 688 pixels wide. A figure at most 6.8 inches wide, drawn
at 144 dots per inch, is scaled to fit it; its smallest text (8 points) then renders
about 11 pixels tall, and the PNG stays sharp on a high-density screen.
"""

from __future__ import annotations

import matplotlib as mpl

__all__ = ["COLUMN_INCHES", "use_book_style"]

COLUMN_INCHES = 6.8  # the widest figure that keeps 8-point text legible in the column


def use_book_style() -> None:
    """Set matplotlib's defaults for the book's figures (call once, after importing pyplot)."""
    mpl.rcParams.update({
        "figure.dpi": 144,
        "figure.figsize": (COLUMN_INCHES, 3.4),
        "font.size": 9,
        "axes.titlesize": 10,
        "legend.fontsize": 8,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
    })
