"""src/dataset.py: the ModelZoo module name keeps every public name of the src.data package importable."""
import importlib

import src.dataset as dataset_module

PACKAGE_MODULES = ["src.data.records", "src.data.annotations", "src.data.conversion", "src.data.transforms",
                   "src.data.pipeline"]


def test_every_name_is_the_package_object():
    owners = {}
    for name in PACKAGE_MODULES:
        module = importlib.import_module(name)
        owners.update({key: value for key, value in vars(module).items() if key in dataset_module.__all__})
    assert sorted(owners) == sorted(dataset_module.__all__)
    for key in dataset_module.__all__:
        assert getattr(dataset_module, key) is owners[key], key


def test_modelzoo_entry_points_are_there():
    for name in ("data_to_mindrecord", "create_maskrcnn_dataset", "DatasetError", "EvalTransform", "load_manifest"):
        assert callable(getattr(dataset_module, name))
