"""ZeRO-2 sharding (rl/zero.py): one process equals torch's AdamW + clip_grad_norm_; owners are balanced; the full
optimizer state round-trips through the plain AdamW format."""

import math

import torch

from rl.zero import ShardedAdamW, assign_owners


def model_and_grads(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    return m, [torch.randn_like(p) * 3 for p in m.parameters()]


def test_owners_balance_sizes_deterministically():
    owners = assign_owners([100, 10, 60, 50, 5], 2)
    load = [sum(s for s, o in zip([100, 10, 60, 50, 5], owners) if o == r) for r in range(2)]
    assert owners == [0, 0, 1, 1, 0] and load == [115, 110]  # 100 | 60, 50 -> r1 | 10 -> r0 | 5: tie -> r0
    assert assign_owners([3, 3], 4) == [0, 1] and assign_owners([7], 1) == [0]


def test_one_process_equals_adamw_with_clipping():
    for max_norm in (1.0, math.inf):
        a, grads = model_and_grads()
        b, _ = model_and_grads()
        ref = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        sharded = ShardedAdamW(list(b.parameters()), 0, 1, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        for _ in range(3):
            for p, g in zip(a.parameters(), grads):
                p.grad = g.clone()
            norm_ref = float(torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm))
            ref.step()
            for p, g in zip(b.parameters(), grads):
                p.grad = g.clone()
            norm = sharded.reduce_clip_step(max_norm)
            assert math.isclose(norm, norm_ref, rel_tol=1e-6)
            for p, q in zip(a.parameters(), b.parameters()):
                assert torch.allclose(p, q, atol=1e-7)
        assert all(p.grad is None for p in b.parameters())


def test_full_state_round_trips_through_the_plain_adamw_format():
    a, grads = model_and_grads()
    sharded = ShardedAdamW(list(a.parameters()), 0, 1, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for p, g in zip(a.parameters(), grads):
        p.grad = g.clone()
    sharded.reduce_clip_step(math.inf)
    full = sharded.state_dict()
    assert sorted(full["state"]) == [0, 1, 2, 3] and full["param_groups"][0]["params"] == [0, 1, 2, 3]
    plain = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    plain.load_state_dict(full)  # the same format as one AdamW over every parameter
    again = ShardedAdamW(list(a.parameters()), 0, 1, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    again.load_state_dict(plain.state_dict())
    for i in range(4):
        assert torch.equal(
            again.inner.state[again.inner.param_groups[0]["params"][i]]["exp_avg"], full["state"][i]["exp_avg"]
        )
