"""Exact per-pair gradient norms ||grad_theta L_i|| during the ghost backward ("ghost norms").

Cosine impact scores divide each pair's score by its gradient norm. A pair's gradient is the sum of its chosen
and rejected rows' gradients, so its norm needs every cross term between the two rows' tokens: the entries
of one pair are gathered into one segment (:func:`pair_segments`) and each parameter kind adds its exact
squared norm per pair, never forming a per-pair gradient of a large layer:

* linear ``W`` (and each expert of a fused expert tensor): sum_{t,t'} (a_t.a_t')(d_t.d_t'), the fused
  ``ghost_norm`` kernel, or the pair's gradient itself where that is cheaper;
* a vector parameter (a bias, a norm's weight): the pair's gradient is a vector, formed and squared;
* embedding rows: equal token ids share a row, so the pair's rows are summed per id before squaring;
* the LM head, tile by tile over the vocabulary (its Gram of output gradients summed over tiles);
* a tied embedding and LM head: one parameter with two uses, whose cross term
  2 sum_t d^emb_t . g_head[x_t] is taken from the head's output gradients at the pair's token ids.

Any other parameter used twice in one forward is refused (its cross terms are not implemented); the generic
fallback forms the (small) per-pair gradient of its module's own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trace_ds.io import TraceError


def pair_segments(
    row_of_entry: torch.Tensor, pair_of_row: torch.Tensor, n_pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries (sorted by row) regrouped by pair: (permutation into pair order, (n_pairs + 1,) offsets).
    A stable sort keeps each pair's chosen entries before its rejected ones."""
    pair_of_entry = pair_of_row.index_select(0, row_of_entry)
    order = torch.sort(pair_of_entry, stable=True).indices
    counts = torch.bincount(pair_of_entry, minlength=n_pairs)
    return order, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


@dataclass
class PairNorms:
    """Squared gradient norms of the pairs of one ghost backward, accumulated per parameter use."""

    pair_of_row: torch.Tensor  # (rows,) the pair each row belongs to (row r of 2n rows -> r mod n)
    n_pairs: int
    kernel: str = "torch"
    tied: set[int] = field(default_factory=set)  # ids of parameters the embedding and the head share
    squared: torch.Tensor = field(init=False)
    # a tied head's backward leaves, per real token t of the batch (row order), its pair's head gradient at row
    # x_t (sum_s d_s[x_t] h_s over the pair's head entries s), for the embedding's cross term: (T, d) fp32
    tied_head: dict[int, torch.Tensor] = field(default_factory=dict)
    input_ids: torch.Tensor | None = None  # (T,) the batch's real tokens' ids, row order (for a tied head)
    token_rows: torch.Tensor | None = None  # (T,) the row of each real token

    def __post_init__(self) -> None:
        self.squared = torch.zeros(self.n_pairs, dtype=torch.float64, device=self.pair_of_row.device)

    def _add(self, per_pair: torch.Tensor) -> None:
        self.squared += per_pair.double()

    def add_matrix(self, a: torch.Tensor, d: torch.Tensor, row_of_entry: torch.Tensor) -> None:
        """A linear use: entries (a_t, d_t) of rows ``row_of_entry`` (sorted by row), weight gradient
        sum_t d_t a_t^T per pair."""
        from trace_ds.kernels.ghost_norm import ghost_norm

        if a.shape[0] == 0:
            return
        order, offsets = pair_segments(row_of_entry, self.pair_of_row, self.n_pairs)
        self._add(
            ghost_norm(a.index_select(0, order), d.index_select(0, order), offsets, backend=self.kernel)
        )

    def add_vector(self, per_entry: torch.Tensor, row_of_entry: torch.Tensor) -> None:
        """A vector parameter's per-entry gradient contributions (entries, numel), summed per pair, squared."""
        sums = torch.zeros(self.n_pairs, per_entry.shape[-1], dtype=torch.float64, device=per_entry.device)
        sums.index_add_(0, self.pair_of_row.index_select(0, row_of_entry), per_entry.double())
        self._add(sums.square().sum(-1))

    def add_embedding(
        self, ids: torch.Tensor, d: torch.Tensor, row_of_entry: torch.Tensor, weight: torch.Tensor, vocab: int
    ) -> None:
        """An embedding use: entry t adds d_t to row ids[t] (padding already zeroed in ``d``); equal ids of one
        pair share a row. With a tied head, the cross term with the head's use is added too."""
        pair = self.pair_of_row.index_select(0, row_of_entry)
        keys, inverse = torch.unique(pair * vocab + ids, return_inverse=True)
        rows = torch.zeros(keys.shape[0], d.shape[-1], dtype=torch.float64, device=d.device)
        rows.index_add_(0, inverse, d.double())
        own = torch.zeros(self.n_pairs, dtype=torch.float64, device=d.device)
        own.index_add_(0, keys // vocab, rows.square().sum(-1))
        self._add(own)
        tied = self.tied_head.pop(id(weight), None)
        if id(weight) in self.tied:
            if tied is None:
                raise TraceError(
                    "ghost norms: the embedding shares its weight with the LM head, but the head's backward left "
                    "no cross term (the head ran outside the ghost paths?)"
                )
            cross = (tied.double() * d.double()).sum(-1)
            both = torch.zeros(self.n_pairs, dtype=torch.float64, device=d.device)
            self._add(both.index_add_(0, pair, 2.0 * cross))

    def add_linear(
        self, weight: torch.Tensor, a: torch.Tensor, d: torch.Tensor, row_of_entry: torch.Tensor
    ) -> None:
        """A plain linear layer's weight; a head that shares its weight with the embedding (the full-logits
        path) goes through :class:`HeadNorm`, which also leaves the cross term for the embedding."""
        if id(weight) in self.tied:
            head = HeadNorm(self, weight, a, row_of_entry)
            head.add_tile(d, 0)
            head.finish()
        else:
            self.add_matrix(a, d, row_of_entry)

    @staticmethod
    def rows_of(offsets: torch.Tensor) -> torch.Tensor:
        """The row of each entry, from (rows + 1,) cumulated entries per row."""
        return torch.repeat_interleave(
            torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff()
        )

    def head(self, weight: torch.Tensor, hidden: torch.Tensor, offsets: torch.Tensor) -> HeadNorm:
        """The LM head's norm over its vocabulary tiles; ``offsets`` (rows + 1) delimit each row's entries."""
        return HeadNorm(self, weight, hidden, self.rows_of(offsets))

    def tied_rows(
        self,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        d_tile: torch.Tensor,
        row_of_entry: torch.Tensor,
        start: int,
    ) -> None:
        """For a head tied to the embedding: the rows of each pair's head gradient at the pair's own token ids
        that fall in the tile [start, start + tile), kept for the embedding's backward (cross term)."""
        if self.input_ids is None or self.token_rows is None:
            raise TraceError("ghost norms: a tied LM head ran before the embedding recorded the batch's ids")
        tied = self.tied_head.setdefault(
            id(weight),
            torch.zeros(self.input_ids.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device),
        )
        local = self.input_ids - start
        inside = (local >= 0) & (local < d_tile.shape[-1])
        token_pair = self.pair_of_row.index_select(0, self.token_rows)
        entry_pair = self.pair_of_row.index_select(0, row_of_entry)
        for p in range(self.n_pairs):  # per pair: its head entries x its tokens whose id is in this tile
            tokens = torch.nonzero(inside & (token_pair == p)).squeeze(-1)
            entries = torch.nonzero(entry_pair == p).squeeze(-1)
            if tokens.numel() == 0 or entries.numel() == 0:
                continue
            q = d_tile.index_select(0, entries).float().index_select(1, local.index_select(0, tokens))
            tied.index_add_(0, tokens, q.t().matmul(hidden.index_select(0, entries).float()))


@dataclass
class HeadNorm:
    """The LM head's own squared norm per pair, over vocabulary tiles: sum_{s,s'} (h_s.h_s') (d_s.d_s') with
    d.d summed tile by tile (the Gram form), or the pair's tile gradient squared, whichever is cheaper."""

    norms: PairNorms
    weight: torch.Tensor
    hidden: torch.Tensor  # (entries, d) the head's inputs, entries sorted by row
    row_of_entry: torch.Tensor
    order: torch.Tensor = field(init=False)
    offset_tensor: torch.Tensor = field(init=False)
    by_pair: torch.Tensor = field(init=False)
    offsets: list[int] = field(init=False)
    gram: list[torch.Tensor] = field(default_factory=list)
    materialize: bool | None = None

    def __post_init__(self) -> None:
        self.order, self.offset_tensor = pair_segments(
            self.row_of_entry, self.norms.pair_of_row, self.norms.n_pairs
        )
        self.offsets = self.offset_tensor.tolist()
        self.by_pair = self.hidden.index_select(0, self.order).float()

    def _segments(self) -> list[tuple[int, int]]:
        return list(zip(self.offsets[:-1], self.offsets[1:], strict=True))

    def add_tile(self, d_tile: torch.Tensor, start: int) -> None:
        """The tile of output gradients for vocabulary rows [start, start + width), entries sorted by row."""
        from trace_ds.kernels.ghost_norm import ghost_norm_torch, materialize_is_cheaper

        if id(self.weight) in self.norms.tied:
            self.norms.tied_rows(self.weight, self.hidden, d_tile, self.row_of_entry, start)
        d = d_tile.index_select(0, self.order).float()
        if self.materialize is None:
            longest = max((b - a for a, b in self._segments()), default=0)
            self.materialize = materialize_is_cheaper(longest, self.by_pair.shape[1], d.shape[1])
        if self.materialize:  # the tile's rows of each pair's gradient, squared: exact per tile
            self.norms._add(ghost_norm_torch(self.by_pair, d, self.offset_tensor, materialize=True))
            return
        grams = [d[a:b].matmul(d[a:b].t()) for a, b in self._segments()]
        self.gram = grams if not self.gram else [g + h for g, h in zip(self.gram, grams, strict=True)]

    def finish(self) -> None:
        if self.materialize or not self.gram:
            return
        per_pair = [
            (self.by_pair[a:b].matmul(self.by_pair[a:b].t()) * g).sum() if b > a else g.new_zeros(())
            for (a, b), g in zip(self._segments(), self.gram, strict=True)
        ]
        self.norms._add(torch.stack(per_pair))
