"""Draw the book's diagrams as SVG files in book/images/.

    python tools/draw_diagrams.py            # every diagram
    python tools/draw_diagrams.py --png DIR  # also a PNG preview of each, 750 pixels wide

Each diagram is drawn in inches on a figure 7.8 inches wide, about the width of the site's
text column, so 11-point labels show at about 11 points. The output is the same on every
run: fixed sizes, text drawn as paths, a fixed hash salt for the SVG ids and no date in the
metadata. Before a file is written, every label is measured and checked: labels do not
overlap each other, do not cross a shape's edge, and no arrow runs through one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "book" / "images"
WIDTH = 7.8  # inches

plt.rcParams.update({
    "svg.fonttype": "path",
    "svg.hashsalt": "transformers-from-scratch",
    "font.family": "DejaVu Sans",
    "font.size": 11,
    "mathtext.fontset": "dejavusans",
    "lines.solid_capstyle": "round",
})

INK = "#222222"
GREY = "#9a9a9a"
PALE = "#eeeeee"
BLUE, ORANGE, GREEN, RED, PURPLE = "#4c78a8", "#f58518", "#54a24b", "#e45756", "#b279a2"
LIGHT = {BLUE: "#cddcec", ORANGE: "#fde0c2", GREEN: "#d4ebd0", RED: "#f7d0cf", PURPLE: "#ead9e6"}
HEADS = [BLUE, ORANGE, GREEN, PURPLE]


class Sketch:
    """A figure whose data coordinates are inches, which remembers what it drew so that
    ``check`` can measure every label against every shape and arrow."""

    def __init__(self, height: float, width: float = WIDTH) -> None:
        self.fig = plt.figure(figsize=(width, height))
        self.ax = self.fig.add_axes((0, 0, 1, 1))
        self.ax.set_xlim(0, width)
        self.ax.set_ylim(0, height)
        self.ax.set_aspect("equal")
        self.ax.axis("off")
        self.width, self.height = width, height
        self.shapes: list[tuple[tuple[float, float, float, float], bool]] = []  # (box, is a frame)
        self.texts: list[tuple[object, tuple | None]] = []  # (artist, the shape it sits in)
        self.segments: list[tuple[tuple[float, float], tuple[float, float]]] = []

    # ---- shapes -----------------------------------------------------------------------
    def box(self, x, y, w, h, text=None, fc="white", ec=INK, fontsize=11, lw=1.2, round_=0.06,
            color=INK, frame=False, ls="-", z=2):
        """A rounded box centred on (x, y), optionally with a label inside; returns its extent."""
        extent = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
        style = f"round,pad=0,rounding_size={round_}" if round_ else "square,pad=0"
        self.ax.add_patch(FancyBboxPatch((extent[0], extent[1]), w, h, boxstyle=style, fc=fc, ec=ec,
                                         lw=lw, ls=ls, zorder=z))
        self.shapes.append((extent, frame))
        if text is not None:
            self.text(x, y, text, fontsize=fontsize, inside=extent, color=color, z=z + 1)
        return extent

    def rect(self, x0, y0, w, h, fc="white", ec=INK, lw=1.0, ls="-", hatch=None, z=2, register=True):
        """A plain rectangle with its lower-left corner at (x0, y0)."""
        self.ax.add_patch(Rectangle((x0, y0), w, h, fc=fc, ec=ec, lw=lw, ls=ls, hatch=hatch, zorder=z))
        extent = (x0, y0, x0 + w, y0 + h)
        if register:
            self.shapes.append((extent, False))
        return extent

    def node(self, x, y, symbol, r=0.13, fc="white", ec=INK, fontsize=12, z=4):
        """A small circle for an elementwise operation: a product, a sum, '1 -'."""
        self.ax.add_patch(Circle((x, y), r, fc=fc, ec=ec, lw=1.2, zorder=z))
        # The label may fill the square inscribed in the circle, a little loosened.
        s = r * 0.85
        extent = (x - s, y - s, x + s, y + s)
        self.shapes.append(((x - r, y - r, x + r, y + r), False))
        self.text(x, y, symbol, fontsize=fontsize, inside=extent, z=z + 1)
        return extent

    def dot(self, x, y, color=INK):
        self.ax.add_patch(Circle((x, y), 0.035, fc=color, ec=color, zorder=5))

    # ---- lines ------------------------------------------------------------------------
    def arrow(self, *points, color=INK, lw=1.4, head=True, shrink_end=0.0, ls="-", z=1):
        """A polyline through ``points`` (inches) with an arrowhead at the end; ``shrink_end``
        stops it that far before the last point (the edge of a circle)."""
        pts = [tuple(map(float, p)) for p in points]
        if shrink_end:
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
            d = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5
            pts[-1] = (x1 - (x1 - x0) * shrink_end / d, y1 - (y1 - y0) * shrink_end / d)
        for a, b in zip(pts[:-2], pts[1:-1]):
            self.ax.plot([a[0], b[0]], [a[1], b[1]], color=color, lw=lw, ls=ls, zorder=z,
                         solid_joinstyle="round")
        style = "-|>" if head else "-"
        self.ax.add_patch(FancyArrowPatch(pts[-2], pts[-1], arrowstyle=style, mutation_scale=13, lw=lw,
                                          color=color, ls=ls, shrinkA=0, shrinkB=0, zorder=z,
                                          joinstyle="miter" if head else "round"))
        self.segments += list(zip(pts[:-1], pts[1:]))

    def line(self, *points, **kw):
        self.arrow(*points, head=False, **kw)

    # ---- text -------------------------------------------------------------------------
    def text(self, x, y, s, fontsize=11, ha="center", va="center", inside=None, color=INK, z=6, **kw):
        t = self.ax.text(x, y, s, fontsize=fontsize, ha=ha, va=va, color=color, zorder=z, **kw)
        self.texts.append((t, inside))
        return t

    # ---- checking ---------------------------------------------------------------------
    def check(self, name: str) -> None:
        """Fail if a label overlaps another label, crosses a shape or an arrow, or leaves the figure."""
        renderer = self.fig.canvas.get_renderer()
        dpi = self.fig.dpi
        boxes = []
        for t, inside in self.texts:
            e = t.get_window_extent(renderer)
            boxes.append(((e.x0 / dpi, e.y0 / dpi, e.x1 / dpi, e.y1 / dpi), inside, t.get_text()))

        def overlap(a, b, pad=0.0):
            return a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad

        def within(a, b):
            return a[0] >= b[0] - 1e-3 and a[1] >= b[1] - 1e-3 and a[2] <= b[2] + 1e-3 and a[3] <= b[3] + 1e-3

        problems = []
        for i, (a, inside, s) in enumerate(boxes):
            if not within(a, (0, 0, self.width, self.height)):
                problems.append(f"{s!r} leaves the figure")
            if inside is not None and not within(a, inside):
                problems.append(f"{s!r} does not fit inside its shape")
            for b, _, s2 in boxes[i + 1:]:
                if overlap(a, b, pad=0.02):
                    problems.append(f"{s!r} overlaps {s2!r}")
            for extent, frame in self.shapes:
                if inside is not None and within(inside, extent):
                    continue  # the shape it sits in, or one around that
                if overlap(a, extent) and not (frame and within(a, extent)):
                    problems.append(f"{s!r} overlaps a shape at {tuple(round(v, 2) for v in extent)}")
            for p, q in self.segments:
                if any(overlap(a, (x, y, x, y), pad=0.015)
                       for x, y in ((p[0] + (q[0] - p[0]) * k / 100, p[1] + (q[1] - p[1]) * k / 100)
                                    for k in range(101))):
                    problems.append(f"{s!r} is crossed by the line {p} -> {q}")
                    break
        if problems:
            raise SystemExit(f"{name}: " + "; ".join(problems))

    def save(self, name: str, png_dir: Path | None) -> None:
        if png_dir is not None:  # before the check, so that a failing drawing can be looked at
            self.fig.savefig(png_dir / name.replace(".svg", ".png"), dpi=750 / self.width)
        self.check(name)
        self.fig.savefig(OUT / name, format="svg", metadata={"Date": None})
        plt.close(self.fig)


# ---- 1. An RNN unrolled over four steps ---------------------------------------------------

def rnn_unrolled() -> Sketch:
    k = Sketch(3.7)
    xs = [2.15, 3.55, 4.95, 6.35]
    y_in, y_cell, y_out = 0.95, 2.0, 3.1
    cw, ch = 0.9, 0.62
    k.text(0.15, y_out, "outputs", ha="left")
    k.text(0.15, y_out - 0.25, r"$y_t = h_t$", ha="left", fontsize=10, color="#555555")
    k.text(0.15, y_in, "inputs", ha="left")
    for t, x in enumerate(xs, start=1):
        k.box(x, y_in, 0.5, 0.38, rf"$x_{t}$", fc=LIGHT[GREEN], ec=GREEN)
        k.box(x, y_cell, cw, ch, "tanh", fc=LIGHT[BLUE], ec=BLUE)
        k.box(x, y_out, 0.5, 0.38, rf"$y_{t}$", fc=LIGHT[ORANGE], ec=ORANGE)
        k.arrow((x, y_in + 0.19), (x, y_cell - ch / 2), color=GREEN)
        k.text(x + 0.09, (y_in + y_cell) / 2 - 0.05, r"$W_{ih}$", ha="left", color=GREEN)
        k.arrow((x, y_cell + ch / 2), (x, y_out - 0.19), color=ORANGE)
    # The hidden state, carried to the right through the same W_hh at every step.
    lefts = [0.3] + [x + cw / 2 for x in xs]
    for t, (x0, x1) in enumerate(zip(lefts, [x - cw / 2 for x in xs] + [7.65])):
        k.arrow((x0, y_cell), (x1, y_cell), color=BLUE)
        k.text((x0 + x1) / 2, y_cell + 0.17, r"$h_0 = 0$" if t == 0 else rf"$h_{t}$", color=BLUE)
        if t < 4:
            k.text((x0 + x1) / 2, y_cell - 0.2, r"$W_{hh}$", color=BLUE, fontsize=10)
    k.text(WIDTH / 2, 0.3,
           r"every step:  $h_t = \tanh(W_{ih}\,x_t + b_{ih} + W_{hh}\,h_{t-1} + b_{hh})$,"
           "  the same weights each time", fontsize=11)
    return k


# ---- 2. The LSTM and GRU cells --------------------------------------------------------------

def lstm_gru_cells() -> Sketch:
    k = Sketch(4.25)
    top, gate_y, bus_y, mid_y = 3.3, 1.75, 1.15, 2.55
    gw, gh = 0.46, 0.34  # a gate's box

    def frame(x0, title):
        k.box(x0 + 2.05, 2.2, 3.0, 2.6, fc="#fafafa", ec=GREY, frame=True, round_=0.15, lw=1.0, z=0)
        k.text(x0 + 2.05, 3.95, title, fontsize=13, weight="bold")

    def gate(x, label):
        tanh = label == "tanh"
        k.box(x, gate_y, gw, gh, label, fc=LIGHT[ORANGE], ec=ORANGE, fontsize=10 if tanh else 12)

    # LSTM, left half.
    frame(0.0, "LSTM")
    gx = {"f": 1.0, "i": 1.55, "g": 2.1, "o": 2.65}
    for g, x in gx.items():
        gate(x, "tanh" if g == "g" else r"$\sigma$")
    ig = (gx["i"] + gx["g"]) / 2
    # the cell state line across the top: c_{t-1} -> (x) f -> (+) i * g -> c_t
    k.text(0.05, top + 0.2, r"$c_{t-1}$", ha="left", color=BLUE)
    k.arrow((0.05, top), (gx["f"], top), color=BLUE, lw=2.2, shrink_end=0.13)
    k.node(gx["f"], top, r"$\odot$")
    k.arrow((gx["f"] + 0.13, top), (ig, top), color=BLUE, lw=2.2, shrink_end=0.13)
    k.node(ig, top, "+")
    k.arrow((ig + 0.13, top), (3.85, top), color=BLUE, lw=2.2)
    k.text(3.85, top + 0.2, r"$c_t$", ha="right", color=BLUE)
    k.arrow((gx["f"], gate_y + gh / 2), (gx["f"], top), shrink_end=0.13)
    k.text(gx["f"] - 0.07, 2.55, r"$f_t$", ha="right")
    k.node(ig, mid_y, r"$\odot$")
    k.arrow((gx["i"], gate_y + gh / 2), (gx["i"], mid_y), (ig, mid_y), shrink_end=0.13)
    k.arrow((gx["g"], gate_y + gh / 2), (gx["g"], mid_y), (ig, mid_y), shrink_end=0.13)
    k.text(gx["i"] - 0.07, 2.2, r"$i_t$", ha="right")
    k.text(gx["g"] + 0.07, 2.2, r"$g_t$", ha="left")
    k.arrow((ig, mid_y + 0.13), (ig, top), shrink_end=0.13)
    # h_t = o_t * tanh(c_t)
    hx = 3.25
    k.box(hx, mid_y + 0.05, 0.5, 0.3, "tanh", fc=LIGHT[ORANGE], ec=ORANGE, fontsize=10, round_=0.12)
    k.dot(hx, top)
    k.arrow((hx, top), (hx, mid_y + 0.2))
    k.node(hx, gate_y, r"$\odot$")
    k.arrow((hx, mid_y - 0.1), (hx, gate_y), shrink_end=0.13)
    k.arrow((gx["o"] + gw / 2, gate_y), (hx, gate_y), shrink_end=0.13)
    k.text((gx["o"] + gw / 2 + hx - 0.13) / 2, gate_y + 0.17, r"$o_t$")
    k.arrow((hx, gate_y - 0.13), (hx, bus_y), (3.85, bus_y), color=GREEN, lw=1.8)
    k.text(3.85, bus_y - 0.2, r"$h_t$", ha="right", color=GREEN)
    # h_{t-1} and x_t feed every gate
    xin = 0.72
    k.line((0.05, bus_y), (gx["o"], bus_y), color=GREEN, lw=1.8)
    k.text(0.05, bus_y - 0.2, r"$h_{t-1}$", ha="left", color=GREEN)
    k.line((xin, 0.45), (xin, bus_y), color=PURPLE, lw=1.8)
    k.dot(xin, bus_y)
    k.text(xin + 0.1, 0.5, r"$x_t$", ha="left", color=PURPLE)
    for x in gx.values():
        k.arrow((x, bus_y), (x, gate_y - gh / 2))
    k.text(2.0, 0.12, r"gates $f, i, o$: forget, input, output; $g$: candidate", fontsize=10)

    # GRU, right half.
    ox = 3.95
    frame(ox, "GRU")
    zx, rx, prod_x, nx = ox + 1.05, ox + 1.65, ox + 2.3, ox + 3.0
    gate(zx, r"$\sigma$")
    gate(rx, r"$\sigma$")
    gate(nx, "tanh")
    # the state line: h_{t-1} -> (x) z -> (+) (1 - z) * n -> h_t
    k.text(ox + 0.05, top + 0.2, r"$h_{t-1}$", ha="left", color=GREEN)
    k.arrow((ox + 0.05, top), (zx, top), color=GREEN, lw=2.2, shrink_end=0.13)
    k.node(zx, top, r"$\odot$")
    k.arrow((zx + 0.13, top), (nx, top), color=GREEN, lw=2.2, shrink_end=0.13)
    k.node(nx, top, "+")
    k.arrow((nx + 0.13, top), (ox + 3.85, top), color=GREEN, lw=2.2)
    k.text(ox + 3.85, top + 0.2, r"$h_t$", ha="right", color=GREEN)
    k.dot(zx, mid_y)
    k.arrow((zx, gate_y + gh / 2), (zx, top), shrink_end=0.13)
    k.text(zx - 0.07, 2.2, r"$z_t$", ha="right")
    one_minus = (zx + nx) / 2
    k.node(one_minus, mid_y, r"$1-$", r=0.17, fontsize=9)
    k.arrow((zx, mid_y), (one_minus, mid_y), shrink_end=0.17)
    k.node(nx, mid_y, r"$\odot$")
    k.arrow((one_minus + 0.17, mid_y), (nx, mid_y), shrink_end=0.13)
    k.arrow((nx, gate_y + gh / 2), (nx, mid_y), shrink_end=0.13)
    k.text(nx + 0.07, 2.2, r"$n_t$", ha="left")
    k.arrow((nx, mid_y + 0.13), (nx, top), shrink_end=0.13)
    # r_t scales W_hn h_{t-1} + b_hn: after the matrix product, before the tanh
    wy = 1.43
    k.node(prod_x, gate_y, r"$\odot$")
    k.arrow((rx + gw / 2, gate_y), (prod_x, gate_y), shrink_end=0.13)
    k.text((rx + gw / 2 + prod_x - 0.13) / 2, gate_y + 0.17, r"$r_t$")
    k.arrow((prod_x + 0.13, gate_y), (nx - gw / 2, gate_y))
    k.box(prod_x, wy, 0.5, 0.26, r"$W_{hn}$", fc=LIGHT[BLUE], ec=BLUE, fontsize=10, round_=0.04)
    k.arrow((prod_x, wy + 0.13), (prod_x, gate_y), shrink_end=0.13)
    # h_{t-1} and x_t feed the gates
    hin, xin = ox + 0.45, ox + 0.72
    k.line((hin, top), (hin, bus_y), (nx, bus_y), color=GREEN, lw=1.8)
    k.dot(hin, top, color=GREEN)
    k.line((xin, 0.45), (xin, bus_y), color=PURPLE, lw=1.8)
    k.dot(xin, bus_y)
    k.text(xin + 0.1, 0.5, r"$x_t$", ha="left", color=PURPLE)
    for x in (zx, rx, nx):
        k.arrow((x, bus_y), (x, gate_y - gh / 2))
    k.arrow((prod_x, bus_y), (prod_x, wy - 0.13))
    k.text(ox + 2.0, 0.12, r"gates $r$: reset, $z$: update; $n$: candidate", fontsize=10)
    return k


# ---- 3. One attention head ------------------------------------------------------------------

def qkv_one_head() -> Sketch:
    k = Sketch(3.9)
    u = 0.15  # inches per row or column: T = 5 rows, C = 4 columns, D = 2 columns
    T, C, D = 5, 4, 2
    mid = 2.05

    def matrix(x0, yc, rows, cols, fc, ec, mask=None):
        """A rows x cols grid with its left edge at x0, centred on yc; mask(i, j) -> colour."""
        y0 = yc - rows * u / 2
        for i in range(rows):
            for j in range(cols):
                colour = mask(i, j) if mask else fc
                k.rect(x0 + j * u, y0 + (rows - 1 - i) * u, u, u, fc=colour, ec="white", lw=0.8,
                       register=False, z=2)
        k.ax.add_patch(Rectangle((x0, y0), cols * u, rows * u, fc="none", ec=ec, lw=1.2, zorder=3))
        k.shapes.append(((x0, y0, x0 + cols * u, y0 + rows * u), False))
        return x0, y0, x0 + cols * u, y0 + rows * u

    x = matrix(0.35, mid, T, C, LIGHT[GREEN], GREEN)
    k.text((x[0] + x[2]) / 2, x[3] + 0.22, r"$X$", fontsize=12)
    k.text((x[0] + x[2]) / 2, x[1] - 0.22, "(T, C)", fontsize=10)
    ys = {"Q": 3.25, "K": mid, "V": 0.85}
    colours = {"Q": BLUE, "K": ORANGE, "V": PURPLE}
    for name, yc in ys.items():
        c = colours[name]
        matrix(2.0, yc, T, D, LIGHT[c], c)
        k.arrow((x[2] + 0.05, mid), (1.25, mid), (1.25, yc), (2.0 - 0.05, yc), color=c)
        k.text(1.33, yc + 0.17, rf"$W_{name.lower()}$", ha="left", color=c)
        k.text(2.0 + D * u + 0.1, yc + 0.2, rf"${name}$  (T, D)", ha="left", fontsize=11)
    k.dot(1.25, mid)
    right = 2.0 + D * u + 0.04

    s0, step = 3.3, 1.3
    centre = lambda x0: x0 + T * u / 2  # noqa: E731
    scores = matrix(s0, mid, T, T, LIGHT[BLUE], BLUE)
    masked = matrix(s0 + step, mid, T, T, None, RED, mask=lambda i, j: LIGHT[RED] if j <= i else PALE)
    weights = matrix(s0 + 2 * step, mid, T, T, None, RED, mask=lambda i, j: "#f0a8a6" if j <= i else "white")
    above, below = scores[3] + 0.25, scores[1] - 0.22
    # Q and K meet in the scores.
    k.arrow((right, ys["Q"]), (s0 + 0.15, ys["Q"]), (s0 + 0.15, scores[3] + 0.04), color=BLUE)
    k.arrow((right, mid), (s0 - 0.04, mid), color=ORANGE)
    k.text(s0 + 0.27, above, r"$QK^\top/\sqrt{D}$", ha="left")
    k.text(centre(s0), below, "scores", fontsize=10)
    k.text(centre(s0), below - 0.23, "(T, T)", fontsize=10)
    k.arrow((scores[2] + 0.04, mid), (masked[0] - 0.04, mid))
    k.text(centre(masked[0]), above, "causal mask", fontsize=10)
    k.text(centre(masked[0]), below, r"$-\infty$ above", fontsize=10)
    k.text(centre(masked[0]), below - 0.23, "the diagonal", fontsize=10)
    k.arrow((masked[2] + 0.04, mid), (weights[0] - 0.04, mid))
    k.text(centre(weights[0]), above, "softmax by row", fontsize=10)
    k.text(centre(weights[0]), below, "weights", fontsize=10)
    k.text(centre(weights[0]), below - 0.23, "(T, T)", fontsize=10)
    at = weights[2] + 0.3
    out = matrix(at + 0.28, mid, T, D, LIGHT[PURPLE], PURPLE)
    k.node(at, mid, "@", r=0.13, fontsize=11)
    k.arrow((weights[2] + 0.04, mid), (at, mid), shrink_end=0.13)
    k.arrow((at + 0.13, mid), (out[0] - 0.04, mid))
    k.arrow((right, ys["V"]), (at, ys["V"]), (at, mid), color=PURPLE, shrink_end=0.13)
    k.text((out[0] + out[2]) / 2, out[3] + 0.22, "output", fontsize=10)
    k.text((out[0] + out[2]) / 2, out[1] - 0.22, "(T, D)", fontsize=10)
    k.text(5.2, 0.3, "one sequence shown; a batch adds B in front of every shape", fontsize=10,
           color="#555555")
    return k


# ---- 4. Splitting channels into heads ----------------------------------------------------

def head_split() -> Sketch:
    k = Sketch(3.3)
    T, H, D = 6, 4, 2
    u = 0.22
    y0 = 0.95
    top = y0 + T * u
    t_mark = 2  # one token's row, outlined in every panel

    def cells(x0, channels):
        """T rows of the given channels, coloured by head, from x0; returns the x of each channel."""
        xs = [x0 + n * u for n in range(len(channels))]
        for x, c in zip(xs, channels):
            for t in range(T):
                k.rect(x, y0 + (T - 1 - t) * u, u, u, fc=LIGHT[HEADS[c // D]], ec="white", lw=1.0,
                       register=False)
        x1 = xs[-1] + u
        k.ax.add_patch(Rectangle((x0, y0 + (T - 1 - t_mark) * u), x1 - x0, u, fc="none", ec=INK, lw=1.8,
                                 zorder=4))
        return xs

    def outline(x0, x1, c, lw=1.3):
        k.ax.add_patch(Rectangle((x0, y0), x1 - x0, T * u, fc="none", ec=c, lw=lw, zorder=3))
        k.shapes.append(((x0, y0, x1, y0 + T * u), False))

    def channel_numbers(xs, channels):
        for x, c in zip(xs, channels):
            k.text(x + u / 2, top + 0.15, str(c), fontsize=10, color=HEADS[c // D])

    # (B, T, C): channels in a row, coloured by the head they will belong to
    a0 = 0.5
    xs = cells(a0, range(H * D))
    outline(a0, xs[-1] + u, INK)
    channel_numbers(xs, range(H * D))
    a_mid = a0 + H * D * u / 2
    k.text(a_mid, 3.05, "(B, T, C)", fontsize=12, weight="bold")
    k.text(a_mid, 2.75, "q, one of the B sequences", fontsize=10)
    for t in range(T):
        k.text(a0 - 0.08, y0 + (T - 1 - t + 0.5) * u, str(t), fontsize=10, ha="right",
               weight="bold" if t == t_mark else "normal")
    k.text(a0 - 0.08, top + 0.15, "t", fontsize=10, ha="right", style="italic")
    k.text(a_mid, y0 - 0.2, "C channels", fontsize=10)

    # view(B, T, H, D): the same numbers in the same places, each row read as H groups of D
    b0 = 2.85
    xs = cells(b0, range(H * D))
    outline(b0, xs[-1] + u, INK)
    for h in range(1, H):
        k.ax.plot([b0 + h * D * u] * 2, [y0, top], color=INK, lw=1.6, zorder=4)
    channel_numbers(xs, range(H * D))
    b_mid = b0 + H * D * u / 2
    k.text(b_mid, 3.05, "(B, T, H, D)", fontsize=12, weight="bold")
    k.text(b_mid, 2.75, "q.view(B, T, H, D)", fontsize=11, family="monospace")
    for h in range(H):
        k.text(b0 + (h + 0.5) * D * u, y0 - 0.2, f"h={h}", fontsize=10, color=HEADS[h])
    k.arrow((a0 + H * D * u + 0.12, y0 + T * u / 2), (b0 - 0.12, y0 + T * u / 2))

    # transpose(1, 2): heads move in front of time; each head is its own (T, D) matrix
    c0 = 5.5
    step = 0.57
    for h in range(H):
        x = c0 + h * step
        cells(x, range(h * D, h * D + D))
        outline(x, x + D * u, HEADS[h], lw=1.6)
        channel_numbers([x, x + u], range(h * D, h * D + D))
        k.text(x + u, y0 - 0.2, f"h={h}", fontsize=10, color=HEADS[h])
    c_mid = c0 + ((H - 1) * step + D * u) / 2
    k.text(c_mid, 3.05, "(B, H, T, D)", fontsize=12, weight="bold")
    k.text(c_mid, 2.75, "q.transpose(1, 2)", fontsize=11, family="monospace")
    k.arrow((b0 + H * D * u + 0.12, y0 + T * u / 2), (c0 - 0.12, y0 + T * u / 2))

    k.text(2.1, 0.3, "view: no number moves; each row is cut into H pieces", fontsize=10, color="#555555")
    k.text(6.0, 0.3, "transpose: one (T, D) matrix per head", fontsize=10, color="#555555")
    return k


# ---- 5. FlashAttention's tiles ------------------------------------------------------------

def flash_tiles() -> Sketch:
    k = Sketch(4.3)
    n = 4          # blocks along each side
    b = 0.55       # inches per block
    gx, gy = 1.05, 0.55
    i_now, j_now = 2, 1
    grid_top = gy + n * b

    # Q in row blocks, on the left
    for i in range(n):
        y = gy + (n - 1 - i) * b
        fc = LIGHT[BLUE] if i == i_now else "white"
        k.rect(0.45, y + 0.03, 0.3, b - 0.06, fc=fc, ec=BLUE, lw=1.2)
        k.text(0.37, y + b / 2, rf"$Q_{i}$", ha="right", fontsize=11, color=BLUE)
    k.text(0.6, grid_top + 0.2, r"$Q$", fontsize=12, color=BLUE)
    # K and V in column blocks, above
    for j in range(n):
        x = gx + j * b
        fc = LIGHT[ORANGE] if j == j_now else "white"
        k.rect(x + 0.03, grid_top + 0.12, b - 0.06, 0.3, fc=fc, ec=ORANGE, lw=1.2)
        k.text(x + b / 2, grid_top + 0.6, rf"$K_{j}, V_{j}$", fontsize=10, color=ORANGE)

    # the (T, T) grid of score tiles: only the current one exists
    for i in range(n):
        for j in range(n):
            x, y = gx + j * b, gy + (n - 1 - i) * b
            if j > i:
                k.rect(x, y, b, b, fc=PALE, ec=GREY, lw=0.8, ls=(0, (3, 2)), register=False)
            elif (i, j) == (i_now, j_now):
                k.rect(x, y, b, b, fc="#f0a8a6", ec=RED, lw=2.0, register=False, z=3)
            elif i == i_now and j < j_now:
                k.rect(x, y, b, b, fc=LIGHT[RED], ec=GREY, lw=0.8, ls=(0, (3, 2)), register=False)
            else:
                k.rect(x, y, b, b, fc="white", ec=GREY, lw=0.8, ls=(0, (3, 2)), register=False)
    k.shapes.append(((gx, gy, gx + n * b, grid_top), False))
    for i in range(n):
        for j in range(i + 1, n):
            x, y = gx + j * b, gy + (n - 1 - i) * b
            k.text(x + b / 2, y + b / 2, "skip", fontsize=9, color="#666666", inside=(x, y, x + b, y + b))
    # the row of the current Q block, streamed left to right
    row_y = gy + (n - 1 - i_now) * b + b / 2
    k.arrow((gx + 0.08, row_y - 0.17), (gx + (i_now + 1) * b - 0.08, row_y - 0.17), color=INK, lw=1.3, z=4)
    x_now, y_now = gx + j_now * b, gy + (n - 1 - i_now) * b
    k.text(x_now + b / 2, y_now + b / 2 + 0.08, r"$s$", fontsize=12, color=RED,
           inside=(x_now, y_now, x_now + b, y_now + b))
    k.text(gx + n * b / 2, gy - 0.22, "the (T, T) scores, one tile at a time", fontsize=10)

    # what the current tile updates
    px = 3.75
    lines = [
        (r"$s = Q_2 K_1^\top / \sqrt{D}$", "the tile in red"),
        (r"$m' = \max(m,\ \max_j s_j)$", "running max, per row"),
        (r"$\alpha = e^{m - m'}$", "rescales what came before"),
        (r"$\ell \leftarrow \alpha\,\ell + \sum_j e^{s_j - m'}$", "running sum"),
        (r"$a \leftarrow \alpha\,a + e^{s - m'} V_1$", "running weighted sum"),
    ]
    y = 3.65
    k.text(px, y + 0.35, r"for $Q_2$, tile by tile ($K_0, K_1, K_2$):", ha="left", fontsize=11)
    for formula, note in lines:
        k.text(px + 0.1, y - 0.02, formula, ha="left", fontsize=11)
        k.text(7.7, y - 0.02, note, ha="right", fontsize=10, color="#555555")
        y -= 0.42
    k.text(px, y - 0.05, r"after the last tile: $O_2 = a / \ell$", ha="left", fontsize=11)
    k.text(px, y - 0.5, r"kept per row: $m$, $\ell$ and $a$, not the $(T, T)$ matrix", ha="left",
           fontsize=10, color="#555555")
    return k


DIAGRAMS = {
    "rnn_unrolled.svg": rnn_unrolled,
    "lstm_gru_cells.svg": lstm_gru_cells,
    "qkv_one_head.svg": qkv_one_head,
    "head_split.svg": head_split,
    "flash_tiles.svg": flash_tiles,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", type=Path, help="also write PNG previews to this folder")
    parser.add_argument("names", nargs="*", help="only these files, e.g. rnn_unrolled.svg")
    args = parser.parse_args()
    if args.png:
        args.png.mkdir(parents=True, exist_ok=True)
    for name in args.names or DIAGRAMS:
        DIAGRAMS[name]().save(name, args.png)
        print("wrote", (OUT / name).relative_to(ROOT))


if __name__ == "__main__":
    main()
