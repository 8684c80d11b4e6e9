#!/usr/bin/env python3
"""scripts/torch_parity.py's Routes: muonforge's expert choice is followed at a near-tie of the
selection scores and reported as a mismatch beyond one. Needs PyTorch (run with the Python that
has it: Debian's /usr/bin/python3 with python3-torch); tests/test_scripts.cpp runs it."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
import torch  # noqa: E402
import torch_parity  # noqa: E402


def write_routes(path, blocks):
    with open(path, "wb") as f:
        for b in blocks:
            f.write(torch.tensor(b, dtype=torch.int32).numpy().tobytes())


def main():
    fails = []

    def check(cond, what):
        print(("ok: " if cond else "FAIL: ") + what)
        if not cond:
            fails.append(what)

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "routes.bin")
        # 3 tokens, 4 experts, top 2. Token 0: experts 1 and 2 tie exactly for second place;
        # token 1: 3 sits 4e-6 below 0's second place; token 2: the same top-2 set, in another
        # order.
        sel = torch.tensor([[0.9, 0.5, 0.5, 0.1],
                            [0.7, 0.1, 0.8, 0.699996],
                            [0.2, 0.6, 0.1, 0.9]])
        idx = sel.topk(2, dim=-1).indices
        mine = [[0, 2] if int(idx[0, 1]) == 1 else [0, 1], [2, 3], [1, 3]]
        write_routes(path, [mine, mine])
        r = torch_parity.Routes(torch, path, 2, 3, 2, 1e-5)
        got = r.choose(sel, idx, "step 1, layer 1")
        check(got.tolist() == mine, "near-ties follow muonforge's choice")
        check(r.ties == 2 and not r.issues, f"two near-ties taken, no issue ({r.ties}, {r.issues})")
        check(3e-6 < r.worst < 5e-6, f"the largest gap taken is token 1's ({r.worst:.2e})")
        # The same choices with a tolerance below token 1's gap: reported, by token and experts.
        r.tol = 1e-6
        r.choose(sel, idx, "step 2, layer 1")
        check(len(r.issues) == 1 and "step 2, layer 1, token 1" in r.issues[0]
              and "muonforge routes to experts [2, 3], torch to [0, 2]" in r.issues[0],
              f"a gap above --route-tol is a mismatch ({r.issues})")
        check(r.at == 2 and r.tokens == 6, "one block per call")
        # A file of the wrong size is refused with the sizes named.
        try:
            torch_parity.Routes(torch, path, 3, 3, 2, 1e-5)
            check(False, "a short routing file is refused")
        except torch_parity.UserError as e:
            check("48 bytes, expected 72" in str(e), f"a short routing file is refused ({e})")
    print("FAILED" if fails else "all routing checks passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
