"""Evaluation: benchmarks, grading, the eval loop and its report (see docs/EVAL.md).

`grade` is the grading function, as the README writes it:

    from parathinker.eval import grade
    grade("\\frac{1}{2}", "so the answer is $\\boxed{0.5}$")   # True

The module of the same name stays importable (`from parathinker.eval.grade import majority_vote`);
only the package attribute `parathinker.eval.grade` is the function.
"""

from parathinker.eval.grade import grade

__all__ = ["grade"]
