"""Run a chapter's hidden tests against its solutions and against its stubs.

    .venv/bin/python tools/try_hidden_tests.py chapters/02_attention.ipynb [--cheat QUESTION=EXPR ...]

Executes the chapter's code cells in one IPython namespace (solutions included), then:
every hidden test in grading/<chapter>.py must pass; with each exercise's function put
back to its stub, every hidden test of that question must fail. ``--cheat
stable_softmax="lambda s: torch.softmax(s, -1)"`` replaces a solution with an expression
evaluated in the namespace and reports which tests catch it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import inspect
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]


def load_hidden(chapter: Path) -> list:
    path = ROOT / "grading" / f"{chapter.stem}.py"
    scope: dict = {"__name__": f"hidden_{chapter.stem}"}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), scope)
    return [v for v in scope.values() if callable(v) and hasattr(v, "question")]


def call(test, env) -> str | None:
    params = inspect.signature(test).parameters
    kwargs = {p: (env if p == "env" else env.get(p)) for p in params}
    try:
        test(**kwargs)
    except Exception as err:  # noqa: BLE001 - the failure is the report
        return f"{type(err).__name__}: {err}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("chapter", type=Path)
    parser.add_argument("--cheat", action="append", default=[])
    args = parser.parse_args()
    from IPython.core.interactiveshell import InteractiveShell

    nb = json.loads(args.chapter.read_text(encoding="utf-8"))
    os.chdir(args.chapter.parent)
    shell = InteractiveShell.instance()
    stubs = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        tags = cell["metadata"].get("tags", [])
        src = "".join(cell["source"])
        if "exercise" in tags:
            name = src.split("def ", 1)[1].split("(", 1)[0].strip()
            stubs[name] = src
        if "raises-exception" in tags:
            continue
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = shell.run_cell(src, silent=True)
        if not result.success and "exercise" not in tags:
            print("cell failed:", src[:200], file=sys.stderr)
            return 2
    env = shell.user_ns
    tests = load_hidden(args.chapter)
    bad = 0
    print(f"{len(tests)} hidden tests for {sorted(stubs)}")
    for t in tests:
        if t.question not in stubs:
            print(f"  {t.__name__}: question {t.question!r} is not an exercise of this chapter")
            bad += 1
        reason = call(t, env)
        if reason:
            bad += 1
            print(f"  FAIL on the solution: {t.__name__}: {reason}")
    for q, stub in stubs.items():
        solution = env[q]
        scope = dict(env)
        exec(stub, scope)
        env[q] = scope[q]
        for t in tests:
            if t.question == q and call(t, env) is None:
                bad += 1
                print(f"  PASSES on the stub: {t.__name__}")
        env[q] = solution
        n = sum(t.question == q for t in tests)
        print(f"  {q}: {n} hidden tests")
        if n == 0:
            bad += 1
    for cheat in args.cheat:
        q, expr = cheat.split("=", 1)
        solution = env[q]
        env[q] = eval(expr, env)
        for t in tests:
            if t.question == q:
                reason = call(t, env)
                print(f"  cheat {q}: {t.__name__}: {'CAUGHT: ' + reason if reason else 'passes'}")
        env[q] = solution
    print("OK" if not bad else f"{bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
