"""Small fixes that make the built site self-contained and free of JavaScript errors.

1. MathJax is served by the site itself, so formulas render offline and without a CDN.
   MathJax 3's built files come from the ``django-static-mathjax`` wheel (MathJax 3.2.2,
   no dependencies). They are copied to ``_static/mathjax`` once the HTML is written;
   ``mathjax_path`` in ``_config.yml`` points there.
2. sphinx-thebe's configuration script is registered twice under Jupyter Book 1.0.4, which
   makes the browser report "Identifier 'THEBE_JS_URL' has already been declared" on every
   page. Each page's script list is de-duplicated before it is rendered (togglebutton's
   selector script is repeated the same way).
"""

import shutil
from pathlib import Path


def _mathjax_dir() -> Path:
    import mathjax  # from django-static-mathjax

    folder = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (folder / "tex-mml-chtml.js").is_file():
        raise FileNotFoundError(f"MathJax's tex-mml-chtml.js is not in {folder}")
    return folder


def _copy_mathjax(app, exception):
    if exception is None and app.builder.format == "html":
        dest = Path(app.outdir) / "_static" / "mathjax"
        shutil.copytree(_mathjax_dir(), dest, dirs_exist_ok=True)


def _script_key(script):
    # The second registration differs only in filename ('' instead of None).
    filename = str(getattr(script, "filename", script) or "")
    attributes = getattr(script, "attributes", {}) or {}
    return filename, tuple(sorted((k, str(v)) for k, v in attributes.items()))


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if scripts:
        seen, unique = set(), []
        for script in scripts:
            key = _script_key(script)
            if key not in seen:
                seen.add(key)
                unique.append(script)
        context["script_files"] = unique


def setup(app):
    _mathjax_dir()  # fail early, before a long build, if MathJax is missing
    app.connect("build-finished", _copy_mathjax)
    app.connect("html-page-context", _dedupe_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
