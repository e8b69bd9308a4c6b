"""Hidden tests for chapter 13's exercises."""

from companion.grading import hidden


@hidden("speculative_step")
def test_speculative_step_by_hand(speculative_step):
    import torch
    from companion.grading import expect_same
    p = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.3, 0.7, 0.0]])
    cases = [
        ((p, q, torch.tensor([0]), torch.tensor([0.99]), 0.5), (1, 2), "p/q = 2 at token 0: kept, then the bonus token 2"),
        ((p, q, torch.tensor([1]), torch.tensor([0.6]), 0.5), (0, 0),
         "p/q = 4/7 at token 1, u = 0.6: rejected; the residual [0.3, 0, 0] puts everything on token 0"),
        ((p, q, torch.tensor([1]), torch.tensor([0.5]), 0.5), (1, 2), "p/q = 4/7 at token 1, u = 0.5: kept"),
        ((p[1:], q[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0), 0.3), (0, 2),
         "k = 0: no proposals, one draw from p[0] = [0, 0, 1]"),
    ]
    for args, expected, case in cases:
        got = speculative_step(*args)
        expect_same(tuple(int(v) for v in got) if isinstance(got, (tuple, list)) else got, expected, case)


@hidden("speculative_step")
def test_speculative_step_stops_at_the_first_rejection(speculative_step):
    import torch
    from companion.grading import expect_same
    p = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.8, 0.1, 0.1], [0.2, 0.2, 0.6]])
    proposals = torch.tensor([0, 0, 2])  # ratios 1, 1/8, 1
    got = speculative_step(p, q, proposals, torch.tensor([0.9, 0.5, 0.0]), 0.0)
    expect_same(tuple(int(v) for v in got) if isinstance(got, (tuple, list)) else got, (1, 2),
                "ratios 1, 1/8, 1 and u = [0.9, 0.5, 0]: the second is rejected, the third is never looked at; "
                "the residual of row 1 is [0, 0, 0.7], so token 2")
    got = speculative_step(p, q, proposals, torch.tensor([0.999, 0.1, 0.999]), 0.25)
    expect_same(tuple(int(v) for v in got) if isinstance(got, (tuple, list)) else got, (3, 1),
                "ratios 1, 1/8, 1 and u = [0.999, 0.1, 0.999]: all kept (u < 1 passes a ratio of 1), bonus from [0, 1, 0]")


@hidden("speculative_step")
def test_speculative_step_never_draws_a_token_of_probability_zero(speculative_step):
    import torch
    from companion.grading import expect_same
    dist = torch.tensor([[0.0, 0.1, 0.2, 0.6999999, 0.0, 0.0]])  # sums to a little less than 1 in float32
    for r, expected, case in [(0.0, 1, "r = 0 with a first token of probability 0"),
                              (0.2, 2, "r = 0.2, inside token 2's interval"),
                              (0.99999995, 3, "r above the rounded total: the last token with a nonzero probability")]:
        got = speculative_step(dist, dist[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0), r)
        expect_same(tuple(int(v) for v in got) if isinstance(got, (tuple, list)) else got, (0, expected),
                    f"k = 0, p = {dist[0].tolist()}, {case}")
    p = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    got = speculative_step(p, q, torch.tensor([1]), torch.tensor([0.0]), 0.0)
    expect_same(tuple(int(v) for v in got) if isinstance(got, (tuple, list)) else got, (0, 3),
                "the target gives the proposal probability 0: always rejected, even with u = 0; "
                "the residual [0, 0, 0, 0.5] gives token 3")


@hidden("speculative_step")
def test_speculative_step_emits_the_target_distribution(speculative_step):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(112)
    p = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05])
    q = torch.tensor([0.10, 0.50, 0.05, 0.15, 0.20])
    counts = torch.zeros(5)
    draws = 8000
    for _ in range(draws):
        x = torch.multinomial(q, 1, generator=gen)
        u = torch.rand(1, generator=gen)
        r = float(torch.rand(1, generator=gen))
        n, token = speculative_step(torch.stack([p, p]), q[None], x, u, r)
        counts[int(x) if int(n) == 1 else int(token)] += 1
    frequencies = counts / draws
    expect_same(frequencies, p, f"{draws} seeded rounds with k = 1: the first token emitted follows p, not q "
                                f"(frequencies {[round(f, 3) for f in frequencies.tolist()]})", atol=0.025, rtol=0.0)


@hidden("speculative_step")
def test_speculative_step_own_code(speculative_step):
    import torch
    from companion.grading import expect_same, forbidding
    p = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.3, 0.7, 0.0]])
    with forbidding(speculative_step, "companion.generation.speculative.accept_or_resample",
                    "companion.generation.speculative.residual_distribution",
                    "companion.generation.speculative.acceptance_probability"):
        got = speculative_step(p, q, torch.tensor([1]), torch.tensor([0.6]), 0.5)
    expect_same(tuple(int(v) for v in got) if isinstance(got, (tuple, list)) else got, (0, 0),
                "a rejection, without companion's speculative functions")


@hidden("gather_left_padded")
def test_gather_left_padded_positions_by_hand(gather_left_padded):
    import torch
    from companion.grading import expect_same
    pool = torch.arange(12.0)[:, None] * torch.ones(1, 2)  # 6 blocks of 2 positions; row i holds (i, i)
    got = gather_left_padded(pool, [[4, 0], [5], [1, 3]], [3, 1, 4], 2)
    expected = torch.tensor([[0.0, 8, 9, 0], [0, 0, 0, 10], [2, 3, 6, 7]])[..., None] * torch.ones(1, 1, 2)
    expect_same(got, expected, "blocks of 2, tables [[4, 0], [5], [1, 3]], lengths [3, 1, 4]: "
                               "rows 8, 9, 0 / 10 / 2, 3, 6, 7, left-padded with zeros")


@hidden("gather_left_padded")
def test_gather_left_padded_edges(gather_left_padded):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(113)
    pool = torch.randn(10 * 3, 4, generator=gen)
    cases = [
        ([[7], [2, 9]], [0, 5], "a request of length 0 beside one of 5"),
        ([[7], [2]], [0, 0], "every request of length 0: shape (2, 0, 4)"),
        ([[3, 8, 1]], [6], "length 6 = two full blocks of 3, a third block allocated and unwritten"),
        ([[4, 4]], [6], "a table that lists one block twice"),
    ]
    for tables, lengths, case in cases:
        L = max(lengths)
        expected = torch.zeros(len(tables), L, 4)
        for b, (table, n) in enumerate(zip(tables, lengths)):
            for p in range(n):
                expected[b, L - n + p] = pool[table[p // 3] * 3 + p % 3]
        expect_same(gather_left_padded(pool, tables, lengths, 3), expected, case)


@hidden("gather_left_padded")
def test_gather_left_padded_dtypes_and_block_sizes(gather_left_padded):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(114)
    for block_size, dtype in [(1, torch.float64), (16, torch.float32), (5, torch.bfloat16)]:
        pool = torch.randn(6 * block_size, 3, generator=gen).to(dtype)
        tables = [[5, 0, 2], [1, 4], [3]]
        lengths = [2 * block_size + 1, 2 * block_size, block_size - 1]
        L = max(lengths)
        expected = torch.zeros(3, L, 3, dtype=dtype)
        for b, (table, n) in enumerate(zip(tables, lengths)):
            for p in range(n):
                expected[b, L - n + p] = pool[table[p // block_size] * block_size + p % block_size]
        expect_same(gather_left_padded(pool, tables, lengths, block_size), expected,
                    f"block_size {block_size}, {dtype}, lengths {lengths}")


@hidden("blocks_with_sharing")
def test_blocks_with_sharing_by_hand(blocks_with_sharing):
    from companion.grading import expect_same
    system = list(range(100, 132))  # a system prompt of 32 tokens: two full blocks of 16
    cases = [
        ([system + [1, 2, 3], system + [4, 5], system], 16, 2 + 1 + 1 + 0,
         "three requests after the same 32-token system prompt: 2 shared blocks, 2 partial ones"),
        ([[7, 7, 7, 7], [7, 7, 7, 7, 7, 7]], 2, 3 + 0 + 0,
         "[7, 7, 7, 7] and [7] * 6: three different blocks, although every one holds (7, 7)"),
        ([[1, 2, 3, 4], [3, 4, 1, 2]], 2, 4, "the same blocks in another order: nothing shared"),
        ([[1, 2], [1, 2, 3]], 2, 2, "a prompt of one block, and the same with one more token"),
        ([[]], 4, 0, "one empty prompt"),
        ([[9]] * 5, 4, 5, "five one-token prompts: five blocks still being filled, none shared"),
        ([[1, 2, 3]], 10, 1, "a prompt shorter than a block"),
    ]
    for prompts, block_size, expected, case in cases:
        expect_same(blocks_with_sharing(prompts, block_size), expected, f"{case} (block_size {block_size})")


@hidden("blocks_with_sharing")
def test_blocks_with_sharing_random_prompts(blocks_with_sharing):
    import random
    from companion.grading import expect_same
    rng = random.Random(115)
    for trial in range(20):
        block_size = rng.choice([1, 2, 3, 4])
        stem = [rng.randrange(3) for _ in range(rng.randrange(0, 9))]
        prompts = [stem[:rng.randrange(len(stem) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 6))]
                   for _ in range(rng.randrange(0, 6))]
        full, partial = set(), 0
        for prompt in prompts:
            full |= {tuple(prompt[:end]) for end in range(block_size, len(prompt) + 1, block_size)}
            partial += len(prompt) % block_size != 0
        expect_same(blocks_with_sharing(prompts, block_size), len(full) + partial,
                    f"prompts {prompts}, block_size {block_size}")
