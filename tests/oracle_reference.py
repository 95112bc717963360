"""A deliberately naive reading of the reference engine's own layout (SPEC §6; REFERENCE §4.2,
§5.2-§5.4) for greedy decoding: no KV cache, every token choice re-runs the whole visible context
with a dense mask written out token by token.

It follows the released fork's code paths as REFERENCE describes them, not this package's:
the prompt is padded by the example's `prompts_preprocess` (encode, pad until len + 1 is a
multiple of 16, decode to text) and re-encoded by the tokenizer; control ids are looked up by the
example's names with the fork's `+1` pairing (`</think k>` = `<think k>` + 1, `</summary>` =
`<summary>` + 1); each step runs the stop checker on every path, then (if thinking goes on)
appends one rewritten sample per unfinished path; the summary sits at `2·Lp + L`, gets its
template one token per step and stops at a stop id or 128 tokens. Only the model's forward and
the tokenizer are shared with the package.
"""

import torch

from tests.oracle import _forward_last

BLOCK = 16
SUMMARY_MAX_TOKENS = 128


def reference_prompt(tokenizer, prompt_text):
    """The example's prompts_preprocess, then vLLM's own encode of the padded text."""
    pad_id = tokenizer.convert_tokens_to_ids("<vllm_pad>")
    tokens = tokenizer.encode(prompt_text)
    length = len(tokens) + 1
    if length % BLOCK != 0:
        tokens = tokens + [pad_id] * (BLOCK - length % BLOCK)
    return tokenizer.encode(tokenizer.decode(tokens))


def oracle_reference_generate(model, tokenizer, prompt_text, summary_template, num_paths,
                              max_tokens, summary_max_tokens=SUMMARY_MAX_TOKENS,
                              summary_offset=None):
    """-> (padded prompt, path token lists, path finish reasons, summary tokens, summary reason).

    `summary_offset` overrides where the summary starts (for checking that the test notices)."""
    vocab = tokenizer.get_vocab()
    cot = [vocab[f"<think{i}>"] for i in range(1, 9)]
    think = vocab["<think>"]
    summary_ids = tokenizer.encode(summary_template, add_special_tokens=False)
    first_summary = summary_ids[0]
    stops = {vocab[n] for n in ["</think>"] + [f"</think{i}>" for i in range(1, 9)] + ["</summary>"]}
    pad = vocab["<vllm_pad>"]

    prompt = reference_prompt(tokenizer, prompt_text)
    lp = len(prompt)
    outs = [[cot[i]] for i in range(num_paths)]
    status = [None] * num_paths  # "stopped" | "length"
    padding = [False] * num_paths

    def path_logits(i):
        ids = prompt + outs[i]
        n = len(ids)
        visible = [[j <= q for j in range(n)] for q in range(n)]
        return _forward_last(model, ids, list(range(n)), [0] * lp + [i + 1] * len(outs[i]), visible)

    while True:
        running = [i for i in range(num_paths) if status[i] is None]
        for i in running:  # pass 1: the stop checker
            last, n = outs[i][-1], len(outs[i])
            if last in stops:
                if n % BLOCK == 0:
                    status[i] = "stopped"
                else:
                    padding[i] = True
                continue
            if padding[i] and n % BLOCK == 0:
                status[i] = "stopped"
            if status[i] is None and n == max_tokens:
                status[i] = "length"
        if sum(s is not None for s in status) >= num_paths * 0.1:
            break
        for i in running:  # pass 2: append one token per unfinished path
            if status[i] is not None:
                continue
            if padding[i]:  # the sample is replaced: no need to compute it
                outs[i].append(pad)
                continue
            t = int(path_logits(i).argmax())
            if t in cot or t == first_summary:
                t = think
            if t in stops:
                t = outs[i][0] + 1
            outs[i].append(t)

    lens = {len(o) for o in outs}
    assert len(lens) == 1, f"lock-step paths must have one length, got {lens}"
    (path_len,) = lens
    reasons = []
    for i, o in enumerate(outs):
        if o[0] + 1 in o:
            reasons.append("end")
        else:
            reasons.append("budget" if status[i] == "length" else "cut")

    start = 2 * lp + path_len if summary_offset is None else summary_offset

    def summary_logits(summary):
        """The merged sequence: prompt, path 1..P (each L tokens), summary at `start`."""
        ids = prompt + [t for o in outs for t in o] + summary
        positions = list(range(lp))
        segments = [0] * lp
        owner = [0] * lp  # 0 prompt, i + 1 path i, -1 summary
        for i in range(num_paths):
            positions += list(range(lp, lp + path_len))
            segments += [i + 1] * path_len
            owner += [i + 1] * path_len
        positions += [start + j for j in range(len(summary))]
        segments += [0] * len(summary)
        owner += [-1] * len(summary)
        own = torch.tensor(owner)
        n = len(ids)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        allowed = (own[None, :] == 0) | (own[None, :] == own[:, None]) | (own[:, None] == -1)
        return _forward_last(model, ids, positions, segments, (causal & allowed).tolist())

    summary = [first_summary]
    while True:
        offset = len(summary)
        if offset < len(summary_ids):  # forced: no sample is used
            token = summary_ids[offset]
        else:
            token = int(summary_logits(summary).argmax())
        summary.append(token)
        if token in stops:
            summary[-1] = first_summary + 1
            summary_reason = "end"
            break
        if len(summary) == summary_max_tokens:
            summary_reason = "budget"
            break
    return prompt, outs, reasons, summary, summary_reason
