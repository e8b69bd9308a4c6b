"""What the autograder runs inside a submission's kernel.

:mod:`companion.assignment` turns a chapter's exercises into graded questions for
otter-grader. Their tests call the helpers here:

- :func:`run_checks` runs the chapter's own check cells against the submission and
  fails with the check's verdict (the public test of every question);
- :func:`forbidding` makes named functions raise while the learner's function runs, so
  that an exercise that asks for the learner's own code is not passed by calling the
  package's reference under another name;
- :func:`time_limit` and :func:`install_time_limits` stop a cell or a test that runs
  too long with :class:`TimeLimitExceeded`, which the grader records as a failure with
  its reason.

Hidden tests live in ``grading/<chapter>.py`` at the repository root. Each is a function
whose parameters name the notebook variables it needs (otter passes them in) and whose
imports are inside its body, marked with :func:`hidden`::

    @hidden("stable_softmax")
    def test_large_scores(stable_softmax):
        import torch
        from companion.grading import expect_same
        expect_same(stable_softmax(torch.tensor([1e4, 1e4])), torch.tensor([0.5, 0.5]), "two equal huge scores")
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import signal
import sys
import threading
from typing import Any, Callable, Iterator

__all__ = [
    "ForbiddenCall",
    "TimeLimitExceeded",
    "expect_same",
    "forbidding",
    "hidden",
    "install_time_limits",
    "run_checks",
    "time_limit",
]


class TimeLimitExceeded(BaseException):
    """A cell or a test ran past its time limit.

    A BaseException, like KeyboardInterrupt, so that a learner's ``except Exception``
    does not swallow it; and the alarm repeats every second until the block is left, in
    case a bare ``except:`` does.
    """


class ForbiddenCall(Exception):
    """The learner's function called a function the exercise asks them to write."""


def hidden(question: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Mark a function in ``grading/<chapter>.py`` as a hidden test of ``question``.

    ``question`` is the name of the function the exercise asks for. The decorator only
    records it; :mod:`companion.assignment` reads the mark from the file's source.
    """
    if not isinstance(question, str) or not question.isidentifier():
        raise ValueError(f"hidden(question={question!r}): the question must be the exercise's function name")

    def mark(test: Callable[..., None]) -> Callable[..., None]:
        if not test.__name__.startswith("test_"):
            raise ValueError(f"hidden test {test.__name__!r}: its name must start with 'test_'")
        test.question = question  # type: ignore[attr-defined]
        return test

    return mark


def expect_same(got: Any, expected: Any, case: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise AssertionError naming ``case`` unless ``got`` matches ``expected``.

    Tensors must agree in shape and dtype, then in value within the tolerances, as
    :func:`companion.exercises.same` compares them.
    """
    from .exercises import same

    reason = same(got, expected, atol, rtol)
    if reason:
        raise AssertionError(f"{case}: {reason}")


def run_checks(env: dict[str, Any], source: str) -> None:
    """Run a chapter's check cell ``source`` against the submission's variables ``env``.

    The cell runs in a copy of ``env`` (it defines nothing in the submission) with
    ``check`` replaced by a version that raises AssertionError carrying the verdict the
    learner would have read. A cell that calls ``check`` no time fails too: a public test
    that checks nothing is a defect of the assignment, not a pass.
    """
    from .exercises import passes

    calls: list[bool] = []

    def strict_check(*args: Any, **kwargs: Any) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            passed = passes(*args, **kwargs)
        calls.append(passed)
        if not passed:
            raise AssertionError(out.getvalue().strip())

    scope = dict(env)
    scope["check"] = strict_check
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(source, "<the chapter's check cell>", "exec"), scope)
    if not calls:
        raise AssertionError("the check cell called check() no time: nothing was checked")


def _resolve(dotted: str) -> tuple[Any, str, Any]:
    """(owner, attribute, value) for a dotted name such as ``torch.nn.functional.softmax``."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:-1]:
            owner = getattr(owner, attr)
        return owner, parts[-1], getattr(owner, parts[-1])
    raise ValueError(f"forbidding({dotted!r}): not a dotted name of an importable module's attribute")


@contextlib.contextmanager
def forbidding(fn: Callable[..., Any], *dotted: str) -> Iterator[None]:
    """While the block runs, calling any of the ``dotted`` functions raises ForbiddenCall.

    Four routes are closed: the attribute on its module or class (``torch.softmax``,
    ``torch.Tensor.softmax``, ``companion.attention.split_heads``); any global variable
    of ``fn``'s module that holds the same object under any name (``from
    companion.attention import split_heads as mine``); ``fn`` being that object itself
    (``to_heads = split_heads``), which raises ForbiddenCall on entry; and any other
    route to the same function (a default argument, a closure, ``functools.partial``),
    which a profiler sees running and reports when the block ends. A name without a dot
    names a function the notebook itself defines (``"unbroadcast"``). Not caught: another
    function that does the same work (``torch._softmax`` where only ``torch.softmax`` is
    named), and a copy of the package's source pasted into the notebook.
    """
    if not dotted:
        raise ValueError("forbidding(): name at least one function, such as 'torch.softmax'")
    patched: list[tuple[Any, str, Any]] = []
    swapped: list[tuple[dict, str, Any]] = []
    user_globals = getattr(fn, "__globals__", {})
    codes: dict[Any, str] = {}  # code objects of forbidden Python functions -> their names
    builtins: dict[int, str] = {}  # ids of forbidden C functions -> their names
    reached: list[str] = []

    def watch(frame: Any, event: str, arg: Any) -> None:
        # The third route: a forbidden function reached by a name no patch can see (a
        # default argument, a closure, functools.partial): its code still runs.
        if event == "call" and frame.f_code in codes:
            reached.append(codes[frame.f_code])
        elif event == "c_call" and id(arg) in builtins:
            reached.append(builtins[id(arg)])

    previous_profile = sys.getprofile()
    try:
        for name in dotted:
            if "." in name:
                owner, attr, original = _resolve(name)
            elif name in user_globals:
                owner, attr, original = None, name, user_globals[name]
            else:
                continue  # the notebook does not define it: nothing to forbid
            if fn is original or getattr(fn, "func", None) is original:
                raise ForbiddenCall(f"{getattr(fn, '__name__', 'your function')} is {name} itself: "
                                    "this exercise asks for your own code")
            code = getattr(getattr(original, "__func__", original), "__code__", None)
            if code is not None:
                codes[code] = name
            else:
                builtins[id(original)] = name

            def tripwire(*args: Any, _name: str = name, **kwargs: Any) -> Any:
                raise ForbiddenCall(f"{getattr(fn, '__name__', 'your function')} calls {_name}: "
                                    "this exercise asks for your own code")

            if owner is not None:
                setattr(owner, attr, tripwire)
                patched.append((owner, attr, original))
            for key, value in list(user_globals.items()):
                if value is original:
                    swapped.append((user_globals, key, value))
                    user_globals[key] = tripwire
        sys.setprofile(watch)
        yield
    finally:
        sys.setprofile(previous_profile)
        for scope, key, value in reversed(swapped):
            scope[key] = value
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)
    if reached:
        raise ForbiddenCall(f"{getattr(fn, '__name__', 'your function')} runs {reached[0]}: "
                            "this exercise asks for your own code")


@contextlib.contextmanager
def time_limit(seconds: float, what: str = "this test") -> Iterator[None]:
    """Raise TimeLimitExceeded in the block once it has run ``seconds`` of wall time.

    Uses SIGALRM, so it works in the main thread of a POSIX process (where a kernel
    runs cells) and interrupts Python code; a single long call into a C library is
    interrupted when it returns. Elsewhere it runs the block without a limit.
    """
    if seconds <= 0:
        raise ValueError(f"time_limit(seconds={seconds!r}): the limit must be positive")
    usable = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeLimitExceeded(f"{what} ran past its time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # then every second until the block ends
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _fail_with(message: str) -> None:
    """Raise AssertionError two calls deep: otter reads the line of a failure two frames down."""

    def fail() -> None:
        raise AssertionError(message)

    fail()


_OTTER_CELL_MARKS = ("Checker.check_if_not_already_checked", "init_grading_mode")


def install_time_limits(cell_seconds: float, test_seconds: float | None = None) -> None:
    """In a grading kernel: limit every submitted cell to ``cell_seconds``, every test to ``test_seconds``.

    A cell of the submission that runs too long raises TimeLimitExceeded (the kernel
    records the error and goes on to the next cell). Otter's own cells, and the
    student's ``grader.check(...)`` cells, are not limited as a whole; instead each test
    case they run gets ``test_seconds`` (``cell_seconds`` if not given), so an endless
    function fails the tests that call it, each with the reason, and no other.
    """
    test_seconds = cell_seconds if test_seconds is None else test_seconds
    if cell_seconds <= 0 or test_seconds <= 0:
        raise ValueError(f"install_time_limits({cell_seconds!r}, {test_seconds!r}): limits must be positive")
    from IPython import get_ipython
    from otter.test_files import exception_test

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("install_time_limits runs inside an IPython kernel")

    def expire(signum: int, frame: Any) -> None:
        raise TimeLimitExceeded(f"the cell ran past its time limit of {cell_seconds:g} s")

    def before(info: Any) -> None:
        source = info.raw_cell or ""
        if any(mark in source for mark in _OTTER_CELL_MARKS) or re.search(r"\.check\(\"", source):
            return
        signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, cell_seconds, 5.0)

    def after(result: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    shell.events.register("pre_run_cell", before)
    shell.events.register("post_run_cell", after)

    call_func = exception_test.test_case.call_func
    if getattr(call_func, "_limited", False):
        return

    def limited_call(self: Any, global_environment: dict[str, Any]) -> None:
        try:
            with time_limit(test_seconds, "the test"):
                call_func(self, global_environment)
        except TimeLimitExceeded as err:  # otter records an Exception as this test's failure
            _fail_with(str(err))

    limited_call._limited = True  # type: ignore[attr-defined]
    exception_test.test_case.call_func = limited_call
