from conftest import invoke


def test_version(runner):
    from onnxshrink import __version__

    result = invoke(runner, "--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_public_functions_are_not_shadowed_by_submodules():
    """`import onnxshrink.X` sets the package attribute X to the module: no module may share a public function's name."""
    import importlib
    import pkgutil

    import onnxshrink

    for module in pkgutil.walk_packages(onnxshrink.__path__, "onnxshrink."):
        importlib.import_module(module.name)
    for name in onnxshrink.__all__:
        if name != "__version__":
            assert callable(getattr(onnxshrink, name)) and not isinstance(getattr(onnxshrink, name), type(onnxshrink)), name
