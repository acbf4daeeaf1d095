import torch
import torch.nn as nn

from graphpress.ir.graph import Graph
from graphpress.passes.fisher import fisher_diagonal


def test_fisher_matches_manual_squared_gradients():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(4, 6)
    g = Graph.capture(m, (x,)).clone()  # the clone's tensors are its own
    g.get_tensor("2.weight").requires_grad_(False)
    f = fisher_diagonal(g, ["0.weight", "2.weight"], [(x,)], micro_batch=1)
    want = torch.zeros_like(m[2].weight)
    labels = m(x).argmax(-1)
    for i in range(4):
        m.zero_grad()
        nn.functional.cross_entropy(m(x[i : i + 1]), labels[i : i + 1], reduction="sum").backward()
        want += m[2].weight.grad.pow(2)
    torch.testing.assert_close(f["2.weight"], want, rtol=1e-5, atol=1e-8)
    assert f["0.weight"].shape == (5, 6) and (f["0.weight"] >= 0).all()
    assert not g.get_tensor("2.weight").requires_grad  # restored


def test_fisher_uses_calibration_and_labels():
    torch.manual_seed(1)
    g = Graph.capture(nn.Linear(4, 3), (torch.randn(2, 4),))
    g.calibration = [(torch.randn(8, 4),)]
    f1 = fisher_diagonal(g, ["weight"], micro_batch=8)
    f2 = fisher_diagonal(g, ["weight"], labels=[torch.zeros(8, dtype=torch.long)], micro_batch=8)
    assert f1["weight"].abs().sum() > 0 and not torch.allclose(f1["weight"], f2["weight"])
