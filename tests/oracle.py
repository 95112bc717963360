"""A deliberately naive implementation of SPEC §4-5 for greedy decoding: no KV cache at all.

Every token choice re-runs the whole visible context from scratch, with the visibility written
out token by token. It shares nothing with the package but the model's forward and the tokenizer's
control-token ids, so the generator and the engine are checked against an independent reading
of the SPEC.
"""

import torch

from parathinker.attention.dense import DenseAttention


def _forward_last(model, ids, positions, segments, visible):
    """Logits of the last token; visible[i][j] says whether token i sees token j."""
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    mask = torch.tensor([visible], dtype=torch.bool)
    with torch.no_grad():
        hidden = model(t(ids), t(positions), t(segments), DenseAttention(mask))
    return model.compute_logits(hidden[0, -1])


def oracle_generate(model, ctrl, prompt, template, num_paths, max_path_tokens, min_path_tokens,
                    max_summary_tokens, min_finished_paths):
    lp = len(prompt)
    opens, closes = list(ctrl.think_open), list(ctrl.think_close)
    base_open = [] if ctrl.base_think_open is None else [ctrl.base_think_open]
    base_close = [] if ctrl.base_think_close is None else [ctrl.base_think_close]
    pad = [] if ctrl.pad is None else [ctrl.pad]
    path_never = opens + base_open + [ctrl.summary_open, ctrl.summary_close] + pad
    path_enders = closes + base_close + [ctrl.eos]
    summary_never = opens + closes + base_open + base_close + [ctrl.summary_open] + pad

    paths = [[opens[k]] for k in range(num_paths)]
    reasons = [None] * num_paths
    while None in reasons:
        step = {}
        for k in range(num_paths):
            if reasons[k] is not None:
                continue
            n = len(paths[k])
            if n == max_path_tokens - 1:
                step[k] = (closes[k], "budget")
                continue
            ids = prompt + paths[k]
            positions = list(range(lp + n))  # the path continues right after the prompt
            segments = [0] * lp + [k + 1] * n
            visible = [[j <= i for j in range(len(ids))] for i in range(len(ids))]
            logits = _forward_last(model, ids, positions, segments, visible)
            banned = path_never + (path_enders if n + 1 < min_path_tokens else [])
            logits[banned] = float("-inf")
            choice = int(logits.argmax())
            step[k] = (closes[k], "end") if choice in path_enders else (choice, None)
        for k, (token, reason) in step.items():
            paths[k].append(token)
            reasons[k] = reason
        if sum(r is not None for r in reasons) >= min_finished_paths:
            for k in range(num_paths):
                if reasons[k] is None:
                    paths[k].append(closes[k])
                    reasons[k] = "cut"

    longest = max(len(p) for p in paths)
    summary, summary_reason = list(template), "budget"
    while len(summary) < max_summary_tokens:
        ids, positions, segments, owner = list(prompt), list(range(lp)), [0] * lp, ["prompt"] * lp
        for k, p in enumerate(paths):
            ids += p
            positions += list(range(lp, lp + len(p)))
            segments += [k + 1] * len(p)
            owner += [k] * len(p)
        ids += summary
        positions += list(range(lp + longest, lp + longest + len(summary)))
        segments += [0] * len(summary)
        owner += ["summary"] * len(summary)
        visible = [[j <= i and (owner[j] == "prompt" or owner[j] == owner[i] or owner[i] == "summary")
                    for j in range(len(ids))] for i in range(len(ids))]
        logits = _forward_last(model, ids, positions, segments, visible)
        logits[summary_never] = float("-inf")
        choice = int(logits.argmax())
        summary.append(choice)
        if choice in (ctrl.summary_close, ctrl.eos):
            summary_reason = "end"
            break
    return paths, reasons, summary, summary_reason
