"""Worked steps from a program: a program-aided answer's arithmetic, written out as a rationale.

A small model's programs are often right where its prose is not (BIG-Bench-Hard's
``multistep_arithmetic_two``: the 0.5B's ``best_of_n`` with programs 80%, its greedy prose 6%),
so no rationale the model wrote can teach it the computation. ``traced`` rewrites a program so that
each top-level ``name = expression`` prints its working: the expression, the same with the
values of the names it uses, then one arithmetic operation at a time, leftmost innermost first,
down to the value (``answer = (4 + 7 * 4) - -5`` gives ``= (4 + 28) - -5``, ``= 32 - -5``, ``=
37``). ``worked_out`` runs that in the sandbox; ``steps`` reads the working and the answer the
program printed last back out of its output. The lines are the program's own values, so the
working is right whenever the program is (README, "Trace rationales").
"""

from __future__ import annotations

import ast
import asyncio

from strategies.answers import extract
from strategies.sandbox import SandboxLimits, extract_code, run_python

MARK = "\x02"  # marks a working line apart from the program's own prints (not whitespace)

# Defined at the top of a traced program (it runs in the sandbox with the program): prints one
# assignment's steps. Names holding numbers are replaced by their values, then the innermost
# arithmetic operation on two numbers is worked out, one at a time, leftmost first, until the
# value is left or something other than arithmetic (a call, a name) stops the reduction.
HELPER = """
def __sharpen_step__(name, src, env):
    import ast as _ast
    def show(node):
        return _ast.unparse(node)
    class Fill(_ast.NodeTransformer):
        def visit_Name(self, node):
            v = env.get(node.id)
            return _ast.Constant(v) if type(v) in (int, float) and node.id != name else node
        def visit_UnaryOp(self, node):
            self.generic_visit(node)
            if isinstance(node.op, _ast.USub) and isinstance(node.operand, _ast.Constant) \\
                    and type(node.operand.value) in (int, float):
                return _ast.Constant(-node.operand.value)
            return node
    def first_op(node):
        for child in _ast.iter_child_nodes(node):
            found = first_op(child)
            if found is not None:
                return found
        if isinstance(node, _ast.BinOp) and all(isinstance(x, _ast.Constant) and type(x.value) in (int, float)
                                                 for x in (node.left, node.right)):
            return node
        return None
    class Swap(_ast.NodeTransformer):
        def __init__(self, target, value):
            self.target, self.value = target, value
        def visit(self, node):
            return _ast.Constant(self.value) if node is self.target else self.generic_visit(node)
    lines = [name + " = " + src]
    tree = _ast.parse(src, mode="eval")
    tree = Fill().visit(tree)
    if show(tree) != src:
        lines.append("= " + show(tree))
    for _ in range(50):
        op = first_op(tree)
        if op is None:
            break
        try:
            value = eval(show(op))
        except Exception:
            break
        tree = Swap(op, value).visit(tree)
        lines.append("= " + show(tree))
    final = repr(env.get(name))
    if show(tree) != final:
        lines.append("= " + final)
    for line in lines:
        print(__sharpen_mark__ + line)
"""


def traced(code: str) -> str | None:
    """``code`` with its top-level ``name = expression`` assignments traced: after each, its
    steps are printed (``HELPER``), each line marked with ``MARK``. None if it does not parse or
    assigns nothing at top level."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    body: list[ast.stmt] = []
    for stmt in tree.body:
        body.append(stmt)
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            call = f"__sharpen_step__({stmt.targets[0].id!r}, {ast.unparse(stmt.value)!r}, globals())"
            body.append(ast.parse(call).body[0])
    if len(body) == len(tree.body):
        return None
    tree.body = body
    return f"__sharpen_mark__ = {MARK!r}\n{HELPER}\n{ast.unparse(tree)}\n"


def steps(stdout: str, max_lines: int = 40) -> tuple[str | None, str | None]:
    """The traced steps ending with ``The answer is X.``, and X: what the program printed last.
    The steps are None when fewer than two of their lines work something out (``= ...``), or
    there are more than ``max_lines`` (a loop); the answer still votes."""
    lines = [ln.rstrip() for ln in stdout.strip().splitlines() if ln.strip()]
    working = [ln[1:] for ln in lines if ln.startswith(MARK)]
    printed = [ln for ln in lines if not ln.startswith(MARK)]
    answer = extract(printed[-1]) if printed else None
    if answer is None or sum(ln.startswith("= ") for ln in working) < 2 or len(working) > max_lines:
        return None, answer
    return "\n".join([*working, f"The answer is {answer}."]), answer


async def worked_out(reply: str, *, wall_s: float = 5.0, cpu_s: int = 3) -> tuple[str | None, str | None]:
    """The working (``steps``) of the reply's Python block, traced and run in the sandbox, and the
    answer it printed; (None, None) when there is no block or it fails. Never raises for the
    code's or the sandbox's faults (cancellation still propagates)."""
    code = extract_code(reply)
    if code is None:
        return None, None
    try:
        res = await run_python(traced(code) or code, SandboxLimits(wall_s=wall_s, cpu_s=cpu_s))
    except asyncio.CancelledError:
        raise
    except Exception:  # the sandbox itself failed: no working, as a program that did not run
        return None, None
    if res.timed_out or not res.ok:
        return None, None
    return steps(res.stdout)
