"""graphpress.api and backend options: resolution (call, recipe, default), the recipe's
``backend:`` section, and ``manifest["backend_options"]`` (absent from older artifacts)."""

from __future__ import annotations

import json

import pytest
import torch

from graphpress import api
from graphpress.errors import BackendError, PassError
from graphpress.passes.recipes import Recipe
from tests.frontends.models import small_cnn

PASSES = {"passes": ["fold-batchnorm"]}


def test_default_backend_is_onnxruntime_with_default_options():
    be = api.resolve_backend()
    assert be.name == "onnxruntime" and be.options == api.backend_options("onnxruntime")


def test_recipe_names_the_backend_and_call_options_win_key_by_key():
    recipe = Recipe.from_dict({**PASSES, "backend": {"name": "onnxruntime", "options": {"opset": 19, "optimize": True}}})
    be = api.resolve_backend(None, {"opset": 20}, recipe=recipe)
    assert (be.name, be.options.opset, be.options.optimize) == ("onnxruntime", 20, True)
    # the same backend named in the call keeps the recipe's options
    assert api.resolve_backend("onnxruntime", recipe=recipe).options.opset == 19
    # a plain name in the recipe
    assert api.resolve_backend(recipe=Recipe.from_dict({**PASSES, "backend": "torch"})).name == "torch"


def test_another_backend_overrides_a_recipe_without_options_and_refuses_one_with():
    assert api.resolve_backend("torch", recipe=Recipe.from_dict({**PASSES, "backend": "onnxruntime"})).name == "torch"
    recipe = Recipe.from_dict({**PASSES, "backend": {"name": "onnxruntime", "options": {"opset": 20}}}, origin="r.yaml")
    with pytest.raises(BackendError) as err:
        api.resolve_backend("torch", recipe=recipe)
    assert str(err.value) == (
        "r.yaml: the recipe's backend section configures 'onnxruntime' (opset) but the backend is 'torch'; "
        "drop the backend choice or the recipe's backend options"
    )


def test_recipe_option_errors_name_the_recipe():
    recipe = Recipe.from_dict({**PASSES, "backend": {"name": "onnxruntime", "options": {"opste": 20}}}, origin="r.yaml")
    with pytest.raises(BackendError, match=r"^r\.yaml: backend: backend 'onnxruntime': unknown option 'opste': did you mean 'opset'\?$"):
        api.resolve_backend(recipe=recipe)


def test_options_with_a_configured_backend_are_refused():
    with pytest.raises(BackendError, match="already configured backend"):
        api.resolve_backend(api.resolve_backend("torch"), {"check_seeds": [1]})


@pytest.mark.parametrize(
    "section, message",
    [
        (["onnxruntime"], "'backend' must be a backend name or {name: NAME, options: {...}}"),
        ({"options": {}}, "'backend' needs a 'name'"),
        ({"name": "tvm", "option": {}}, "unknown backend key 'option': did you mean 'options'?"),
        ({"name": "tvm", "options": [1]}, "backend 'options' must be a mapping"),
    ],
)
def test_backend_section_shape_errors(section, message):
    with pytest.raises(PassError) as err:
        Recipe.from_dict({**PASSES, "backend": section}, origin="r.yaml")
    assert str(err.value).startswith("r.yaml: ") and message in str(err.value)


def test_recipe_round_trip_keeps_the_backend_section_and_old_recipes_stay_as_they_were():
    data = {**PASSES, "backend": {"name": "tvm", "options": {"tune_trials": 8}}}
    recipe = Recipe.from_dict(data)
    again = Recipe.from_dict(recipe.to_dict())
    assert (again.backend, again.backend_options) == ("tvm", {"tune_trials": 8})
    old = Recipe.from_dict(PASSES).to_dict()
    assert "backend" not in old and set(old) == {"name", "description", "passes", "verify"}


def test_export_writes_the_options_in_force(tmp_path):
    graph = api.load_model(small_cnn(), input_shape="2x3x16x16")
    result = api.export(graph, tmp_path / "art", backend="torch", backend_options={"check_seeds": [7]}, bench=False)
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["backend"] == "torch"
    assert manifest["backend_options"] == {"version": 1, "check_seeds": [7]}
    assert result.manifest["backend_options"] == manifest["backend_options"]
    model = api.load_artifact(result.folder)
    x = graph.example_inputs[0]
    torch.testing.assert_close(torch.from_numpy(model(x.numpy())[0]), graph.run(x)[0])


def test_list_passes_and_check_recipe_for_the_cli():
    rows = {r["name"]: r for r in api.list_passes()}
    assert rows["fold-batchnorm"]["exact"] is True and rows["fold-batchnorm"]["defaults"]["version"] >= 1
    assert not any(name.startswith("test-") for name in rows)
    assert api.check_recipe({**PASSES, "backend": "torch"}).backend == "torch"
    with pytest.raises(PassError, match="did you mean 'fold-batchnorm'"):
        api.check_recipe({"passes": ["fold-batchnrom"]})
