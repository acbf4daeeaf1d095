"""Two local ranks (torch.distributed, gloo) give the artifact one rank gives, and a failing
rank ends the run in one line."""

import onnx
import pytest
from onnx import numpy_helper

from graphpress.errors import GraphpressError
from graphpress.stream import StreamOptions, compress_stream
from tests.stream.tiny import write_llama

# SparseGPT needs the layer-input Hessians, summed over the ranks' calibration shares, and solves
# one layer per rank; int4 then quantizes the pruned weights
RECIPE = {"name": "sparsegpt-int4", "passes": [
    {"prune-weights": {"sparsity": 0.5, "method": "sparsegpt"}},
    {"quantize-layerwise": {"bits": [4], "target_bits": 4, "activations": "none", "group_size": 32, "min_sqnr_db": 5}},
]}


def _options(workers, **kw):
    return StreamOptions(calibration_sequences=4, calibration_seq_len=10, heldout_seq_len=10, batch=2, workers=workers, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    write_llama(path)
    return path


def _initializers(folder):
    model = onnx.load(str(folder / "model.onnx"))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.fixture(scope="module")
def one_rank(folder, tmp_path_factory):
    return compress_stream(folder, RECIPE, tmp_path_factory.mktemp("one") / "art", options=_options(1))


def test_two_ranks_write_the_artifact_one_rank_writes(folder, one_rank, tmp_path):
    one = one_rank
    seen = []
    two = compress_stream(folder, RECIPE, tmp_path / "two", options=_options(2), on_unit=lambda i, n, r: seen.append(r.unit))
    assert seen == ["embed", "block.0", "block.1", "head.0"]  # rank 0's progress reaches the caller
    a, b = _initializers(one.folder), _initializers(tmp_path / "two")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].tobytes() != b[k].tobytes()] == []  # bit-identical weights
    sq1 = [u["sqnr_db"] for u in one.manifest["stream"]["units"]]
    sq2 = [u["sqnr_db"] for u in two.manifest["stream"]["units"]]
    assert sq1 == pytest.approx(sq2, rel=1e-9)  # SQNR over both ranks' shares = over all of it
    pruned = [p for u in two.manifest["stream"]["units"] for p in u["passes"] if p["name"] == "prune-weights"]
    assert pruned and all(p["stats"]["achieved_sparsity"] > 0.45 for p in pruned)
    assert two.manifest["stream"]["options"]["workers"] == 2


def test_a_failing_rank_fails_the_run_in_one_line_and_leaves_nothing(folder, tmp_path):
    with pytest.raises(GraphpressError, match=r"streamed run failed on rank \d: .*block 0: output SQNR .* below min_block_sqnr_db=90"):
        compress_stream(folder, RECIPE, tmp_path / "out", options=_options(2, min_block_sqnr_db=90.0, collective_timeout_s=60))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_worker_count_below_one_is_refused(folder, tmp_path):
    with pytest.raises(GraphpressError, match="workers=0"):
        compress_stream(folder, RECIPE, tmp_path / "out", options=_options(0))


def test_torchrun_ranks_run_the_same_code(folder, one_rank, tmp_path):
    """``torchrun --nproc-per-node 2`` starting the CLI: the launcher's ranks join for the run."""
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    script = (
        "import sys, torch; from graphpress.stream import StreamOptions, compress_stream; "
        "opts = StreamOptions(calibration_sequences=4, calibration_seq_len=10, heldout_seq_len=10, batch=2); "
        f"compress_stream({str(folder)!r}, {str(recipe)!r}, {str(tmp_path / 'tr')!r}, options=opts)"
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python", sys.executable, "-c", script]
    run = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = _initializers(one_rank.folder), _initializers(tmp_path / "tr")
    assert [k for k in a if a[k].tobytes() != b[k].tobytes()] == []


# GPTQ's group-wise rounding needs each layer's input Hessian, summed over the ranks' shares
GPTQ = {"name": "gptq-int4", "passes": [
    {"quantize-layerwise": {"bits": [4], "target_bits": 4, "activations": "none", "group_size": 32, "min_sqnr_db": 5,
                            "group_rounding": "gptq", "act_order": True}},
]}


def test_two_ranks_round_with_the_hessian_of_all_calibration_data(folder, tmp_path):
    one = compress_stream(folder, GPTQ, tmp_path / "one", options=_options(1))
    two = compress_stream(folder, GPTQ, tmp_path / "two", options=_options(2))
    a, b = _initializers(one.folder), _initializers(two.folder)
    assert a.keys() == b.keys()
    codes = [k for k in a if a[k].dtype.name == "uint8"]
    assert codes
    # the Hessians are sums of the same rows grouped differently (float64): the codes agree
    same = sum(int((a[k] == b[k]).sum()) for k in codes) / sum(a[k].size for k in codes)
    assert same > 0.999, same
    rounding = {e.get("weight_rounding") for u in two.manifest["stream"]["units"] for p in u["passes"]
                for e in p["stats"]["layers"].values()}
    assert rounding and all(r.startswith("gptq (act order)") for r in rounding)
