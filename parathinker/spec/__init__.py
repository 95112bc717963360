"""The ParaThinker protocol (../shared/SPEC.md) as pure, torch-free functions of ints and strings.

    tokens            control tokens looked up by name (§2), prompt and summary templates (§3)
    layout            positions, segment ids and visibility of one request (§4)
    rules             the control-token rules of generation (§5)
    reference_layout  the released vLLM fork's own layout (§6)
    budgets           what fits a model's context: one statement of the budget rule
    answers           when two final answers are the same string (grading, stop_on_agreement)
"""
