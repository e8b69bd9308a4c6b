"""Serve MathJax from the site itself, so formulas render offline and without a CDN.

MathJax 3's built files come from the ``django-static-mathjax`` wheel (MathJax 3.2.2,
no dependencies). They are copied to ``_static/mathjax`` once the HTML is written;
``mathjax_path`` in ``_config.yml`` points there.
"""

import shutil
from pathlib import Path


def _mathjax_dir() -> Path:
    import mathjax  # from django-static-mathjax

    folder = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (folder / "tex-mml-chtml.js").is_file():
        raise FileNotFoundError(f"MathJax's tex-mml-chtml.js is not in {folder}")
    return folder


def _copy(app, exception):
    if exception is None and app.builder.format == "html":
        dest = Path(app.outdir) / "_static" / "mathjax"
        shutil.copytree(_mathjax_dir(), dest, dirs_exist_ok=True)


def setup(app):
    _mathjax_dir()  # fail early, before a long build, if MathJax is missing
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
