"""Say where the built site is and open it in a browser when there is a screen."""

import os
import sys
import webbrowser
from pathlib import Path

index = Path(sys.argv[1]).resolve()
if not index.is_file():
    sys.exit(f"{index} was not built")
print(f"\nThe book is built: {index}")
print("  open it in a browser, or serve it with:  make serve   (http://127.0.0.1:8000)")
print("  run and edit the chapters in JupyterLab:  make lab")
has_screen = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
if has_screen and not os.environ.get("CI"):
    webbrowser.open(index.as_uri())
