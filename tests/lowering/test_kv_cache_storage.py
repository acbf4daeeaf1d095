"""Caches stored as packed codes: pack/unpack round trip, the storage's encode/decode against
the float op, and the manifest's interface."""

import pytest
import torch

from graphpress.ir.ops_kvcache import qdq_rows, quantize_rows
from graphpress.lowering.onnx.kv_cache import CacheStorage, pack, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_pack_into_bits_over_8_bytes_and_back(bits):
    q = torch.randint(0, 2 ** bits, (2, 3, 5, 16)).float()
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 16 * bits // 8
    assert torch.equal(unpack(packed, bits), q)


def test_encode_decode_stand_for_the_rounded_float_cache():
    storage = CacheStorage({"past_key_values.0.key": 4})
    names = ["input_ids", "past_key_values.0.key", "past_key_values.0.value"]
    x = torch.randn(1, 2, 3, 8)
    ids = torch.tensor([[1, 2]])
    feeds = storage.encode(names, [ids, x, x])
    assert [f.dtype for f in feeds] == [torch.int64, torch.uint8, torch.float16, torch.float32]  # codes and scales for the key only
    assert feeds[1].shape == (1, 2, 3, 4) and feeds[2].shape == (1, 2, 3, 2)
    back = storage.decode(names, feeds)
    assert len(back) == 3 and back[0] is ids and back[2] is x
    assert torch.allclose(back[1], qdq_rows(x, 4), atol=1e-6)
    q, s, m = quantize_rows(x, 4)
    assert torch.equal(unpack(feeds[1], 4), q)
    # present outputs are named after their past
    assert storage.decode(["present.0.key"], feeds[1:3])[0].shape == x.shape


def test_specs_list_codes_and_scales_where_the_float_cache_was():
    storage = CacheStorage({"past_key_values.1.value": 2})
    specs = storage.specs([{"name": "present.1.value", "shape": ["batch", 4, "total", 64], "dtype": "float32"},
                           {"name": "logits", "shape": ["batch", "seq", 100], "dtype": "float32"}])
    assert specs == [{"name": "present.1.value", "shape": ["batch", 4, "total", 16], "dtype": "uint8"},
                     {"name": "present.1.value_scales", "shape": ["batch", 4, "total", 2], "dtype": "float16"},
                     {"name": "logits", "shape": ["batch", "seq", 100], "dtype": "float32"}]


def test_a_stored_cache_may_differ_by_one_grid_step_not_more():
    storage = CacheStorage({"past_key_values.0.key": 2})
    ref = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]])  # one row: 2-bit step 1.0
    assert storage.within_a_step("present.0.key", ref, ref + torch.tensor([0.0, 1.0, 0.0, -1.0]))  # codes flipped by one
    assert not storage.within_a_step("present.0.key", ref, ref + torch.tensor([0.0, 2.0, 0.0, 0.0]))  # two steps: a wrong lowering
    assert storage.within_a_step("present.0.value", ref, ref) is None  # a float cache: the usual tolerance applies
    assert storage.within_a_step("logits", ref, ref) is None


def test_with_int8_activations_upstream_a_row_may_also_move_its_grid_by_half_a_step():
    storage = CacheStorage({"past_key_values.0.key": 2})
    ref = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]])  # step 1.0
    # the key moved upstream: the test row's range is 3.3 (step 1.1) and a value crossed a boundary
    test = torch.tensor([[[[0.0, 2.2, 2.2, 3.3]]]])
    assert not storage.within_a_step("present.0.key", ref, test)  # 1.2 > one step of the reference
    assert storage.within_a_step("present.0.key", ref, test, upstream=True)  # <= (1.0 + 1.1) / 2 + 1.1 / 2 = 1.6
    # the rule must not match a wrong lowering: a whole row reversed is off by the full range
    assert not storage.within_a_step("present.0.key", ref, ref.flip(-1), upstream=True)
