"""Hugging Face folders and llama2.c files through the dispatcher."""

import pytest
import torch

from graphpress.errors import FrontendError
from graphpress.frontends import load

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_hf_folder_matches_transformers(tmp_path, name):
    from graphpress.zoo.hf_tiny import save_tiny_hf

    folder = tmp_path / name
    save_tiny_hf(name, folder)
    graph = load(folder)
    assert graph.input_names == ["input_ids"] and graph.output_names == ["logits"]
    assert graph.dynamic_batch
    # transformers' own loader is the reference for our from_config + safe weight loading
    ref = getattr(transformers, graph.source["architecture"]).from_pretrained(str(folder), attn_implementation="eager").eval()
    ids = torch.randint(0, ref.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    torch.testing.assert_close(graph.run(ids)[0], expected, rtol=1e-4, atol=1e-4)


def test_hf_folder_errors(tmp_path):
    from graphpress.zoo.hf_tiny import save_tiny_hf

    folder = tmp_path / "gpt2"
    save_tiny_hf("gpt2", folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FrontendError, match="no weights found"):
        load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(FrontendError, match="config.json: cannot read config"):
        load(folder)


def test_llama2c_file(shared_models):
    from graphpress.zoo.llama2c import load_llama2c

    path = shared_models / "stories260k" / "stories260K.bin"
    graph = load(path)
    assert graph.source["frontend"] == "llama2c" and graph.output_names == ["logits"]
    model = load_llama2c(path)
    tokens = graph.example_inputs[0]
    torch.testing.assert_close(graph.run(tokens[:3])[0], model(tokens[:3]), rtol=1e-5, atol=1e-5)


def test_llama2c_truncated(tmp_path):
    from graphpress.zoo.llama2c import llama2c_tiny, save_llama2c

    path = tmp_path / "tiny.bin"
    save_llama2c(llama2c_tiny(), path)
    assert load(path).source["frontend"] == "llama2c"
    path.write_bytes(path.read_bytes()[:-100])
    # the header still parses but the size does not match: the llama2.c reader explains it
    with pytest.raises(FrontendError, match="tiny.bin: .*(truncated|does not match)"):
        load(path)
