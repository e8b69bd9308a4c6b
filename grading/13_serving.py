"""Hidden tests for chapter 13's exercises."""

from companion.grading import hidden


@hidden("slot_of")
def test_slot_of_long_tables_and_large_blocks(slot_of):
    import torch
    from companion.generation.engine import block_slots
    from companion.grading import expect_same
    table = torch.tensor([13, 0, 7, 2, 11])
    positions = torch.tensor([79, 0, 16, 15, 33, 64, 47])  # last of the last block, first of each, boundaries
    expect_same(slot_of(table, positions, 16), block_slots(table, positions, 16),
                "a table of 5 blocks of 16, positions at block boundaries in any order")
    expect_same(slot_of(table, torch.tensor([4, 3, 2, 1, 0]), 1), torch.tensor([11, 2, 7, 0, 13]),
                "blocks of one position: the slot is the block number itself")


@hidden("slot_of")
def test_slot_of_uses_its_arguments(slot_of):
    import torch
    from companion.generation.engine import block_slots
    from companion.grading import expect_same
    for block_size in (2, 5, 32):
        table = torch.randperm(9, generator=torch.Generator().manual_seed(block_size))
        positions = torch.arange(9 * block_size)
        expect_same(slot_of(table, positions, block_size), block_slots(table, positions, block_size),
                    f"every position of a 9-block table, block_size={block_size}")


@hidden("residual")
def test_residual_matches_the_package_on_random_distributions(residual):
    import torch
    from companion.grading import expect_same
    from companion.generation.speculative import residual_distribution
    gen = torch.Generator().manual_seed(21)
    for V in (2, 7, 50):
        p, q = torch.softmax(torch.randn(2, 4, V, generator=gen) * 3, dim=-1)
        expect_same(residual(p, q), residual_distribution(p, q), f"(4, {V}) rows of peaked distributions")
    p = torch.tensor([0.2, 0.3, 0.5])
    expect_same(residual(p, p.clone()), p, "p == q: no residual mass, so p itself")


@hidden("residual")
def test_residual_rows_are_independent(residual):
    import torch
    from companion.grading import expect_same
    p = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    got = residual(p, q)
    expect_same(got[0], p[0], "row 0: p == q, so the row is p")
    expect_same(got[1], torch.tensor([0.0, 0.0, 1.0]), "row 1: only token 2 has p > q")
    expect_same(got[2], torch.tensor([1.0, 0.0, 0.0]), "row 2: one-hot p, disagreeing one-hot q")


@hidden("pad_left")
def test_pad_left_many_lengths(pad_left):
    import torch
    from companion.generation.batching import left_pad_batch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(31)
    prompts = [torch.randint(0, 500, (int(n),), generator=gen).tolist() for n in torch.randint(1, 20, (9,), generator=gen)]
    ids, pad = pad_left(prompts, 7)
    want_ids, want_pad = left_pad_batch(prompts, pad_token_id=7)
    expect_same(ids, want_ids, "9 prompts of 1 to 19 tokens, pad_id=7: the ids")
    expect_same(pad, want_pad, "9 prompts of 1 to 19 tokens, pad_id=7: left_pad")


@hidden("pad_left")
def test_pad_left_accepts_tuples_and_keeps_order(pad_left):
    import torch
    from companion.grading import expect_same
    ids, pad = pad_left([(3, 4), (5,), (6, 7, 8)], 1)
    expect_same(ids, torch.tensor([[1, 3, 4], [1, 1, 5], [6, 7, 8]]), "prompts given as tuples, pad_id=1")
    expect_same(pad, torch.tensor([1, 2, 0]), "left_pad of prompts given as tuples")
