"""n samples of one prompt in one request: `Engine.add_request(..., n=4)`.

Each member is a whole ParaThinker request (`Request` or `ReferenceRequest`: its own P paths,
summary, seed and sampling counters), but all of them read one prompt sequence: its KV is
computed once and its blocks are forked by every member's paths, n x P readers in all. The
group is what the scheduler sees (admitted, preempted and freed as one); the engine masks,
samples and applies token by token per member, so member i draws exactly what a request of
its own with the same seed would. A member that ends gives its paths' and summary's blocks back
at once (`release_ended`, after each step and `Engine.stop_sample`) and waits, tokens kept, for
the others; the group holds, and recomputes after a preemption, only its running members.
"""

from __future__ import annotations

from typing import Any

from parathinker.engine.block_manager import BlockManager
from parathinker.engine.request import FINISHED, LogprobEntry, Request, SampleRow, Seq, SeqGroup


class SampleGroup(SeqGroup):
    def __init__(self, request_id: str, arrival: int, prompt_ids: list[int],
                 members: list[Request]) -> None:
        super().__init__(request_id, arrival, prompt_ids, members[0].ctrl)
        self.members = members
        self._released: list[Request] = []  # ended members whose blocks are given back
        for m in members:
            m.prompt = self.prompt  # one prompt sequence: every member's paths fork its blocks

    def live(self) -> list[Request]:
        return [m for m in self.members if m.status != FINISHED]

    def seqs(self) -> list[Seq]:
        return [self.prompt] + [s for m in self.members if m not in self._released for s in m.seqs()[1:]]

    def release_ended(self, bm: BlockManager) -> None:
        """Give back the blocks of every member that ended since the last call (its own paths
        and summary, and its references to the prompt): nothing reads them again."""
        for m in self.members:
            if m.status == FINISHED and m not in self._released:
                for seq in m.seqs()[1:]:
                    bm.free(seq.blocks)
                    bm.free(seq.forked)
                    seq.reset_cache()
                self._released.append(m)

    def readable(self, seq: Seq) -> list[Seq]:
        if seq is self.prompt:
            return []
        for m in self.members:
            if any(s is seq for s in m.seqs()):
                return m.readable(seq)
        raise ValueError("sequence not in this group")

    def logprob_owner(self, seq: Seq) -> Any:
        return next((o for m in self.members if (o := m.logprob_owner(seq)) is not None), None)

    def sample_rows(self) -> list[SampleRow]:
        return [r for m in self.live() for r in m.sample_rows()]

    def take(self, rows: list[SampleRow], tokens: list[int],
             entries: list[LogprobEntry | None]) -> None:
        """Each running member takes its own rows (or none, once the group is computed); the
        group is finished once every member has."""
        is_computed = self.is_computed()
        for m in self.live():
            mine = [i for i, r in enumerate(rows) if r.owner is m]
            if mine or is_computed:
                m.take([rows[i] for i in mine], [tokens[i] for i in mine],
                       [entries[i] for i in mine])
        if all(m.status == FINISHED for m in self.members):
            self.status = FINISHED


def members(req: SeqGroup) -> list[SeqGroup]:
    """The requests whose tokens are sampled: a group's members, else the request itself."""
    return list(req.members) if isinstance(req, SampleGroup) else [req]
