import json

import pytest
import torch

from nas_core.search_space import (
    CAM_OPS,
    N_SLOTS,
    SAM_OPS,
    Cell,
    Genotype,
    GenotypeError,
    create_cell,
    edge_list,
    make_op,
    num_edges,
)

# (table, dim, c_in, input shape) for the two cell kinds
KINDS = {"sam": (SAM_OPS, 2, 5, (2, 5, 8, 8)), "cam": (CAM_OPS, 1, 1, (2, 1, 24))}


def test_op_tables_names_order_and_specs():
    assert list(SAM_OPS) == ["zero", "conv1", "conv3", "conv5", "atrous3", "atrous5"]
    assert list(CAM_OPS) == ["zero", "conv1", "conv3", "conv5", "conv9", "conv15", "atrous3", "atrous5"]
    assert [(s.kernel, s.dilation) for s in SAM_OPS.values()][1:] == [(1, 1), (3, 1), (5, 1), (3, 2), (5, 2)]
    assert (CAM_OPS["conv15"].kernel, CAM_OPS["atrous5"].dilation) == (15, 2)
    with pytest.raises(TypeError):
        SAM_OPS["conv7"] = SAM_OPS["conv3"]  # the tables are read-only


@pytest.mark.parametrize("n, edges", [(1, 1), (2, 3), (3, 6), (4, 10)])
def test_edge_count_is_derived(n, edges):
    assert num_edges(n) == edges == len(edge_list(n))
    assert all(src < dst for src, dst in edge_list(n))
    assert len(set(edge_list(n))) == edges


def test_edge_order_for_three_nodes():
    assert edge_list(3) == [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
    with pytest.raises(ValueError, match="n_nodes"):
        num_edges(0)


@pytest.mark.parametrize("kind", ["sam", "cam"])
def test_every_op_keeps_the_length_and_is_conv_then_bn(kind):
    table, dim, c_in, shape = KINDS[kind]
    x = torch.randn(*shape)
    for name, spec in table.items():
        op = make_op(spec, c_in, 7, dim)
        if spec.kind == "zero":
            assert op is None
            continue
        conv, bn = op
        assert conv.bias is not None and conv.kernel_size == (spec.kernel,) * dim
        assert isinstance(bn, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) and bn.num_features == 7
        assert op(x).shape == (shape[0], 7, *shape[2:]), name


@pytest.mark.parametrize("kind", ["sam", "cam"])
def test_mixed_cell_shape_range_and_gradients(kind):
    table, dim, c_in, shape = KINDS[kind]
    torch.manual_seed(0)
    cell = Cell(table, c_in, dim)
    alpha = (1e-3 * torch.randn(num_edges(3), len(table))).requires_grad_()
    y = cell(torch.randn(*shape), torch.softmax(alpha, -1))
    assert y.shape == (shape[0], 1, *shape[2:])
    assert 0 <= y.min() and y.max() <= 1
    y.pow(2).sum().backward()
    for name, p in cell.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0
    # every edge holds every non-zero op, named by edge and op
    assert {n.split(".")[2] for n, _ in cell.named_parameters()} == set(table) - {"zero"}


@pytest.mark.parametrize("kind", ["sam", "cam"])
@pytest.mark.parametrize("zero_op", ["paper", "code"])
def test_edge_outputs_stack_every_op_in_table_order(kind, zero_op):
    table, dim, c_in, shape = KINDS[kind]
    cell = Cell(table, c_in, dim, zero_op=zero_op)
    x = torch.randn(*shape)
    into_hidden = cell.edge_outputs(0, x)  # edge (0 -> 1), ReLU
    into_output = cell.edge_outputs(3, x)  # edge (0 -> 3), sigmoid
    assert into_hidden.shape == (len(table), shape[0], 32, *shape[2:])
    assert into_output.shape == (len(table), shape[0], 1, *shape[2:])
    assert torch.equal(into_hidden[0], torch.zeros_like(into_hidden[0]))
    assert torch.all(into_output[0] == (0.5 if zero_op == "code" else 0.0))
    assert into_hidden.min() >= 0  # ReLU


GENOTYPE_ROWS = {
    "sam": [
        ("conv3", "conv1", "atrous5", "conv5", "atrous3", "conv1"),
        ("conv5", "conv3", "zero", "conv1", "zero", "atrous3"),  # node 1 dead: its conv5 is not built
        ("zero",) * 6,
        ("conv5", "zero", "conv3", "zero", "zero", "zero"),  # nothing reaches the output
    ],
    "cam": [
        ("conv15", "conv9", "atrous5", "conv1", "atrous3", "conv3"),
        ("conv3", "zero", "zero", "zero", "zero", "conv5"),  # node 2 dead
        ("zero",) * 6,
    ],
}


@pytest.mark.parametrize("zero_op", ["paper", "code"])
@pytest.mark.parametrize("kind, row", [(k, r) for k, rows in GENOTYPE_ROWS.items() for r in rows])
def test_fixed_cell_equals_mixed_cell_with_one_hot_weights(kind, row, zero_op):
    table, dim, c_in, shape = KINDS[kind]
    torch.manual_seed(1)
    mixed = Cell(table, c_in, dim, zero_op=zero_op)
    fixed = Cell(table, c_in, dim, genotype=row, zero_op=zero_op)
    # both forms name parameters ops.<edge>.<op>.*, so the fixed net loads the chosen subset
    missing, _ = fixed.load_state_dict(mixed.state_dict(), strict=False)
    assert missing == []
    names = list(table)
    one_hot = torch.zeros(num_edges(3), len(table))
    one_hot[range(num_edges(3)), [names.index(n) for n in row]] = 1.0
    x = torch.randn(*shape)
    torch.testing.assert_close(fixed(x), mixed(x, one_hot), rtol=1e-6, atol=1e-7)


def test_fixed_cell_prunes_ops_into_dead_nodes():
    fixed = Cell(SAM_OPS, 4, 2, genotype=GENOTYPE_ROWS["sam"][1])
    built = sorted({".".join(n.split(".")[1:3]) for n, _ in fixed.named_parameters()})
    assert built == ["1.conv3", "3.conv1", "5.atrous3"]  # (0->1) conv5 feeds only Zero edges


@pytest.mark.parametrize("kind", ["sam", "cam"])
def test_all_zero_cell_is_constant_per_protocol(kind):
    table, dim, c_in, shape = KINDS[kind]
    x = torch.randn(*shape)
    paper = Cell(table, c_in, dim, genotype=("zero",) * 6, zero_op="paper")
    code = Cell(table, c_in, dim, genotype=("zero",) * 6, zero_op="code")
    assert list(paper.parameters()) == []
    assert torch.equal(paper(x), torch.zeros(shape[0], 1, *shape[2:]))
    assert torch.equal(code(x), torch.full((shape[0], 1, *shape[2:]), 0.5))


def test_cell_rejects_bad_arguments():
    cell = Cell(SAM_OPS, 3, 2)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(6, 6\)"):
        cell(x, torch.ones(6, 8))
    with pytest.raises(ValueError, match="no op weights"):
        Cell(SAM_OPS, 3, 2, genotype=("conv1",) * 6)(x, torch.ones(6, 6))
    with pytest.raises(ValueError, match="edge 2: unknown op 'conv9'"):
        Cell(SAM_OPS, 3, 2, genotype=("conv1", "conv1", "conv9", "conv1", "conv1", "conv1"))
    with pytest.raises(ValueError, match="zero_op"):
        Cell(SAM_OPS, 3, 2, zero_op="release")
    with pytest.raises(ValueError, match="impl: 'fused' is not one of reference, stacked"):
        create_cell(SAM_OPS, 3, 2, impl="fused")


# ---- genotype ----

def _genotype(search: str = "synchronous", combine: str = "parallel") -> Genotype:
    sam_names, cam_names = list(SAM_OPS), list(CAM_OPS)
    if search == "shared":
        return Genotype.uniform(combine, search, "conv3", "conv9")
    sam = [[sam_names[(s + e) % len(sam_names)] for e in range(6)] for s in range(N_SLOTS)]
    cam = [[cam_names[(s * 3 + e) % len(cam_names)] for e in range(6)] for s in range(N_SLOTS)]
    return Genotype(combine, search, sam, cam)


@pytest.mark.parametrize("search", ["synchronous", "shared"])
def test_genotype_json_round_trip(tmp_path, search):
    g = _genotype(search, "serial")
    data = json.loads(g.to_json())
    assert data["format"] == 1 and data["combine"] == "serial" and data["search"] == search
    assert len(data["sam"]) == 8 and all(len(s) == 6 for s in data["sam"] + data["cam"])
    assert Genotype.from_json(g.to_json()) == g == Genotype.from_json(data)
    assert Genotype.load(g.save(tmp_path / "sub" / "g.json")) == g
    assert isinstance(g.sam[0], tuple) and hash(g) == hash(Genotype.from_json(data))


def _bad(**changes):
    data = _genotype().to_dict()
    data.update(changes)
    return data


def _edit(kind, slot, edge, value):
    data = _genotype().to_dict()
    data[kind][slot][edge] = value
    return data


@pytest.mark.parametrize(
    "data, fragment",
    [
        (_edit("sam", 3, 2, "conv7"), "sam slot 3 edge 2: unknown op 'conv7'; valid: zero, conv1, conv3"),
        (_edit("cam", 0, 5, "conv7"), "cam slot 0 edge 5: unknown op 'conv7'; valid: zero, conv1, conv3, conv5, conv9"),
        (_bad(format=2), "format 2 is not supported"),
        (_bad(sam=_genotype().to_dict()["sam"][:7]), "sam: expected 8 slots, got 7"),
        (_bad(cam=[s[:5] for s in _genotype().to_dict()["cam"]]), "cam slot 0: expected 6 edges, got 5"),
        (_bad(combine="both"), "combine: 'both'"),
        (_bad(search="async"), "search: 'async'"),
        (_bad(extra=1), "unknown key 'extra'"),
        ({k: v for k, v in _bad().items() if k != "cam"}, "missing key 'cam'"),
        (_bad(search="shared"), "shared genotype: sam slot 1"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be an object"),
    ],
)
def test_genotype_validation_errors_name_the_culprit(data, fragment):
    with pytest.raises(GenotypeError) as info:
        Genotype.from_json(data)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_genotype_load_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_edit("sam", 3, 2, "conv7")))
    with pytest.raises(GenotypeError, match=r"bad\.json: sam slot 3 edge 2"):
        Genotype.load(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Genotype.load(tmp_path / "nope.json")

