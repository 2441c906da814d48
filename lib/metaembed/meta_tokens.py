"""Meta Tokens (§3.2): learnable vectors behind real placeholder token ids.

``R_q`` query tokens ``<meta_q_i>`` and ``R_c`` candidate tokens ``<meta_c_j>``
are added to the tokenizer as special tokens and appended to every input as
ordinary ids.  :class:`MetaTokenEmbedding` wraps the backbone's input
embedding: ids in the Meta Token range get the learnable rows ``M_q`` / ``M_c``,
every other id goes through the original table.  Nothing depends on where
padding goes, position ids and attention masks treat Meta Tokens like any
other token, and ``input_ids`` stay available for models that need them
(Qwen's mrope, PaliGemma's and Mllama's placeholder masks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def meta_token_names(R_q: int, R_c: int) -> tuple[list[str], list[str]]:
    """Token strings of the query and candidate Meta Tokens."""
    return [f"<meta_q_{i}>" for i in range(R_q)], [f"<meta_c_{j}>" for j in range(R_c)]


#: ``M_q`` / ``M_c`` are drawn from ``torch.Generator().manual_seed(META_INIT_SEED + seed)``; seed 0
#: keeps the draw of the releases before the seed was honoured (``model.seed`` used to be ignored here)
META_INIT_SEED = 1234


class MetaTokenEmbedding(nn.Module):
    """Input embedding whose Meta Token rows are the learnable ``M_q`` (first ``R_q``) and ``M_c``.

    ``first_id`` is the id of ``<meta_q_0>``; the ``R_q + R_c`` Meta Token ids are contiguous
    and may lie beyond the base table (they never index it).  ``init_std`` (default: the std of
    the base table's rows) scales the N(0, 1) draw, which ``seed`` (``model.seed``) fixes.
    """

    def __init__(self, base: nn.Module, first_id: int, R_q: int, R_c: int, init_std: float | None = None,
                 seed: int = 0):
        super().__init__()
        self.base = base
        self.first_id, self.R_q, self.R_c = int(first_id), int(R_q), int(R_c)
        dim, device = base.weight.shape[1], base.weight.device
        if init_std is None and device.type == "meta":  # shapes only: nothing to measure
            init_std = 1.0
        if init_std is None:  # match the scale of real token embeddings (Gemma scales its table)
            with torch.no_grad():
                n = min(base.weight.shape[0], 4096)
                sample = base(torch.arange(n, device=base.weight.device))
                init_std = float(sample.float().std())
        # drawn on the CPU (the same values on every device), then placed beside the table; kept in fp32
        g = torch.Generator().manual_seed(META_INIT_SEED + int(seed))
        self.M_q = nn.Parameter((torch.randn(R_q, dim, generator=g) * init_std).to(device))  # [R_q, D]
        self.M_c = nn.Parameter((torch.randn(R_c, dim, generator=g) * init_std).to(device))  # [R_c, D]

    @property
    def weight(self) -> Tensor:  # some transformers/peft code inspects the embedding table
        return self.base.weight

    @property
    def num_meta(self) -> int:
        return self.R_q + self.R_c

    def is_meta(self, input_ids: Tensor) -> Tensor:
        """Boolean mask of the Meta Token positions in ``input_ids``. # [B, L]"""
        return (input_ids >= self.first_id) & (input_ids < self.first_id + self.num_meta)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Input embeddings: the base table's rows, with the learnable M_q / M_c rows at Meta Token ids."""
        is_meta = self.is_meta(input_ids)  # [B, L]
        out = self.base(input_ids.masked_fill(is_meta, 0))  # [B, L, D]
        if not bool(is_meta.any()):
            return out
        table = torch.cat([self.M_q, self.M_c], 0).to(out.dtype)  # [R_q + R_c, D]
        idx = (input_ids - self.first_id).clamp(0, self.num_meta - 1)  # [B, L]
        # F.embedding, not table[idx]: the backward of advanced indexing (index_put_ with
        # accumulate) sums the B rows' gradients in a thread-dependent order on CPU
        meta = F.embedding(idx, table)  # [B, L, D]
        return torch.where(is_meta.unsqueeze(-1), meta, out)
